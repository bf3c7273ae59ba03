"""--mode predict: classes of new images from a training workdir's EMA weights, as a CSV.

    predict_workdir(workdir)    # a CSV of classes for --config.predict.input

Each image gets the test view the run was evaluated with (Resize + CentreCrop). The CSV holds,
per file, the predicted class and its probability, the class named by the image's folder (if
any) and the top-5 classes with their probabilities. A several-seed run predicts with one seed:
`--config.predict.seed`, or by default the best by EMA top-1 (`choose_seed`).
"""

from __future__ import annotations

import csv
import os

import ml_collections
import numpy as np

from ssl_jax import checkpoint as checkpoint_lib
from ssl_jax import data as data_lib
from ssl_jax import evaluate as evaluate_lib
from ssl_jax import inference
from ssl_jax.data import augment_host
from ssl_jax.data.sources import (
    IMAGE_EXTENSIONS,
    DataError,
    is_image_file,
    is_unsupported_image_file,
    unsupported_files_message,
)

TOP_K = 5  # classes listed per image by --mode predict


def find_images(path: str) -> list[str]:
    """`path` itself if it is a file, else every image below the folder (recursive, sorted).

    Files with an image extension the loader does not read (.bmp, .webp, .gif, ...) are an
    error listing them all, never skipped silently.
    """
    if not path:
        raise DataError(
            "--mode predict needs --config.predict.input=PATH: an image file or a folder of "
            f"images ({'/'.join(IMAGE_EXTENSIONS)})."
        )
    where = f"--config.predict.input {path!r}"
    if os.path.isfile(path):
        if is_unsupported_image_file(path):
            raise DataError(unsupported_files_message([path], where))
        return [path]
    if not os.path.isdir(path):
        raise DataError(
            f"config.predict.input {path!r} does not exist (expected a file or folder)."
        )
    found, unsupported = [], []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if is_image_file(name):
                found.append(os.path.join(dirpath, name))
            elif is_unsupported_image_file(name):
                unsupported.append(os.path.join(dirpath, name))
    if unsupported:
        raise DataError(unsupported_files_message(unsupported, where))
    if not found:
        raise DataError(
            f"No images ({'/'.join(IMAGE_EXTENSIONS)}) under {path!r} for --mode predict."
        )
    return found


def load_prediction_images(files: list[str], size: int, crop_size: int) -> list[np.ndarray]:
    """Test views (Resize(size) + CentreCrop(crop_size)) of every file; one error lists all bad
    files. Pass the run's `data.image_size` and `data.crop_size`, as evaluation does."""
    views, bad = [], []
    for path in files:
        try:
            image = data_lib.load_image(path, size)
            views.append(augment_host.test_view(image, crop_size=crop_size))
        except DataError as e:
            bad.append(f"  {path}: {e.__cause__ or e}")
    if bad:
        raise DataError(
            f"{len(bad)} of {len(files)} image(s) could not be read for --mode predict:\n"
            + "\n".join(bad)
            + f"\nExpected readable {'/'.join(IMAGE_EXTENSIONS)} images; fix or remove these."
        )
    return views


def predict_workdir(
    workdir: str, cli_config: ml_collections.ConfigDict | None = None, *, explicit=()
) -> dict:
    """Classifies config.predict.input; writes a CSV (file, class, confidence, top-5)."""
    workdir = os.path.abspath(workdir)
    config = evaluate_lib.resolve_config(workdir, cli_config, explicit=explicit)
    source = config.predict.input
    files = find_images(source)
    class_names = evaluate_lib.saved_class_names(workdir, config)
    views = load_prediction_images(files, int(config.data.image_size), int(config.data.crop_size))
    model, variables, step, meta = evaluate_lib.restore_model(workdir, config)
    chosen = None
    if evaluate_lib.num_seeds(config) > 1:
        chosen = choose_seed(config, meta)
        print(chosen["why"], flush=True)
        variables = evaluate_lib.seed_variables(variables, chosen["seed"] - int(config.seed))
    probabilities = inference.predict_probabilities(
        model, variables, views, config.data.eval_batch_size
    )

    output = config.predict.output or os.path.join(workdir, "predictions.csv")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    k = min(TOP_K, len(class_names))
    header = ["file", "predicted_class", "confidence", "folder_class"]
    for i in range(1, k + 1):
        header += [f"top{i}_class", f"top{i}_prob"]
    known, correct = 0, 0
    with open(output, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for path, probs in zip(files, probabilities, strict=True):
            order = np.argsort(-probs, kind="stable")[:k]
            folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
            folder_class = folder if folder in class_names else ""
            if folder_class:
                known += 1
                correct += int(class_names[order[0]] == folder_class)
            row = [path, class_names[order[0]], f"{probs[order[0]]:.6f}", folder_class]
            for c in order:
                row += [class_names[c], f"{probs[c]:.6f}"]
            writer.writerow(row)
    summary = {
        "output": os.path.abspath(output),
        "num_images": len(files),
        "step": int(step),
        "input": source,
    }
    if chosen is not None:
        summary["seed"] = chosen["seed"]
        summary["seed_choice"] = chosen["why"]
    if known:
        # Images inside a folder named after a class: how often the prediction agrees with it.
        summary["num_in_class_folders"] = known
        summary["folder_class_accuracy"] = float(100.0 * correct / known)
    print(f"Wrote {len(files)} predictions to {summary['output']}.", flush=True)
    return summary


def choose_seed(config: ml_collections.ConfigDict, meta: dict) -> dict:
    """{"seed", "why"}: `config.predict.seed`, or (-1, the default) the seed whose EMA top-1 at
    the checkpoint's last evaluation is the highest (the lowest seed among equals)."""
    seeds = [int(config.seed) + i for i in range(evaluate_lib.num_seeds(config))]
    requested = int(config.predict.get("seed", -1))
    if requested >= 0:
        if requested not in seeds:
            raise checkpoint_lib.CheckpointError(
                f"config.predict.seed={requested} is not a seed of this run (seeds "
                f"{seeds[0]}-{seeds[-1]}); choose one of them or -1 for the best."
            )
        return {
            "seed": requested,
            "why": f"Predicting with seed {requested} (config.predict.seed).",
        }
    top1 = {}
    for seed in seeds:
        history = meta.get("seeds", {}).get(str(seed), {}).get("eval_top1_history", [])
        if history:
            top1[seed] = float(history[-1])
    if not top1:
        return {
            "seed": seeds[0],
            "why": f"Predicting with seed {seeds[0]}: the checkpoint holds no evaluation to "
            "choose by (set --config.predict.seed to choose).",
        }
    best = max(top1, key=lambda s: (top1[s], -s))
    listed = ", ".join(f"seed {s}: {v:.2f}" for s, v in top1.items())
    return {
        "seed": best,
        "why": f"Predicting with seed {best}, the best by EMA top-1 at this checkpoint ({listed}); "
        "--config.predict.seed=S chooses another.",
    }
