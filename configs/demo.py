"""Quickstart: CoMatch+Triplet on the 200-image UCM10 sample shipped inside the package.

Run:    pip install -e .  &&  python launch.py --config configs/demo.py --workdir runs/demo
Smoke:  python launch.py --config configs/demo.py:smoke --workdir /tmp/demo_smoke
Result: on a 2-core CPU (shared, load ~4) with a cold XLA cache (JAX_COMPILATION_CACHE_DIR=),
        the whole command took 2 min 38 s (training 2 min 18 s incl. compiling, then eval and
        figures): EMA top-1 71 % (top-5 98 %, best 75 %, balanced accuracy 71 %, Cohen's kappa
        0.68), leave-one-out kNN@1 68 %, MAP@R 42 % on the 100 test images (chance: 10 %).
        Expect a few points either way on other CPUs (XLA float reassociation).

The sample (`ssl_jax/sample_data/ucm10_sample`, 20 public-domain UCM images per paper class,
see its README.md) is split 50/50 per class with a seeded draw; 4 labels per class (40
labelled images; unlabelled = all 100 training images, docs/method.md#protocols), 100 test images.
Training is followed by `--mode eval`'s report: eval/<step>/metrics.json, the confusion
matrix, t-SNE of the test embeddings (now and at the epochs in `train.save_embeddings_epochs`)
and the training curves.
"""

import importlib.resources

from configs import base


def sample_root() -> str:
    """The sample's folder inside the installed (or checked-out) ssl_jax package."""
    return str(importlib.resources.files("ssl_jax").joinpath("sample_data", "ucm10_sample"))


def get_config(arg=None):
    config = base.get_config()
    base.use_method(config, "triplet")
    data = config.data
    data.name = "ucm10_sample"
    data.root = sample_root()
    data.split_lists = ""  # a seeded per-class split of the folder
    data.test_fraction = 0.5
    data.classes = base.UCM10_CLASSES
    data.protocol = "k_per_class"
    data.labels_per_class = 4
    data.batch_size = 8
    data.mu = 2
    data.eval_batch_size = 100

    config.model.width = 0.25
    config.model.low_dim = 64
    config.algorithm.queue_batch = 2
    config.ema.decay = 0.99

    t = config.train
    t.total_steps = 960
    t.steps_per_epoch = 32
    t.log_every = 16
    t.checkpoint_every = 32
    t.save_embeddings_epochs = (1, 10, 20, -1)
    config.eval.tsne_perplexity = 30.0
    return base.apply_arg(config, arg)
