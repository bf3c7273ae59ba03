"""Evaluation and prediction from a training workdir's Orbax checkpoints (EMA weights only).

    evaluate_workdir(workdir)   # --mode eval: eval/<step>/metrics.json, figures, embeddings.npz
    predict_workdir(workdir)    # --mode predict (in ssl_jax.predict): a CSV of classes

`eval/<step>/metrics.json` holds, for the EMA weights (and with `config.eval.online` also for the
online weights, under "online"): top-1/top-5, per-class accuracy by class name, balanced
accuracy, macro precision/recall/F1 (all in percent), Cohen's kappa (in [-1, 1]), the number of
test images, the checkpoint step, the protocol and split hash, and the retrieval metrics of
`ssl_jax.retrieval` on the 64-d test embeddings (models with a projection head only).

A several-seed run (`config.num_seeds` > 1) is evaluated seed by seed: each seed's files go to
`<workdir>/seed_<s>/eval/<step>/`, and `<workdir>/eval/<step>/metrics.json` holds `per_seed`
(each seed's headline numbers), `top1_mean` and `top1_std` (sample standard deviation).
`--mode predict` uses one seed: `--config.predict.seed`, or by default the best by EMA top-1.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import jax
import ml_collections
import numpy as np

from ssl_jax import checkpoint as checkpoint_lib
from ssl_jax import data as data_lib
from ssl_jax import figures as figures_lib
from ssl_jax import files, inference, metric_writers, retrieval, train_state
from ssl_jax.algorithms import get_algorithm
from ssl_jax.data.sources import DataError

# Sections of a command-line config that apply to evaluating an existing run.
EVAL_OVERRIDES = ("eval", "predict")
# Where the data is and how it is read; not what the model was trained on.
DATA_OVERRIDES = ("root", "tfds_data_dir", "workers", "cache_dir", "eval_batch_size")
# The `--config.<key>` overrides --mode eval/predict accept (the rest change the trained model).
OVERRIDABLE_KEYS = (
    *(p for section in EVAL_OVERRIDES for p in (section, section + ".")),
    *(f"data.{key}" for key in DATA_OVERRIDES),
)


def resolve_config(
    workdir: str, cli_config: ml_collections.ConfigDict | None, *, explicit=()
) -> ml_collections.ConfigDict:
    """The run's saved config, with eval/predict options (and data location) from the CLI.

    A data root the run trained on that still exists is kept, unless `explicit` (the dotted
    keys overridden on the command line) names `data.root`.
    """
    config = checkpoint_lib.load_saved_config(workdir)
    if cli_config is not None:
        for section in EVAL_OVERRIDES:
            config[section] = ml_collections.ConfigDict(cli_config[section].to_dict())
        for key in DATA_OVERRIDES:
            if key not in cli_config.data:
                continue
            if (
                key == "root"
                and os.path.isdir(config.data.root or "")
                and "data.root" not in explicit
            ):
                continue  # the saved root still exists: keep what the run trained on
            config.data[key] = cli_config.data[key]
    return config


# ------------------------------------------------------------------------------- restoring


def num_seeds(config: ml_collections.ConfigDict) -> int:
    return int(config.get("num_seeds", 1))


def seed_dir(workdir: str, seed: int) -> str:
    """Where seed `seed`'s files of a several-seed run are (`ssl_jax.train.seed_dir`)."""
    return os.path.join(workdir, f"seed_{seed}")


def split_path(workdir: str, config: ml_collections.ConfigDict) -> str:
    """The split.json of `config.seed` (in its seed folder for a several-seed run)."""
    if num_seeds(config) > 1:
        return os.path.join(seed_dir(workdir, int(config.seed)), "split.json")
    return os.path.join(workdir, "split.json")


def seed_variables(variables, index: int):
    """Seed number `index` (0-based) of variables restored with a leading seed axis."""
    return {name: _take(tree, index) for name, tree in variables.items()}


def _take(tree, index):
    if isinstance(tree, dict):
        return {k: _take(v, index) for k, v in tree.items()}
    return np.asarray(tree)[index]


def saved_class_names(workdir: str, config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Class names in label order: the config's list, else those the data layer recorded."""
    if config.data.classes:
        return tuple(config.data.classes)
    path = split_path(workdir, config)
    if not os.path.exists(path):
        raise checkpoint_lib.CheckpointError(
            f"{path} not found and config.data.classes is empty, so the class names of "
            f"{workdir!r} are unknown; train into it with --mode train first."
        )
    with open(path) as f:
        saved = json.load(f)
    return tuple(saved["classes"])


def _describe_model(config, num_classes: int, projection: bool) -> str:
    head = f"projection to {config.model.low_dim}" if projection else "no projection head"
    return (
        f"{config.model.name}, width {config.model.width}, {head}, {num_classes} classes, "
        f"algorithm {config.algorithm.name}"
    )


def restore_model(
    workdir: str, config: ml_collections.ConfigDict, *, which=None, online: bool = False
):
    """(model, variables, step, meta) for the chosen checkpoint of `workdir`.

    Several seeds: the variables carry a leading seed axis (`seed_variables` picks one).
    """
    algorithm = get_algorithm(config.algorithm.name)
    num_classes = len(saved_class_names(workdir, config))
    model = train_state.build_model(config, num_classes, algorithm)
    abstract = train_state.abstract_variables(model, config)
    if num_seeds(config) > 1:  # the checkpoint holds every seed, stacked on a leading axis
        n = num_seeds(config)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n, *x.shape), x.dtype), abstract)
    checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
    try:
        step = checkpointer.select_step(config.eval.step if which is None else which)
        variables, meta = checkpointer.restore_for_eval(
            step,
            abstract,
            online=online,
            describe=_describe_model(config, num_classes, algorithm.needs_projection),
        )
    finally:
        checkpointer.close()
    return model, variables, step, meta


# -------------------------------------------------------------------------------- metrics


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(predictions)), 1)
    return cm


def classification_metrics(logits, labels, class_names) -> tuple[dict, np.ndarray]:
    """Accuracy-type numbers in percent (+ Cohen's kappa) and the confusion matrix.

    Macro averages run over the classes present in the labels or the predictions (as
    scikit-learn's defaults do); an undefined precision (class never predicted) counts as 0.
    """
    from sklearn.metrics import cohen_kappa_score

    labels = np.asarray(labels, np.int64)
    predictions = np.argmax(logits, axis=1).astype(np.int64)
    cm = confusion_matrix(labels, predictions, len(class_names))
    true_counts, predicted_counts, correct = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    recall = np.divide(correct, true_counts, out=np.zeros(len(cm)), where=true_counts > 0)
    precision = np.divide(
        correct, predicted_counts, out=np.zeros(len(cm)), where=predicted_counts > 0
    )
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros(len(cm)), where=denominator > 0
    )
    seen = (true_counts > 0) | (predicted_counts > 0)
    in_test = true_counts > 0
    result = {
        "top1": inference.topk_accuracy(np.asarray(logits), labels, 1),
        "top5": inference.topk_accuracy(np.asarray(logits), labels, 5),
        "num_test": int(len(labels)),
        "per_class_accuracy": {
            # 100 * correct / count (not 100 * recall): 29 of 50 reads 58.0, not 57.99999999999999
            name: (float(100.0 * correct[c] / true_counts[c]) if in_test[c] else None)
            for c, name in enumerate(class_names)
        },
        "per_class_count": {name: int(true_counts[c]) for c, name in enumerate(class_names)},
        "balanced_accuracy": float(100.0 * np.mean(recall[in_test])),
        "macro_precision": float(100.0 * np.mean(precision[seen])),
        "macro_recall": float(100.0 * np.mean(recall[seen])),
        "macro_f1": float(100.0 * np.mean(f1[seen])),
        "cohen_kappa": float(cohen_kappa_score(labels, predictions)),
    }
    return result, cm


def embedding_metrics(arrays: dict, algorithm_name: str) -> dict:
    if "embeddings" not in arrays:
        return {
            "available": False,
            "reason": f"{algorithm_name} trains no projection head, so there are no embeddings: "
            "no kNN, precision@1, MAP@R, t-SNE or embeddings.npz",
        }
    return {
        "available": True,
        **retrieval.retrieval_metrics(arrays["embeddings"], arrays["labels"]),
    }


def _predict_test(model, variables, data, config):
    """Predictions on the test split, centre-cropped to the size the run trained at."""
    batches = data_lib.test_batches(
        data.test, int(config.data.eval_batch_size), crop_size=int(config.data.crop_size)
    )
    return inference.predict_arrays(model, variables, batches)


# ------------------------------------------------------------------------------ evaluation


def _load_test_data(workdir: str, config: ml_collections.ConfigDict):
    """The run's data, without rewriting its split.json; warns when the split has changed."""
    data = data_lib.load_dataset(config, workdir=workdir, write_split=False)
    warnings = []
    path = split_path(workdir, config)
    if os.path.exists(path):
        with open(path) as f:
            trained_hash = json.load(f).get("split_hash")
        if trained_hash and trained_hash != data.split_hash:
            warnings.append(
                f"The split now read (hash {data.split_hash}) differs from the one the run "
                f"trained on (hash {trained_hash}, {path}): the data root, its files or "
                "the split lists changed, so these numbers are not the run's test numbers."
            )
    return data, warnings


def evaluate_workdir(
    workdir: str, cli_config: ml_collections.ConfigDict | None = None, *, explicit=()
) -> dict:
    """Evaluates the chosen checkpoint on the test split; writes eval/<step>/ (see module doc)."""
    workdir = os.path.abspath(workdir)
    config = resolve_config(workdir, cli_config, explicit=explicit)
    model, variables, step, meta = restore_model(workdir, config)
    class_names = saved_class_names(workdir, config)
    data, warnings = _load_test_data(workdir, config)
    if tuple(data.class_names) != class_names:
        raise DataError(
            f"The data now has classes {list(data.class_names)}, the run was trained on "
            f"{list(class_names)}; point --config.data.root at the run's dataset."
        )
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    online_variables = None
    if config.eval.online:
        _, online_variables, _, _ = restore_model(workdir, config, which=step, online=True)
    if num_seeds(config) == 1:
        return _evaluate_variables(
            workdir, workdir, config, model, variables, online_variables, step, meta, data,
            warnings, class_names,
        )  # fmt: skip
    seeds = [int(config.seed) + i for i in range(num_seeds(config))]
    per_seed = {}
    for i, seed in enumerate(seeds):
        seed_meta = {
            **meta.get("seeds", {}).get(str(seed), {}),
            "train_seconds": meta.get("train_seconds"),
        }
        seed_meta = {k: v for k, v in seed_meta.items() if v is not None}
        result = _evaluate_variables(
            workdir,
            seed_dir(workdir, seed),
            config,
            model,
            seed_variables(variables, i),
            None if online_variables is None else seed_variables(online_variables, i),
            step,
            seed_meta,
            data,
            warnings,
            class_names,
            seed=seed,
        )
        print(f"[seed {seed}] step {step}: EMA top-1 {result['top1']:.2f}", flush=True)
        per_seed[str(seed)] = {
            k: result[k]
            for k in ("top1", "top5", "balanced_accuracy", "macro_f1", "cohen_kappa", "output_dir")
        }
    top1 = [r["top1"] for r in per_seed.values()]
    summary = {
        "step": int(step),
        "weights": "ema",
        "num_seeds": len(seeds),
        "seeds": seeds,
        "protocol": data.protocol,
        "algorithm": config.algorithm.name,
        "model": config.model.name,
        "dataset": config.data.name,
        "per_seed": per_seed,
        "top1_mean": float(np.mean(top1)),
        "top1_std": float(np.std(top1, ddof=1)),
        "top5_mean": float(np.mean([r["top5"] for r in per_seed.values()])),
    }
    if warnings:
        summary["warnings"] = warnings
    out_dir = os.path.join(workdir, "eval", str(step))
    os.makedirs(out_dir, exist_ok=True)
    summary["output_dir"] = out_dir
    files.atomic_write_json(summary, os.path.join(out_dir, "metrics.json"))
    print(
        f"step {step}: EMA top-1 {summary['top1_mean']:.2f} ± {summary['top1_std']:.2f} over "
        f"seeds {seeds[0]}-{seeds[-1]}",
        flush=True,
    )
    return summary


def _evaluate_variables(
    workdir, out_root, config, model, variables, online_variables, step, meta, data, warnings,
    class_names, *, seed=None,
) -> dict:  # fmt: skip
    """Metrics, predictions and figures of one set of weights in `<out_root>/eval/<step>/`."""
    arrays = _predict_test(model, variables, data, config)
    result, cm = classification_metrics(arrays["logits"], arrays["labels"], class_names)
    result = {
        "step": int(step),
        "weights": "ema",
        **({} if seed is None else {"seed": int(seed)}),
        "protocol": data.protocol,
        "split_hash": data.split_hash,
        "algorithm": config.algorithm.name,
        "model": config.model.name,
        "dataset": config.data.name,
        **result,
        "embedding_metrics": embedding_metrics(arrays, config.algorithm.name),
        "training": {
            k: meta[k] for k in ("best_top1", "mean_top1_last", "train_seconds") if k in meta
        },
    }
    if warnings:
        result["warnings"] = warnings
    if online_variables is not None:
        online_arrays = _predict_test(model, online_variables, data, config)
        online, _ = classification_metrics(
            online_arrays["logits"], online_arrays["labels"], class_names
        )
        online["embedding_metrics"] = embedding_metrics(online_arrays, config.algorithm.name)
        result["online"] = online

    out_dir = os.path.join(out_root, "eval", str(step))
    os.makedirs(out_dir, exist_ok=True)
    per_image = {  # saved beside both the logits and the embeddings
        "labels": arrays["labels"],
        "predictions": np.argmax(arrays["logits"], axis=1).astype(np.int32),
        "files": np.asarray(data.test.files),
        "class_names": np.asarray(class_names),
    }
    np.savez_compressed(
        os.path.join(out_dir, "predictions.npz"), logits=arrays["logits"], **per_image
    )
    if "embeddings" in arrays:
        np.savez_compressed(
            os.path.join(out_dir, "embeddings.npz"),
            embeddings=arrays["embeddings"],
            step=np.int32(step),
            **per_image,
        )
    figures_lib.write_confusion_csv(cm, class_names, os.path.join(out_dir, "confusion_matrix.csv"))
    result["figures"] = (
        draw_figures(out_root, out_dir, config, cm, class_names, arrays, step)
        if config.eval.figures
        else []
    )
    if config.eval.figures and "embeddings" in arrays:
        result["tsne_perplexity"] = figures_lib.tsne_perplexity(
            config.eval.tsne_perplexity, len(arrays["labels"])
        )
    result["output_dir"] = out_dir
    files.atomic_write_json(result, os.path.join(out_dir, "metrics.json"))
    return result


def draw_figures(workdir, out_dir, config, cm, class_names, arrays, step) -> list[str]:
    """Confusion matrix, t-SNE (now and over the saved epochs) and training curves."""
    name = f"{config.algorithm.name} on {config.data.name}, step {step}"
    perplexity = float(config.eval.tsne_perplexity)
    drawn = [
        figures_lib.plot_confusion_matrix(
            cm, class_names, os.path.join(out_dir, "confusion_matrix.png"), title=name
        )
    ]
    if "embeddings" in arrays:
        drawn.append(
            figures_lib.plot_tsne(
                arrays["embeddings"],
                arrays["labels"],
                class_names,
                os.path.join(out_dir, "tsne.png"),
                perplexity=perplexity,
                seed=int(config.seed),
            )
        )
        saved = sorted(glob.glob(os.path.join(workdir, "embeddings", "epoch_*.npz")))
        if saved:
            panels = []
            for path in saved:
                with np.load(path) as z:
                    panels.append({k: z[k] for k in ("embeddings", "labels", "epoch")})
            drawn.append(
                figures_lib.plot_tsne_epochs(
                    panels,
                    class_names,
                    os.path.join(out_dir, "tsne_epochs.png"),
                    perplexity=perplexity,
                    seed=int(config.seed),
                )
            )
    drawn.append(
        figures_lib.plot_training_curves(
            metric_writers.read_metrics(workdir),
            os.path.join(out_dir, "training_curves.png"),
            mean_of_last=int(config.train.mean_of_last),
        )
    )
    return [os.path.basename(p) for p in drawn if p]
