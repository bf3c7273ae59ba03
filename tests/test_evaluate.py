"""--mode eval and --mode predict on one tiny CoMatch+Triplet run on real UCM10 images.

Every number in metrics.json is recomputed here independently (scikit-learn, plain loops)
from the predictions and embeddings that evaluation saved.
"""

import csv
import importlib
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from conftest import REPO, tiny_run_config
from PIL import Image

import launch
from ssl_jax import checkpoint as checkpoint_lib
from ssl_jax import evaluate, inference, metric_writers, predict, retrieval, run
from ssl_jax.data import DataError
from ssl_jax.data.augment_spec import CROP_SIZE

UCM10 = importlib.import_module("configs.base").UCM10_CLASSES


def tiny_config(cache_dir):
    """The tests' tiny run (conftest.tiny_run_config) of CoMatch+Triplet, saving embeddings."""
    return tiny_run_config("ucm10_triplet", cache_dir, save_embeddings_epochs=(1, -1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, triplet_run):
    """(workdir, config, result): a copy of the session's 8-step CoMatch+Triplet run
    (conftest.triplet_run, trained with `tiny_config`), then eval with figures + online."""
    workdir = triplet_run.copy_to(tmp_path_factory.mktemp("evaluate") / "run")
    config = triplet_run.fresh_config()
    assert config.to_dict() == tiny_config(config.data.cache_dir).to_dict()
    eval_config = tiny_config(config.data.cache_dir)
    eval_config.eval.figures = True
    eval_config.eval.online = True
    result = evaluate.evaluate_workdir(str(workdir), eval_config)
    return workdir, config, result


def _eval_records(workdir):
    return [r for r in metric_writers.read_metrics(str(workdir)) if r["kind"] == "eval"]


def test_metrics_json_has_every_field_and_agrees_with_sklearn(trained):
    from sklearn import metrics as skm

    workdir, _, result = trained
    out = workdir / "eval" / "8"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["step"] == 8 and saved["num_test"] == 500 and saved["weights"] == "ema"
    split = json.loads((workdir / "split.json").read_text())
    assert saved["split_hash"] == split["split_hash"] and saved["protocol"] == "k_per_class"
    assert set(saved["per_class_accuracy"]) == set(UCM10)

    with np.load(out / "predictions.npz") as z:
        logits, labels, predictions = z["logits"], z["labels"], z["predictions"]
        files = list(z["files"])
    assert files == [f for f, _ in split["test"]]
    assert np.array_equal(labels, [y for _, y in split["test"]])
    assert np.array_equal(predictions, np.argmax(logits, axis=1))
    # The last in-training evaluation used the same EMA weights on the same images.
    assert saved["top1"] == pytest.approx(_eval_records(workdir)[-1]["top1"])

    assert saved["top1"] == pytest.approx(100 * skm.accuracy_score(labels, predictions))
    assert saved["top5"] == pytest.approx(
        100 * skm.top_k_accuracy_score(labels, logits, k=5, labels=range(10))
    )
    assert saved["balanced_accuracy"] == pytest.approx(
        100 * skm.balanced_accuracy_score(labels, predictions)
    )
    p, r, f, _ = skm.precision_recall_fscore_support(
        labels, predictions, average="macro", zero_division=0
    )
    assert saved["macro_precision"] == pytest.approx(100 * p)
    assert saved["macro_recall"] == pytest.approx(100 * r)
    assert saved["macro_f1"] == pytest.approx(100 * f)
    cm = skm.confusion_matrix(labels, predictions, labels=range(10))
    observed, chance = np.trace(cm) / cm.sum(), np.sum(cm.sum(0) * cm.sum(1)) / cm.sum() ** 2
    assert saved["cohen_kappa"] == pytest.approx((observed - chance) / (1 - chance))
    for c, name in enumerate(UCM10):
        mask = labels == c
        assert saved["per_class_accuracy"][name] == pytest.approx(
            100 * np.mean(predictions[mask] == c)
        )
        assert saved["per_class_count"][name] == int(mask.sum())

    with open(out / "confusion_matrix.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == list(UCM10) and [r[0] for r in rows[1:]] == list(UCM10)
    assert np.array_equal(np.array([[int(v) for v in r[1:]] for r in rows[1:]]), cm)

    assert result["top1"] == saved["top1"]
    assert saved["training"]["best_top1"] == _eval_records(workdir)[-1]["best_top1"]


def test_online_weights_get_their_own_block(trained):
    _, _, result = trained
    online = result["online"]
    for key in ("top1", "top5", "balanced_accuracy", "macro_f1", "cohen_kappa"):
        assert math.isfinite(online[key])
    assert online["num_test"] == 500 and online["embedding_metrics"]["available"]


def _naive_map_at_r(embeddings, labels):
    """One query at a time, straight from the definition (Musgrave et al. 2020)."""
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    p_at_1, aps = [], []
    for q in range(len(labels)):
        others = [i for i in range(len(labels)) if i != q]
        ranked = sorted(others, key=lambda i: -float(x[q] @ x[i]))
        r = sum(1 for i in others if labels[i] == labels[q])
        if r == 0:
            continue
        hits, total = 0, 0.0
        for position, i in enumerate(ranked[:r], start=1):
            if labels[i] == labels[q]:
                hits += 1
                total += hits / position
        aps.append(total / r)
        p_at_1.append(labels[ranked[0]] == labels[q])
    return 100 * np.mean(p_at_1), 100 * np.mean(aps)


def test_retrieval_numbers_agree_with_independent_computations(trained):
    from scipy import stats
    from sklearn.neighbors import NearestNeighbors

    workdir, _, result = trained
    with np.load(workdir / "eval" / "8" / "embeddings.npz") as z:
        embeddings, labels = z["embeddings"], z["labels"]
        assert list(z["class_names"]) == list(UCM10)
        assert len(z["files"]) == 500 and embeddings.shape == (500, 64)
    saved = result["embedding_metrics"]
    assert saved["available"] and saved["num_queries"] == 500

    nn = NearestNeighbors(metric="cosine", algorithm="brute").fit(embeddings)
    _, neighbours = nn.kneighbors(embeddings, n_neighbors=6)
    assert np.all(neighbours[:, 0] == np.arange(500))  # each point is its own nearest
    for k in (1, 5):
        votes = stats.mode(labels[neighbours[:, 1 : k + 1]], axis=1, keepdims=False).mode
        assert saved["knn_accuracy"][str(k)] == pytest.approx(100 * np.mean(votes == labels))

    p_at_1, map_at_r = _naive_map_at_r(embeddings.astype(np.float64), labels)
    assert saved["precision_at_1"] == pytest.approx(p_at_1)
    assert saved["map_at_r"] == pytest.approx(map_at_r)


def test_retrieval_on_a_hand_worked_example():
    # Unit vectors at these angles; classes 0,0,0,1,1 plus a lone class-2 point far away.
    angles = np.deg2rad([0, 10, 100, 25, 210, 300])
    points = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = np.array([0, 0, 0, 1, 1, 2])
    # Ranked others per query and R: q0 [1,3,2,..] R=2 -> AP 1/2; q1 [0,3,..] R=2 -> 1/2;
    # q2 [3,1,..] R=2 -> (1/2)/2; q3 [1,..] R=1 -> 0; q4 [2,..] R=1 -> 0; q5 is lone.
    out = retrieval.precision_at_1_and_map_at_r(points, labels)
    assert out["num_queries"] == 5
    assert out["map_at_r"] == pytest.approx(100 * (0.5 + 0.5 + 0.25) / 5)
    assert out["precision_at_1"] == pytest.approx(100 * 2 / 5)
    knn = retrieval.knn_accuracy(points[:5], labels[:5], ks=(1, 2, 3))
    assert knn[1] == pytest.approx(40.0)  # q0, q1 right
    assert knn[2] == pytest.approx(60.0)  # q2's 1-1 tie goes to class 0: right
    assert knn[3] == pytest.approx(60.0)


def _png(path):
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels.std() > 5  # something was drawn
    return pixels


def test_figures_are_drawn(trained):
    workdir, _, result = trained
    out = workdir / "eval" / "8"
    names = ("confusion_matrix.png", "tsne.png", "tsne_epochs.png", "training_curves.png")
    assert sorted(result["figures"]) == sorted(names)
    assert result["tsne_perplexity"] == 30.0  # 500 points: the configured value is kept
    for name in names:
        _png(out / name)
    assert sorted(p.name for p in (workdir / "embeddings").iterdir()) == [
        "epoch_0001.npz",
        "epoch_0002.npz",
    ]


def test_eval_cli_prints_json_last_and_picks_the_requested_step(trained, capsys):
    workdir, config, _ = trained
    cli = tiny_config(config.data.cache_dir)
    cli.eval.step = "4"
    result = run.main("eval", cli, str(workdir))
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line)["step"] == 4 == result["step"]
    assert result["top1"] == pytest.approx(_eval_records(workdir)[0]["top1"])
    assert (workdir / "eval" / "4" / "metrics.json").exists()

    cli.eval.step = "best"
    best = evaluate.evaluate_workdir(str(workdir), cli)
    assert best["top1"] == pytest.approx(max(r["top1"] for r in _eval_records(workdir)))


def test_eval_without_a_config_file_takes_the_workdirs_config(trained, capsys):
    """python launch.py --workdir W --mode eval --config.eval.step=best (no --config)."""
    workdir, _, _ = trained
    argv = ["launch.py", "--workdir", str(workdir), "--mode", "eval", "--config.eval.step=best"]
    flag_values = flags.FlagValues()
    remaining = launch.parse_flags([*argv, "--noconfig.eval.figures"], flag_values)
    result = launch.main(remaining, flag_values)
    best = max(_eval_records(workdir), key=lambda r: r["top1"])
    assert result["step"] == best["step"] and result["top1"] == pytest.approx(best["top1"])
    assert result["figures"] == []
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == best["step"]


def test_evaluation_and_prediction_use_the_runs_crop_size(
    trained, shared_data, tmp_path, monkeypatch
):
    """A run whose config.json says crop 56 is evaluated and predicted on 56x56 centre crops."""
    workdir, config, _ = trained
    assert CROP_SIZE != 56 and config.data.crop_size != 56
    copy = tmp_path / "run56"
    shutil.copytree(workdir / "checkpoints", copy / "checkpoints")
    for name in ("split.json", "metrics.jsonl"):
        shutil.copy(workdir / name, copy / name)
    saved = json.loads((workdir / "config.json").read_text())
    saved["data"]["crop_size"] = 56
    (copy / "config.json").write_text(json.dumps(saved))

    shapes = []
    make_eval_step = inference.make_eval_step

    def spying_make_eval_step(model):
        step = make_eval_step(model)

        def eval_step(variables, images):
            shapes.append(tuple(images.shape[1:]))
            return step(variables, images)

        return eval_step

    monkeypatch.setattr(inference, "make_eval_step", spying_make_eval_step)
    cli = tiny_config(config.data.cache_dir)
    result = evaluate.evaluate_workdir(str(copy), cli)
    assert result["num_test"] == 500 and shapes and set(shapes) == {(56, 56, 3)}

    shapes.clear()
    cli.predict.input = str(shared_data / "ucm" / "freeway" / "freeway00.png")
    cli.predict.output = str(tmp_path / "out.csv")
    assert predict.predict_workdir(str(copy), cli)["num_images"] == 1
    assert shapes and set(shapes) == {(56, 56, 3)}


def test_train_mode_evaluates_after_training_and_figures_false_skips_only_figures(
    trained, tmp_path, capsys
):
    workdir, config, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(workdir / "checkpoints", copy / "checkpoints")
    for name in ("config.json", "split.json", "metrics.jsonl"):
        shutil.copy(workdir / name, copy / name)
    cli = tiny_config(config.data.cache_dir)
    cli.eval.figures = False
    result = run.main("train", cli, str(copy))  # already at its last step: evaluation only
    out = copy / "eval" / "8"
    assert result["eval"]["step"] == 8 and result["eval"]["figures"] == []
    assert (out / "metrics.json").exists() and (out / "predictions.npz").exists()
    assert not list(out.glob("*.png")) and "tsne_perplexity" not in result["eval"]

    shutil.rmtree(copy / "eval")
    cli.eval.after_training = False
    result = run.main("train", cli, str(copy))
    assert "eval" not in result and not (copy / "eval").exists()
    capsys.readouterr()


def test_importing_evaluate_does_not_import_the_trainer():
    code = "import sys, ssl_jax.evaluate; print('ssl_jax.train' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_bad_workdirs_and_steps_are_named(trained, tmp_path):
    workdir, config, _ = trained
    with pytest.raises(checkpoint_lib.CheckpointError, match="does not exist"):
        evaluate.evaluate_workdir(str(tmp_path / "missing"))
    with pytest.raises(checkpoint_lib.CheckpointError, match="not an ssl_jax training workdir"):
        evaluate.evaluate_workdir(str(tmp_path))
    (tmp_path / "config.json").write_text((workdir / "config.json").read_text())
    with pytest.raises(checkpoint_lib.CheckpointError, match="No checkpoint"):
        evaluate.evaluate_workdir(str(tmp_path))

    cli = tiny_config(config.data.cache_dir)
    cli.eval.step = "7"
    with pytest.raises(checkpoint_lib.CheckpointError, match=r"No checkpoint at step 7.*\[4, 8\]"):
        evaluate.evaluate_workdir(str(workdir), cli)


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("width", 0.25, "checkpoint shape"),
        ("name", "resnet50", "missing from the checkpoint"),
    ],
)
def test_a_checkpoint_of_another_model_is_refused(trained, tmp_path, key, value, expected):
    workdir, _, _ = trained
    copy = tmp_path / "edited"
    shutil.copytree(workdir / "checkpoints", copy / "checkpoints")
    saved = json.loads((workdir / "config.json").read_text())
    saved["model"][key] = value
    (copy / "config.json").write_text(json.dumps(saved))
    shutil.copy(workdir / "split.json", copy / "split.json")
    with pytest.raises(
        checkpoint_lib.CheckpointError, match=f"not written by the model.*{expected}"
    ):
        evaluate.evaluate_workdir(str(copy))


def test_predict_classifies_the_original_tifs(trained, shared_data, tmp_path):
    workdir, config, _ = trained
    cli = tiny_config(config.data.cache_dir)
    cli.predict.input = str(shared_data / "originals" / "ucm")
    cli.predict.output = str(tmp_path / "out.csv")
    summary = predict.predict_workdir(str(workdir), cli)
    assert summary["num_images"] == 20 and summary["num_in_class_folders"] == 20
    with open(tmp_path / "out.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 and all(r["file"].endswith(".tif") for r in rows)
    assert {r["folder_class"] for r in rows} == set(UCM10)
    for row in rows:
        probs = [float(row[f"top{i}_prob"]) for i in range(1, 6)]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
        assert row["predicted_class"] == row["top1_class"] in UCM10
        assert float(row["confidence"]) == probs[0]
        assert len({row[f"top{i}_class"] for i in range(1, 6)}) == 5


def test_predict_matches_evaluation_on_test_images(trained, shared_data, tmp_path):
    """The same PNGs through --mode predict and --mode eval get the same class and logits."""
    workdir, config, _ = trained
    with np.load(workdir / "eval" / "8" / "predictions.npz") as z:
        files, logits = list(z["files"]), z["logits"]
    chosen = [0, 137, 499]
    for i in chosen:
        target = tmp_path / "in" / files[i]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / "ucm" / files[i], target)
    cli = tiny_config(config.data.cache_dir)
    cli.predict.input = str(tmp_path / "in")
    predict.predict_workdir(str(workdir), cli)
    with open(workdir / "predictions.csv") as f:
        rows = {r["file"].split("/in/")[-1]: r for r in csv.DictReader(f)}
    for i in chosen:
        expected = np.exp(logits[i] - logits[i].max())
        expected /= expected.sum()
        row = rows[files[i]]
        assert row["predicted_class"] == UCM10[int(np.argmax(logits[i]))]
        assert float(row["confidence"]) == pytest.approx(expected.max(), abs=1e-5)


@pytest.mark.filterwarnings("ignore:Truncated File Read")  # PIL warns before it raises
def test_predict_lists_every_unreadable_image(trained, shared_data, tmp_path):
    workdir, config, _ = trained
    folder = tmp_path / "mixed"
    (folder / "nested").mkdir(parents=True)
    (folder / "junk.png").write_bytes(b"not an image")
    tif = (shared_data / "originals" / "ucm" / "freeway" / "freeway84.tif").read_bytes()
    (folder / "nested" / "cut.tif").write_bytes(tif[:200])
    shutil.copy(shared_data / "ucm" / "freeway" / "freeway00.png", folder / "good.png")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    cli = tiny_config(config.data.cache_dir)
    cli.predict.input = str(folder)
    with pytest.raises(DataError, match=r"2 of 3 image\(s\)") as err:
        predict.predict_workdir(str(workdir), cli)
    assert "junk.png" in str(err.value) and "cut.tif" in str(err.value)
    assert "good.png" not in str(err.value)

    # Image files the loader does not read are reported by name, never skipped.
    (folder / "scan.bmp").write_bytes(b"BM")
    (folder / "nested" / "photo.webp").write_bytes(b"RIFF")
    with pytest.raises(DataError, match=r"2 file\(s\) in --config.predict.input") as err:
        predict.predict_workdir(str(workdir), cli)
    assert "scan.bmp" in str(err.value) and "photo.webp" in str(err.value)
    assert "does not read (.bmp, .webp" in str(err.value)
    cli.predict.input = str(folder / "scan.bmp")
    with pytest.raises(DataError, match=r"1 file\(s\) in .*scan.bmp"):
        predict.predict_workdir(str(workdir), cli)

    cli.predict.input = ""
    with pytest.raises(DataError, match="needs --config.predict.input"):
        predict.predict_workdir(str(workdir), cli)
    cli.predict.input = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="does not exist"):
        predict.predict_workdir(str(workdir), cli)


def test_tsne_perplexity_is_clipped_for_tiny_sets(tmp_path):
    from ssl_jax import figures

    assert figures.tsne_perplexity(30.0, 500) == 30.0
    assert figures.tsne_perplexity(30.0, 20) == pytest.approx(19 / 3)
    rng = np.random.default_rng(0)
    points, labels = rng.normal(size=(8, 64)), np.arange(8) % 2
    assert figures.plot_tsne(points, labels, ["a", "b"], str(tmp_path / "t.png"), perplexity=30)
    with Image.open(tmp_path / "t.png") as image:
        assert image.size[0] > 0
    assert (
        figures.plot_tsne(
            points[:4], labels[:4], ["a", "b"], str(tmp_path / "u.png"), perplexity=30
        )
        is None
    )
