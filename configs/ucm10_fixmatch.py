"""FixMatch baseline on UCM10 with 4 labels per class.

Run:    python launch.py --config configs/ucm10_fixmatch.py
Smoke:  python launch.py --config configs/ucm10_fixmatch.py:smoke --workdir /tmp/smoke
Result: ResNet-18 at 60 px, 524,288 steps, EMA top-1 reported each 1024-step epoch. The paper
        reports this method's Top1/Best-Top1 in its tables for the seed_code protocol
        (--config.data.protocol=seed_code, docs/method.md#protocols); ssl_jax's own full-length
        numbers are recorded in README.md "Results" once measured.
"""

from configs import base


def get_config(arg=None):
    config = base.get_config()
    base.use_dataset(config, "ucm10")
    base.use_method(config, "fixmatch")
    return base.apply_arg(config, arg)
