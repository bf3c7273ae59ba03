"""Thin entry point: python launch.py --config configs/<name>.py[:smoke] --workdir DIR --mode MODE.

Modes: train (resumes from the latest checkpoint in DIR), eval (restores the EMA weights and
evaluates the test split), inspect (data summary + augmentation grid), predict (classifies
--config.predict.input). Multi-process training: the same command in every process plus
--coordinator_address host:port --num_processes N --process_id i (or --distributed_auto on
Slurm / Open MPI). `--config.<key>=<value>` overrides any config field; an unknown key
is an error. For eval and predict, --config may be left out: the workdir's own config.json is
then the base the overrides apply to, e.g.

    python launch.py --workdir runs/ucm10_triplet --mode eval --config.eval.step=best

and only eval.*, predict.* and the data location (data.root, data.tfds_data_dir,
data.cache_dir, data.workers, data.eval_batch_size) may be overridden: other keys would change
the trained model.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from ssl_jax import distributed, run

CONFIG_HELP = "Config file, e.g. configs/ucm10_triplet.py or configs/demo.py:smoke."
_parsed_argv: list[str] = []


def _define_workdir_and_mode(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "workdir",
        None,
        "Run directory: checkpoints, metrics.jsonl, figures. Default: runs/<config file name>.",
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "mode",
        "train",
        run.MODES,
        "What to do with the config and workdir.",
        flag_values=flag_values,
    )
    # Multi-process training (README "Several processes and hosts"): the same command in
    # every process, each with its own --process_id.
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0, where the processes of a multi-process run meet.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "num_processes",
        None,
        "Number of processes of a multi-process run.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "process_id", None, "This process's index in [0, num_processes).", flag_values=flag_values
    )
    flags.DEFINE_bool(
        "distributed_auto",
        False,
        "Join a multi-process run that JAX detects from the cluster's environment (Slurm, "
        "Open MPI); the three flags above, where given, take precedence.",
        flag_values=flag_values,
    )


def define_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines --workdir, --mode and --config for this command line.

    --config is a config file flag, unless argv has `--config.<key>` overrides but no config
    file: then (eval/predict only) it is the workdir's config.json, checked and overridden.
    Raises `flags.Error` with a message naming what is wrong.
    """
    _define_workdir_and_mode(flag_values)
    keys = run.override_keys(argv)
    if run.config_file_given(argv) or not keys:
        config_flags.DEFINE_config_file(
            "config", None, CONFIG_HELP, flag_values=flag_values, lock_config=True, sys_argv=argv
        )
        return
    known = flags.FlagValues()  # --workdir and --mode first, to find the base config
    _define_workdir_and_mode(known)
    known(list(argv), known_only=True)
    mode, workdir = known.mode, known.workdir or run.default_workdir(None)
    if mode not in run.READ_ONLY_MODES:
        raise flags.IllegalFlagValueError(
            f"--config.{keys[0]} overrides a config file, and --mode {mode} needs one: pass "
            "--config configs/<name>.py before the overrides."
        )
    from ssl_jax import checkpoint

    try:
        base = checkpoint.load_saved_config(workdir)
    except checkpoint.CheckpointError as e:
        raise flags.IllegalFlagValueError(
            f"Without --config, the --config.<key> overrides apply to --workdir's config.json: {e}"
        ) from None
    try:
        run.check_override_keys(mode, keys, base, workdir=workdir)
    except ValueError as e:
        raise flags.IllegalFlagValueError(str(e)) from None
    config_flags.DEFINE_config_dict(
        "config",
        base,
        f"The config of --workdir ({workdir}/config.json), with --config.<key> overrides.",
        flag_values=flag_values,
        lock_config=True,
        sys_argv=argv,
    )


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Defines and parses this script's flags; returns the remaining arguments."""
    argv = list(argv)
    define_flags(argv, flag_values)
    remaining = flag_values(argv)
    _parsed_argv[:] = argv
    return remaining


def _parse_flags_with_usage(argv: list[str]) -> list[str]:
    try:
        return parse_flags(argv)
    except flags.Error as error:
        sys.stderr.write(f"FATAL Flags parsing error: {error}\n")
        sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(1)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = flag_values.config
    config_path = getattr(flag_values["config"], "config_filename", None) if config else None
    return run.main(
        flag_values.mode,
        config,
        flag_values.workdir,
        config_path=config_path,
        overrides=run.override_keys(_parsed_argv),
        launch=distributed.Launch(
            coordinator_address=flag_values.coordinator_address,
            num_processes=flag_values.num_processes,
            process_id=flag_values.process_id,
            auto=flag_values.distributed_auto,
        ),
    )


def _exit_zero_main(argv) -> None:
    """absl's app.run exits with main's return value: a result dict would exit 1."""
    main(argv)


if __name__ == "__main__":
    app.run(_exit_zero_main, flags_parser=_parse_flags_with_usage)
