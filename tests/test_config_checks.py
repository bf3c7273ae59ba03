"""Every config value has a rule; every shipped config passes; each bad value names its key."""

import importlib
import pathlib

import pytest

from configs import base
from ssl_jax.config_checks import (
    RULES,
    ConfigError,
    config_errors,
    leaves,
    unchecked_keys,
    validate_config,
)

CONFIG_NAMES = sorted(
    p.stem for p in (pathlib.Path(base.__file__).parent).glob("*.py") if p.stem != "__init__"
)


@pytest.mark.parametrize("name", CONFIG_NAMES)
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_every_leaf_has_a_rule_and_every_shipped_config_validates(name, arg):
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    assert unchecked_keys(config) == []
    validate_config(config)


def test_the_rules_cover_base_and_the_keys_other_features_add():
    keys = {k for k, _ in leaves(base.get_config())}
    assert keys <= set(RULES)
    for key in ("model.conv_impl", "eval.after_training", "train.steps_per_dispatch", "num_seeds"):
        assert key in RULES


def error_for(**overrides):
    """The single ConfigError line of a base config with dotted `overrides` (a__b = a.b)."""
    config = base.get_config()
    for dotted, value in overrides.items():
        *path, leaf = dotted.split("__")
        node = config
        for part in path:
            node = node[part]
        with node.ignore_type():
            node[leaf] = value
    with pytest.raises(ConfigError) as e:
        validate_config(config)
    return e.value


@pytest.mark.parametrize(
    "overrides, key, allowed",
    [
        ({"algorithm__threshold": 2.0}, "algorithm.threshold", "(0, 1]"),
        ({"algorithm__threshold": 0.0}, "algorithm.threshold", "(0, 1]"),
        ({"ema__decay": 1.5}, "ema.decay", "[0, 1)"),
        ({"ema__decay": 1.0}, "ema.decay", "[0, 1)"),
        ({"model__width": 0.0}, "model.width", "> 0"),
        ({"data__image_size": 32}, "data.crop_size", "data.image_size (32)"),
        ({"data__crop_size": 100}, "data.crop_size", "data.image_size (64)"),
        ({"data__batch_size": 0}, "data.batch_size", ">= 1"),
        ({"data__batch_size": -4}, "data.batch_size", ">= 1"),
        ({"data__mu": 0}, "data.mu", ">= 1"),
        ({"data__mu": -1}, "data.mu", ">= 1"),
        ({"data__eval_batch_size": 0}, "data.eval_batch_size", ">= 1"),
        ({"optim__lr": 0.0}, "optim.lr", "> 0"),
        ({"optim__lr": float("nan")}, "optim.lr", "> 0"),
        ({"data__labels_per_class": 0}, "data.labels_per_class", ">= 1"),
        ({"algorithm__T": 0.0}, "algorithm.T", "> 0"),
        ({"algorithm__supcon_temperature": -0.1}, "algorithm.supcon_temperature", "> 0"),
        ({"train__total_steps": 0}, "train.total_steps", ">= 1"),
        ({"train__log_every": 100}, "train.log_every", "must divide train.steps_per_epoch"),
        ({"precision": "fp16"}, "precision", "'bf16'"),
        ({"augment__where": "gpu"}, "augment.where", "'host'"),
        ({"data__protocol": "all"}, "data.protocol", "'seed_code'"),
        ({"data__source": "s3"}, "data.source", "'tfds'"),
        ({"model__name": "vgg16"}, "model.name", "'resnet18'"),
        ({"algorithm__name": "mixmatch"}, "algorithm.name", "'comatch_triplet'"),
        ({"algorithm__ccssl_diag_weight": "two"}, "algorithm.ccssl_diag_weight", "'one'"),
        ({"eval__step": "last"}, "eval.step", "'latest', 'best'"),
        ({"data__mu": True}, "data.mu", "an integer"),
        ({"data__batch_size": 8.0}, "data.batch_size", "an integer"),
        ({"optim__nesterov": "yes"}, "optim.nesterov", "True or False"),
        ({"data__unlabelled_whole_folder": True}, "data.unlabelled_whole_folder", "seed_code"),
        ({"data__classes": ("a", "a")}, "data.classes", "once"),
        ({"train__save_embeddings_epochs": (0,)}, "train.save_embeddings_epochs", "1-based"),
    ],
)
def test_each_bad_value_names_key_value_and_range(overrides, key, allowed):
    error = error_for(**overrides)
    assert [k for k, _, _ in error.errors] == [key]
    line = str(error).splitlines()[-1]
    assert line.startswith(f"  {key} = ") and allowed in line


def test_all_violations_are_reported_together():
    error = error_for(algorithm__threshold=2.0, ema__decay=1.5, data__mu=0, data__batch_size=-4)
    keys = [k for k, _, _ in error.errors]
    assert sorted(keys) == ["algorithm.threshold", "data.batch_size", "data.mu", "ema.decay"]
    text = str(error)
    assert text.startswith("4 invalid config values")
    assert "data.mu = 0: must be an integer >= 1" in text
    assert "ema.decay = 1.5: must be a number in [0, 1)" in text


def test_keys_added_by_other_features_are_checked_when_present():
    config = base.get_config()
    with config.ignore_type():  # some of these keys are in base already, others not yet
        config.num_seeds = 0
        config.train.steps_per_dispatch = -1
        config.eval.after_training = "yes"
        config.model.conv_impl = ""
    keys = sorted(k for k, _, _ in config_errors(config))
    assert keys == [
        "eval.after_training",
        "model.conv_impl",
        "num_seeds",
        "train.steps_per_dispatch",
    ]
    with config.ignore_type():
        config.num_seeds, config.train.steps_per_dispatch = 3, 0
        config.eval.after_training, config.model.conv_impl = False, "lax"
    validate_config(config)


def test_integer_eval_step_and_tfds_name():
    config = base.get_config()
    config.eval.step = "1024"  # as --config.eval.step=1024 arrives
    validate_config(config)
    config.data.source = "tfds"
    assert [k for k, _, _ in config_errors(config)] == ["data.tfds_name"]
