"""What each `launch.py --mode` does, importable and testable without absl flags."""

from __future__ import annotations

import json
import logging
import os

import ml_collections

from ssl_jax import xla_cpu

MODES = ["train", "eval", "inspect", "predict"]


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


def main(
    mode: str,
    config: ml_collections.ConfigDict | None,
    workdir: str | None,
    *,
    config_path: str | None = None,
) -> dict:
    """Runs `mode`; the last line printed is a JSON summary (train, eval, inspect)."""
    logging.getLogger("absl").setLevel(logging.WARNING)
    workdir = workdir or default_workdir(config_path)
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
        if config.eval.after_training:  # eval.figures=False skips only figures and t-SNE
            result["eval"] = evaluate.evaluate_workdir(workdir, config)
        print(json.dumps(result), flush=True)
        return result
    if mode == "eval":
        from ssl_jax import evaluate

        result = evaluate.evaluate_workdir(workdir, config)
        print(json.dumps(result), flush=True)
        return result
    if mode == "inspect":
        if config is None:
            raise SystemExit("--mode inspect needs --config.")
        from ssl_jax.data.inspect import run_inspect

        return run_inspect(config, workdir)
    if mode == "predict":
        from ssl_jax import evaluate

        result = evaluate.predict_workdir(workdir, config)
        print(json.dumps(result), flush=True)
        return result
    raise ValueError(f"Unknown mode {mode!r}; expected one of {MODES}.")
