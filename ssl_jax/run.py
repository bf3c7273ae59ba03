"""What each `launch.py --mode` does, importable and testable without absl flags."""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Sequence

import ml_collections

from ssl_jax import distributed, files, xla_cpu

MODES = ["train", "eval", "inspect", "predict"]
READ_ONLY_MODES = ("eval", "predict")  # they read a trained run; its config.json is the base

_CONFIG_FILE_ARG = re.compile(r"^-{1,2}config(=|$)")
_OVERRIDE_ARG = re.compile(r"^-{1,2}(?:no)?config\.([^=\s]+)")


def default_workdir(config_path: str | None) -> str:
    name = os.path.splitext(os.path.basename((config_path or "run").split(":")[0]))[0]
    return os.path.join("runs", name)


def enable_compilation_cache() -> str | None:
    """Persists compiled XLA programs so a resumed run, eval or rerun skips recompiling.

    `$JAX_COMPILATION_CACHE_DIR` (JAX's own variable) wins; otherwise ~/.cache/ssl_jax/xla;
    set it to an empty string to switch the cache off.
    """
    import jax

    path = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if path is None:
        path = os.path.join(os.path.expanduser("~"), ".cache", "ssl_jax", "xla")
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
    return path or None


def config_file_given(argv: Sequence[str]) -> bool:
    """Whether argv names a config file (`--config FILE` or `--config=FILE`)."""
    return any(_CONFIG_FILE_ARG.match(arg) for arg in argv)


def override_keys(argv: Sequence[str]) -> list[str]:
    """The dotted keys of argv's `--config.<key>=<value>` (and `--noconfig.<key>`) overrides."""
    keys = []
    for arg in argv:
        match = _OVERRIDE_ARG.match(arg)
        if match and match.group(1) not in keys:
            keys.append(match.group(1))
    return keys


def check_override_keys(
    mode: str, keys: Sequence[str], config: ml_collections.ConfigDict, *, workdir: str = ""
) -> None:
    """Refuses unknown keys, and in --mode eval/predict keys that change the trained model.

    Raises ValueError naming the key: an unknown key (with the closest known ones), or for
    eval/predict a key outside `evaluate.OVERRIDABLE_KEYS` (the model, data and training
    settings come from the run's own config.json).
    """
    from ssl_jax import checkpoint as checkpoint_lib

    leaves = checkpoint_lib.flatten_config(json.loads(config.to_json_best_effort()))
    known = set(leaves) | {k.rsplit(".", i)[0] for k in leaves for i in range(1, k.count(".") + 1)}
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(leaves), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"Unknown config key {key!r} (--config.{key}){hint}")
    if mode not in READ_ONLY_MODES:
        return
    from ssl_jax.evaluate import OVERRIDABLE_KEYS

    refused = [k for k in keys if not files.matches_key_prefix(k, OVERRIDABLE_KEYS)]
    if refused:
        where = os.path.join(workdir, "config.json") if workdir else "the workdir's config.json"
        allowed = ", ".join(k + "*" for k in OVERRIDABLE_KEYS if k.endswith("."))
        allowed += ", " + ", ".join(k for k in OVERRIDABLE_KEYS if k.startswith("data."))
        raise ValueError(
            f"--config.{refused[0]} cannot be overridden in --mode {mode}: it changes the "
            f"trained model, whose settings come from {where}"
            + (f" (also refused: {', '.join(refused[1:])})" if refused[1:] else "")
            + f". --mode {mode} accepts only: {allowed}. To change it, train a new run "
            "(--mode train with another --workdir)."
        )


class _DropMissingTpuProbe(logging.Filter):
    """Drops JAX's INFO line "Unable to initialize backend 'tpu'" when libtpu is not installed.

    JAX probes every registered platform; without libtpu the TPU probe always fails, and under
    absl (whose root logger level is INFO) that line would greet every CPU or GPU command.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unable to initialize backend 'tpu'")


def quiet_missing_tpu_probe() -> None:
    """Installs `_DropMissingTpuProbe` on JAX's backend logger (once; only without libtpu)."""
    if importlib.util.find_spec("libtpu") is not None:
        return  # a TPU machine: a failing TPU probe is news
    logger = logging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _DropMissingTpuProbe) for f in logger.filters):
        logger.addFilter(_DropMissingTpuProbe())


def main(
    mode: str,
    config: ml_collections.ConfigDict | None,
    workdir: str | None,
    *,
    config_path: str | None = None,
    overrides: Sequence[str] = (),
    launch: distributed.Launch | None = None,
) -> dict:
    """Runs `mode`; the last line printed is a JSON summary (train, eval, inspect).

    `overrides` are the dotted keys set on the command line (`--config.<key>=<value>`): for
    eval/predict only evaluation, prediction and data-location keys may be among them.
    `launch` joins a multi-process run (`ssl_jax.distributed`; --mode train only).
    """
    launch = launch or distributed.Launch()
    try:
        launch.check()
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if launch.wanted and mode != "train":
        raise SystemExit(
            f"--mode {mode} runs in one process: drop --coordinator_address, --num_processes, "
            "--process_id and --distributed_auto (a multi-process run's checkpoints evaluate "
            "in one process)."
        )
    if not launch.wanted:
        return _main(mode, config, workdir, config_path=config_path, overrides=overrides)
    xla_cpu.prefer_eigen_convolutions()  # XLA flags are read when the backend starts
    distributed.initialize(launch)
    import jax

    try:
        return _main(mode, config, workdir, config_path=config_path, overrides=overrides)
    except BaseException as err:
        # One process failing alone must not leave the others waiting in a collective (nor
        # itself in JAX's exit barrier): say why and leave now; the coordination service
        # then stops the others within distributed.HEARTBEAT_TIMEOUT_S.
        import traceback

        if isinstance(err, SystemExit) and err.code in (None, 0):
            raise
        if isinstance(err, SystemExit):
            print(err.code, file=sys.stderr)
        else:
            traceback.print_exc()
            print(
                f"Process {jax.process_index()} of {jax.process_count()} stops: "
                f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}. If another "
                "process of this run died (a failed collective says so), its log says why; "
                "rerun the same commands to resume from the last checkpoint.",
                file=sys.stderr,
            )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def _main(mode, config, workdir, *, config_path, overrides) -> dict:
    quiet_missing_tpu_probe()
    logging.getLogger("absl").setLevel(logging.WARNING)
    workdir = workdir or default_workdir(config_path)
    if mode in READ_ONLY_MODES and overrides and config is not None:
        try:
            check_override_keys(mode, overrides, config, workdir=workdir)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    xla_cpu.prefer_eigen_convolutions()
    enable_compilation_cache()
    if mode == "train":
        if config is None:
            raise SystemExit("--mode train needs --config (e.g. configs/ucm10_triplet.py).")
        from ssl_jax import evaluate, train

        meta = train.train_and_evaluate(config, workdir)
        result = {
            "workdir": os.path.abspath(workdir),
            "step": meta.get("step"),
            "best_top1": meta.get("best_top1"),
            "mean_top1_last": meta.get("mean_top1_last"),
        }
        # eval.figures=False skips only figures and t-SNE; process 0 evaluates a multi-process
        # run's last checkpoint alone (the others wait for it in JAX's exit barrier).
        if config.eval.after_training and distributed.is_primary():
            result["eval"] = evaluate.evaluate_workdir(workdir, config)
        print(json.dumps(result), flush=True)
        return result
    if mode == "eval":
        from ssl_jax import evaluate

        result = evaluate.evaluate_workdir(workdir, config, explicit=overrides)
        print(json.dumps(result), flush=True)
        return result
    if mode == "inspect":
        if config is None:
            raise SystemExit("--mode inspect needs --config.")
        from ssl_jax.data.inspect import run_inspect

        return run_inspect(config, workdir)
    if mode == "predict":
        from ssl_jax import predict

        result = predict.predict_workdir(workdir, config, explicit=overrides)
        print(json.dumps(result), flush=True)
        return result
    raise ValueError(f"Unknown mode {mode!r}; expected one of {MODES}.")
