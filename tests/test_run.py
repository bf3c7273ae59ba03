"""launch.py and run.main: overrides without a config file, refused keys, a quiet start on CPU."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from absl import flags
from conftest import REPO

import launch
from configs.base import get_config
from ssl_jax import evaluate, run


@pytest.fixture
def workdir(tmp_path):
    """A workdir whose config.json differs from configs/base.py (crop 56, its own data root)."""
    config = get_config()
    config.data.crop_size = 56
    config.data.root = str(tmp_path / "saved_root")
    (tmp_path / "saved_root").mkdir()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(config.to_json())
    return run_dir


def _parse(*argv):
    flag_values = flags.FlagValues()
    remaining = launch.parse_flags(["launch.py", *argv], flag_values)
    return flag_values, remaining


def test_override_keys_and_config_file_detection():
    argv = [
        "launch.py",
        "--config.eval.step=best",
        "-config.data.root",
        "/d",
        "--noconfig.eval.figures",
    ]
    assert run.override_keys(argv) == ["eval.step", "data.root", "eval.figures"]
    assert not run.config_file_given(argv)
    assert run.config_file_given(["launch.py", "--config", "configs/demo.py"])
    assert run.config_file_given(["launch.py", "--config=configs/demo.py:smoke"])
    assert run.override_keys(["launch.py", "--config=configs/demo.py", "--workdir=x"]) == []


def test_eval_overrides_without_a_config_file_apply_to_the_workdirs_config(
    workdir, tmp_path, monkeypatch, capsys
):
    new_root = tmp_path / "moved"
    new_root.mkdir()
    flag_values, remaining = _parse(
        "--workdir",
        str(workdir),
        "--mode",
        "eval",
        "--config.eval.step=best",
        "--config.data.root",
        str(new_root),
        "--noconfig.eval.figures",
    )
    config = flag_values.config
    assert config.eval.step == "best" and config.eval.figures is False
    assert config.data.crop_size == 56  # the workdir's value, not configs/base.py's 60
    assert config.data.root == str(new_root)

    calls = []

    def fake_evaluate(path, cli_config, *, explicit=()):
        calls.append((path, cli_config, list(explicit)))
        return {"step": 4}

    monkeypatch.setattr(evaluate, "evaluate_workdir", fake_evaluate)
    assert launch.main(remaining, flag_values) == {"step": 4}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"step": 4}
    (path, passed, explicit) = calls[0]
    assert path == str(workdir) and passed.eval.step == "best"
    assert explicit == ["eval.step", "data.root", "eval.figures"]

    # The explicitly given root wins even though the saved one still exists ...
    resolved = evaluate.resolve_config(str(workdir), passed, explicit=explicit)
    assert resolved.data.root == str(new_root) and resolved.eval.step == "best"
    assert resolved.data.crop_size == 56
    # ... while a root that merely differs (a config file's default) does not.
    resolved = evaluate.resolve_config(str(workdir), passed)
    assert resolved.data.root == str(workdir.parent / "saved_root")


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--mode", "eval", "--config.eval.stepp=best"],
            r"Unknown config key 'eval.stepp'.*eval\.step",
        ),
        (["--mode", "eval", "--config.nope=1"], r"Unknown config key 'nope'"),
        (
            ["--mode", "predict", "--config.model.width=2", "--config.optim.lr=1"],
            r"--config.model.width cannot be overridden in --mode predict: it changes the trained "
            r"model.*config.json \(also refused: optim.lr\)",
        ),
        (["--mode", "eval", "--config.data.crop_size=32"], r"data.crop_size cannot be overridden"),
        (["--mode", "train", "--config.eval.step=best"], r"--mode train needs one"),
        (["--mode", "inspect", "--config.data.root=/x"], r"--mode inspect needs one"),
    ],
)
def test_bad_overrides_without_a_config_file_name_the_key(workdir, argv, message):
    with pytest.raises(flags.Error, match=message):
        _parse("--workdir", str(workdir), *argv)


def test_overrides_of_a_workdir_without_a_run_say_so(tmp_path):
    with pytest.raises(flags.Error, match=r"--workdir's config.json: Workdir .* does not exist"):
        _parse("--workdir", str(tmp_path / "missing"), "--mode", "eval", "--config.eval.step=4")
    with pytest.raises(flags.Error, match=r"not an ssl_jax training workdir"):
        _parse("--workdir", str(tmp_path), "--mode", "eval", "--config.eval.step=4")


def test_model_overrides_with_a_config_file_are_refused_too(workdir):
    flag_values, remaining = _parse(
        "--config",
        str(REPO / "configs" / "ucm10_triplet.py"),
        "--workdir",
        str(workdir),
        "--mode",
        "eval",
        "--config.model.width=2",
    )
    assert flag_values.config.model.width == 2  # parsed as a config file flag ...
    with pytest.raises(SystemExit, match=r"model.width cannot be overridden in --mode eval"):
        launch.main(remaining, flag_values)  # ... and refused before anything is evaluated


QUIET_START = """
import sys
from absl import app


def main(_):
    if sys.argv[1] == "run.main":
        from ssl_jax import run

        try:
            run.main("eval", None, sys.argv[2])  # no checkpoint: fails after starting up
        except Exception as e:
            print("run.main ended:", type(e).__name__, flush=True)
    import jax

    print(jax.devices(), flush=True)  # a backend is up either way


app.run(main)
"""


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is not None, reason="libtpu installed: the probe is news"
)
def test_no_tpu_backend_line_on_a_cpu_or_gpu_machine(workdir, tmp_path):
    script = tmp_path / "quiet_start.py"
    script.write_text(QUIET_START)

    def start(*args):
        out = subprocess.run(
            [sys.executable, str(script), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": ""},
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout + out.stderr

    bare = start("bare")  # JAX under absl, as launch.py runs it, says it ...
    assert "Unable to initialize backend 'tpu'" in bare
    through_run = start("run.main", str(workdir))  # ... run.main keeps it quiet
    assert "run.main ended: CheckpointError" in through_run
    assert "Unable to initialize backend" not in through_run, through_run[-3000:]
