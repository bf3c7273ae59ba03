"""CoMatch with resnet50 on the full AID30 dataset (paper Table II), 4 labels per class.

The full datasets have no published split lists: each class is split 50/50 into train and
test by a seeded draw (config.data.test_fraction, config.seed); split.json in the workdir
records it.

Run:    python launch.py --config configs/aid30_comatch_resnet50.py
Smoke:  python launch.py --config configs/aid30_comatch_resnet50.py:smoke --workdir /tmp/smoke
Result: the paper's Table II compares the three backbones under CoMatch; ssl_jax's own
        full-length numbers are recorded in README.md "Results" once measured.
"""

from configs import base


def get_config(arg=None):
    config = base.get_config()
    base.use_dataset(config, "aid30")
    base.use_method(config, "comatch")
    config.model.name = "resnet50"
    return base.apply_arg(config, arg)
