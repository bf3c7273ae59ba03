"""Evaluation and prediction from a training workdir's Orbax checkpoints (EMA weights only).

    evaluate_workdir(workdir)   # --mode eval: eval/<step>/metrics.json, figures, embeddings.npz
    predict_workdir(workdir)    # --mode predict: a CSV of classes for --config.predict.input

`eval/<step>/metrics.json` holds, for the EMA weights (and with `config.eval.online` also for the
online weights, under "online"): top-1/top-5, per-class accuracy by class name, balanced
accuracy, macro precision/recall/F1 (all in percent), Cohen's kappa (in [-1, 1]), the number of
test images, the checkpoint step, the protocol and split hash, and the retrieval metrics of
`ssl_jax.retrieval` on the 64-d test embeddings (models with a projection head only).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssl_jax import checkpoint as checkpoint_lib
from ssl_jax import data as data_lib
from ssl_jax import figures as figures_lib
from ssl_jax import metric_writers, retrieval, train
from ssl_jax.algorithms import get_algorithm
from ssl_jax.data import augment_host
from ssl_jax.data.sources import IMAGE_EXTENSIONS, DataError, is_image_file

# Sections of a command-line config that apply to evaluating an existing run.
EVAL_OVERRIDES = ("eval", "predict")
DATA_OVERRIDES = ("root", "workers", "cache_dir", "eval_batch_size")
TOP_K = 5  # classes listed per image by --mode predict


def resolve_config(workdir: str, cli_config: ml_collections.ConfigDict | None):
    """The run's saved config, with eval/predict options (and data location) from the CLI."""
    config = checkpoint_lib.load_saved_config(workdir)
    if cli_config is not None:
        for section in EVAL_OVERRIDES:
            config[section] = ml_collections.ConfigDict(cli_config[section].to_dict())
        for key in DATA_OVERRIDES:
            if key == "root" and os.path.isdir(config.data.root or ""):
                continue  # the saved root still exists: keep what the run trained on
            config.data[key] = cli_config.data[key]
    return config


# ------------------------------------------------------------------------------- restoring


def saved_class_names(workdir: str, config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Class names in label order: the config's list, else those the data layer recorded."""
    if config.data.classes:
        return tuple(config.data.classes)
    path = os.path.join(workdir, "split.json")
    if not os.path.exists(path):
        raise checkpoint_lib.CheckpointError(
            f"{path} not found and config.data.classes is empty, so the class names of "
            f"{workdir!r} are unknown; train into it with --mode train first."
        )
    with open(path) as f:
        saved = json.load(f)
    return tuple(saved.get("classes") or saved["class_names"])


def _describe_model(config, num_classes: int, projection: bool) -> str:
    head = f"projection to {config.model.low_dim}" if projection else "no projection head"
    return (
        f"{config.model.name}, width {config.model.width}, {head}, {num_classes} classes, "
        f"algorithm {config.algorithm.name}"
    )


def _shapes_by_path(tree, prefix: str) -> dict[str, tuple]:
    return {
        prefix + "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def check_checkpoint_matches_model(step_dir: str, abstract: dict, *, online: bool, describe: str):
    """Compares the parameter names and shapes in a checkpoint with the model's, before restoring.

    Orbax's partial restore silently keeps the checkpoint's shapes and leaves absent entries
    unfilled, so a config.json edited to another model would otherwise give garbage.
    """
    import orbax.checkpoint as ocp
    from etils import epath

    state_dir = os.path.join(step_dir, "state")
    if not os.path.isdir(state_dir):
        return  # an unfamiliar layout: the check after restoring still applies
    saved_tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
    prefix = "" if online else "ema_"
    problems = []
    for name in ("params", "batch_stats"):
        expected = _shapes_by_path(abstract.get(name, {}), f"{name}/")
        stored = saved_tree[f"{prefix}{name}"] if f"{prefix}{name}" in saved_tree else {}
        saved = _shapes_by_path(stored, f"{name}/")
        problems += [
            f"{k}: missing from the checkpoint" for k in sorted(set(expected) - set(saved))
        ]
        problems += [
            f"{k}: in the checkpoint, not in the model" for k in sorted(set(saved) - set(expected))
        ]
        problems += [
            f"{k}: checkpoint shape {saved[k]}, model shape {expected[k]}"
            for k in sorted(set(saved) & set(expected))
            if saved[k] != expected[k]
        ]
    if problems:
        raise checkpoint_lib.CheckpointError(
            f"The checkpoint {step_dir} was not written by the model that config.json describes "
            f"({describe}): {len(problems)} mismatch(es), e.g. " + "; ".join(problems[:4]) + ". "
            "Was config.json edited or the checkpoint copied from another run? Restore "
            "config.json from the run that wrote the checkpoint."
        )


def restore_model(
    workdir: str, config: ml_collections.ConfigDict, *, which=None, online: bool = False
):
    """(model, variables, step, meta) for the chosen checkpoint of `workdir`."""
    algorithm = get_algorithm(config.algorithm.name)
    num_classes = len(saved_class_names(workdir, config))
    model = train.build_model(config, num_classes, algorithm)
    size = config.data.crop_size
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    describe = _describe_model(config, num_classes, algorithm.needs_projection)
    checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
    try:
        step = checkpointer.select_step(config.eval.step if which is None else which)
        check_checkpoint_matches_model(
            os.path.join(checkpointer.directory, str(step)),
            abstract,
            online=online,
            describe=describe,
        )
        variables, meta = checkpointer.restore_for_eval(step, abstract, online=online)
    finally:
        checkpointer.close()
    wrong = [
        path
        for path, (got, want) in _paired_leaves(variables, abstract)
        if not isinstance(got, np.ndarray | jax.Array) or tuple(got.shape) != tuple(want.shape)
    ]
    if wrong:
        raise checkpoint_lib.CheckpointError(
            f"Checkpoint {step} of {workdir} does not hold the model config.json describes "
            f"({describe}); unmatched entries: {wrong[:4]}."
        )
    return model, variables, step, meta


def _paired_leaves(variables, abstract):
    wanted = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
    flat_want = dict(jax.tree_util.tree_leaves_with_path(wanted))
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        variables, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)
    ):
        if path in flat_want:
            yield jax.tree_util.keystr(path), (leaf, flat_want[path])


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
        "top1": train.topk_accuracy(np.asarray(logits), labels, 1),
        "top5": train.topk_accuracy(np.asarray(logits), labels, 5),
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


def _predict_test(model, variables, data, batch_size):
    return train.predict_arrays(model, variables, data_lib.test_batches(data.test, batch_size))


# ------------------------------------------------------------------------------ evaluation


def _load_test_data(workdir: str, config: ml_collections.ConfigDict):
    """The run's data, without rewriting its split.json; warns when the split has changed."""
    data = data_lib.load_dataset(config, workdir=workdir, write_split=False)
    warnings = []
    split_path = os.path.join(workdir, "split.json")
    if os.path.exists(split_path):
        with open(split_path) as f:
            trained_hash = json.load(f).get("split_hash")
        if trained_hash and trained_hash != data.split_hash:
            warnings.append(
                f"The split now read (hash {data.split_hash}) differs from the one the run "
                f"trained on (hash {trained_hash}, {split_path}): the data root, its files or "
                "the split lists changed, so these numbers are not the run's test numbers."
            )
    return data, warnings


def evaluate_workdir(workdir: str, cli_config: ml_collections.ConfigDict | None = None) -> dict:
    """Evaluates the chosen checkpoint on the test split; writes eval/<step>/ (see module doc)."""
    workdir = os.path.abspath(workdir)
    config = resolve_config(workdir, cli_config)
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

    arrays = _predict_test(model, variables, data, config.data.eval_batch_size)
    result, cm = classification_metrics(arrays["logits"], arrays["labels"], class_names)
    result = {
        "step": int(step),
        "weights": "ema",
        "protocol": data.protocol,
        "split_hash": data.split_hash,
        "algorithm": config.algorithm.name,
        "model": config.model.name,
        "dataset": config.data.get("name", ""),
        **result,
        "embedding_metrics": embedding_metrics(arrays, config.algorithm.name),
        "training": {
            k: meta[k] for k in ("best_top1", "mean_top1_last", "train_seconds") if k in meta
        },
    }
    if warnings:
        result["warnings"] = warnings
    if config.eval.online:
        _, online_variables, _, _ = restore_model(workdir, config, which=step, online=True)
        online_arrays = _predict_test(model, online_variables, data, config.data.eval_batch_size)
        online, _ = classification_metrics(
            online_arrays["logits"], online_arrays["labels"], class_names
        )
        online["embedding_metrics"] = embedding_metrics(online_arrays, config.algorithm.name)
        result["online"] = online

    out_dir = os.path.join(workdir, "eval", str(step))
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
        draw_figures(workdir, out_dir, config, cm, class_names, arrays, step)
        if config.eval.figures
        else []
    )
    if config.eval.figures and "embeddings" in arrays:
        result["tsne_perplexity"] = figures_lib.tsne_perplexity(
            config.eval.tsne_perplexity, len(arrays["labels"])
        )
    result["output_dir"] = out_dir
    train.dump_json(result, os.path.join(out_dir, "metrics.json"))
    return result


def draw_figures(workdir, out_dir, config, cm, class_names, arrays, step) -> list[str]:
    """Confusion matrix, t-SNE (now and over the saved epochs) and training curves."""
    name = f"{config.algorithm.name} on {config.data.get('name', '')}, step {step}"
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


# ------------------------------------------------------------------------------ prediction


def find_images(path: str) -> list[str]:
    """`path` itself if it is a file, else every image below the folder (recursive, sorted)."""
    if not path:
        raise DataError(
            "--mode predict needs --config.predict.input=PATH: an image file or a folder of "
            f"images ({'/'.join(IMAGE_EXTENSIONS)})."
        )
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError(
            f"config.predict.input {path!r} does not exist (expected a file or folder)."
        )
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, n) for n in sorted(filenames) if is_image_file(n))
    if not found:
        raise DataError(
            f"No images ({'/'.join(IMAGE_EXTENSIONS)}) under {path!r} for --mode predict."
        )
    return found


def load_prediction_images(files: list[str], size: int) -> list[np.ndarray]:
    """Decoded test views (Resize + CentreCrop) of every file; one error lists all bad files."""
    views, bad = [], []
    for path in files:
        try:
            views.append(augment_host.test_view(data_lib.load_image(path, size)))
        except DataError as e:
            bad.append(f"  {path}: {e.__cause__ or e}")
    if bad:
        raise DataError(
            f"{len(bad)} of {len(files)} image(s) could not be read for --mode predict:\n"
            + "\n".join(bad)
            + f"\nExpected readable {'/'.join(IMAGE_EXTENSIONS)} images; fix or remove these."
        )
    return views


def predict_probabilities(model, variables, views: list[np.ndarray], batch_size: int):
    """Softmax probabilities (N, C) of the test views, in fixed-shape batches (one compile)."""
    eval_step = train.make_eval_step(model)
    out = []
    for start in range(0, len(views), batch_size):
        chunk = np.stack(views[start : start + batch_size])
        batch = np.zeros((batch_size, *chunk.shape[1:]), np.uint8)
        batch[: len(chunk)] = chunk
        logits, _ = eval_step(variables, batch)
        out.append(np.asarray(jax.nn.softmax(logits, axis=-1))[: len(chunk)])
    return np.concatenate(out)


def predict_workdir(workdir: str, cli_config: ml_collections.ConfigDict | None = None) -> dict:
    """Classifies config.predict.input; writes a CSV (file, class, confidence, top-5)."""
    workdir = os.path.abspath(workdir)
    config = resolve_config(workdir, cli_config)
    source = config.predict.input
    files = find_images(source)
    class_names = saved_class_names(workdir, config)
    views = load_prediction_images(files, int(config.data.image_size))
    model, variables, step, _ = restore_model(workdir, config)
    probabilities = predict_probabilities(model, variables, views, config.data.eval_batch_size)

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
    if known:
        # Images inside a folder named after a class: how often the prediction agrees with it.
        summary["num_in_class_folders"] = known
        summary["folder_class_accuracy"] = float(100.0 * correct / known)
    print(f"Wrote {len(files)} predictions to {summary['output']}.", flush=True)
    return summary
