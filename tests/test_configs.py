"""Configs: every file loads, overrides the base, shrinks with :smoke, and rejects typos."""

import importlib
import pathlib
import subprocess
import sys

import pytest

from configs import base

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(
    p.stem for p in (REPO / "configs").glob("*.py") if p.stem not in ("__init__", "base")
)


def load(name, arg=None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def test_base_has_the_papers_defaults():
    c = base.get_config()
    assert (c.data.batch_size, c.data.mu, c.optim.lr, c.optim.weight_decay) == (32, 7, 0.03, 5e-4)
    assert c.optim.nesterov and c.ema.decay == 0.999
    assert (c.train.steps_per_epoch, c.train.total_steps) == (1024, 524_288)
    assert (c.data.image_size, c.data.crop_size, c.model.name, c.model.low_dim) == (
        64,
        60,
        "resnet18",
        64,
    )


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_loads_and_documents_its_run(name):
    module = importlib.import_module(f"configs.{name}")
    assert "Run:" in module.__doc__ and f"configs/{name}.py" in module.__doc__
    config = module.get_config()
    smoke = module.get_config("smoke")
    assert smoke.train.total_steps < config.train.total_steps
    assert smoke.model.width <= config.model.width
    assert smoke.data.batch_size <= config.data.batch_size


def test_table_one_settings():
    od, idc = load("aid10_ccssl_od"), load("ucm10_ccssl_id")
    assert (od.algorithm.threshold, od.algorithm.lambda_ccssl, od.algorithm.t_push, od.data.mu) == (
        0.6,
        2.0,
        0.9,
        7,
    )
    assert (
        idc.algorithm.threshold,
        idc.algorithm.lambda_ccssl,
        idc.algorithm.t_push,
        idc.data.mu,
    ) == (0.95, 1.0, 0.0, 5)
    # docs/method.md#q7-ccssl-weight-mapping: CoMatch's own weight stays 1
    assert od.algorithm.lambda_c == 1.0
    assert load("aid10_triplet").data.classes == base.AID10_CLASSES
    assert load("ucm21_comatch_wrn28_2").model.name == "wrn28_2"


def test_unknown_config_argument_is_an_error():
    with pytest.raises(ValueError, match="Unknown config argument 'smok'"):
        load("ucm10_supervised", "smok")


def _launch(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_launch_rejects_an_unknown_config_key(tmp_path):
    out = _launch(
        "--config",
        "configs/ucm10_supervised.py:smoke",
        "--workdir",
        str(tmp_path),
        "--config.optim.lrr=0.1",
    )
    assert out.returncode != 0
    assert "lrr" in out.stderr
    assert not (tmp_path / "checkpoints").exists()
