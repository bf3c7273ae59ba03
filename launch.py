"""Thin entry point: python launch.py --config configs/<name>.py[:smoke] --workdir DIR --mode MODE.

Modes: train (resumes from the latest checkpoint in DIR), eval (restores the EMA weights and
evaluates the test split), inspect (data summary + augmentation grid), predict (classifies
--config.predict.input). `--config.<key>=<value>` overrides any config field; an unknown key
is an error.
"""

from absl import app, flags
from ml_collections import config_flags

from ssl_jax import run

config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, e.g. configs/ucm10_triplet.py or configs/demo.py:smoke.",
    lock_config=True,
)
flags.DEFINE_string(
    "workdir",
    None,
    "Run directory: checkpoints, metrics.jsonl, figures. Default: runs/<config file name>.",
)
flags.DEFINE_enum("mode", "train", run.MODES, "What to do with the config and workdir.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config_path = FLAGS["config"].config_filename if FLAGS.config is not None else None
    run.main(FLAGS.mode, FLAGS.config, FLAGS.workdir, config_path=config_path)


if __name__ == "__main__":
    app.run(main)
