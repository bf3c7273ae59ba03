"""Every config value checked in one place, before any work: `validate_config(config)`.

`RULES` maps each dotted key of configs/base.py (`"data.mu"`) to a check of its type and range
(some look at other keys: `data.crop_size` <= `data.image_size`, `train.log_every` divides
`train.steps_per_epoch`). All violations are collected and raised together as one
`ConfigError`, one line per key naming the key, the value and what is allowed:

    ConfigError: 2 invalid config values (set them with --config.<key>=<value>):
      data.mu = 0: must be an integer >= 1
      algorithm.threshold = 2: must be a number in (0, 1]

A rule whose key the config lacks is skipped (older configs, keys of other features);
`unchecked_keys(config)` lists the config's keys that have no rule (a test keeps it empty).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator

import ml_collections

# A rule returns None when the value is fine, else what is allowed ("must be ...").
Rule = Callable[[object, ml_collections.ConfigDict], "str | None"]

AUGMENT_WHERE = ("host", "device", "auto")
CCSSL_DIAG_WEIGHTS = ("one", "confidence_squared")
EVAL_STEPS = ("latest", "best")


class ConfigError(ValueError):
    """One or more config values are invalid; `errors` holds (key, value, requirement)."""

    def __init__(self, errors: list[tuple[str, object, str]]):
        self.errors = errors
        noun = "value" if len(errors) == 1 else "values"
        lines = [
            f"{len(errors)} invalid config {noun} (set them with --config.<key>=<value>):",
            *(f"  {key} = {value!r}: {requirement}" for key, value, requirement in errors),
        ]
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------- rule builders


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def integer(lo: int | None = None, hi: int | None = None, note: str = "") -> Rule:
    if lo is not None and hi is not None:
        want = f"an integer in [{lo}, {hi}]"
    elif lo is not None:
        want = f"an integer >= {lo}"
    else:
        want = "an integer"
    want = f"must be {want}{note}"

    def rule(v, _):
        if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            return want
        return None

    return rule


def number(lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False):
    if lo is not None and hi is not None:
        want = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        want = f"a number {'>' if lo_open else '>='} {lo:g}"
    else:
        want = "a finite number"

    def rule(v, _):
        if not _is_number(v):
            return f"must be {want}"
        v = float(v)
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return f"must be {want}"
        if hi is not None and (v > hi or (hi_open and v == hi)):
            return f"must be {want}"
        return None

    return rule


def boolean(v, _):
    return None if isinstance(v, bool) else "must be True or False"


def string(nonempty: bool = False) -> Rule:
    def rule(v, _):
        if not isinstance(v, str) or (nonempty and not v):
            return "must be a non-empty string" if nonempty else "must be a string"
        return None

    return rule


def one_of(choices: Callable[[], tuple] | tuple) -> Rule:
    def rule(v, _):
        allowed = tuple(choices() if callable(choices) else choices)
        return None if v in allowed else f"must be one of {', '.join(map(repr, allowed))}"

    return rule


def all_of(*rules: Rule) -> Rule:
    """The first failing rule's message (later rules may assume the earlier ones held)."""

    def rule(v, config):
        for r in rules:
            problem = r(v, config)
            if problem:
                return problem
        return None

    return rule


def _get(config, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return default
        node = node[part]
    return node


def at_most_key(other: str) -> Rule:
    def rule(v, config):
        bound = _get(config, other)
        if _is_int(bound) and v > bound:
            return f"must be <= {other} ({bound})"
        return None

    return rule


def divides_keys(*others: str) -> Rule:
    def rule(v, config):
        bad = [o for o in others if _is_int(_get(config, o)) and _get(config, o) % v]
        if bad:
            shown = ", ".join(f"{o} ({_get(config, o)})" for o in bad)
            return f"must divide {shown}, so that checkpoints and epochs fall on logging steps"
        return None

    return rule


# ------------------------------------------------------------------------ registry lookups


def _precisions() -> tuple:
    from ssl_jax import train_state

    return tuple(train_state.PRECISIONS)


def _models() -> tuple:
    from ssl_jax.models import MODELS

    return tuple(sorted(MODELS))


def _algorithms() -> tuple:
    from ssl_jax.algorithms import ALGORITHMS

    return tuple(sorted(ALGORITHMS))


def _sources() -> tuple:
    from ssl_jax.data.protocols import SOURCES

    return tuple(SOURCES)


def _protocols() -> tuple:
    from ssl_jax.data.protocols import PROTOCOLS

    return tuple(PROTOCOLS)


# ---------------------------------------------------------------------------- special rules


def _classes(v, _):
    if not isinstance(v, tuple | list) or not all(isinstance(c, str) and c for c in v):
        return 'must be a tuple of class folder names, e.g. \'("freeway","golfcourse")\', or ()'
    dup = sorted({c for c in v if list(v).count(c) > 1})
    return f"must name each class once (repeated: {dup})" if dup else None


def _whole_folder(v, config):
    if not isinstance(v, bool):
        return "must be True or False"
    if v and _get(config, "data.protocol") != "seed_code":
        return "can be True only with data.protocol='seed_code'"
    return None


def _tfds_name(v, config):
    if not isinstance(v, str):
        return "must be a string"
    if not v and _get(config, "data.source") == "tfds":
        return "must name the dataset (e.g. 'uc_merced') when data.source='tfds'"
    return None


def _cutout(v, config):
    crop = _get(config, "data.crop_size")
    hi = crop if _is_int(crop) and crop > 0 else None
    return integer(0, hi, " (a side of the cut-out square, at most data.crop_size)")(v, config)


def _save_embeddings_epochs(v, _):
    # No upper bound: `:smoke` shortens runs, and epochs past the end are simply not reached.
    want = "must be a tuple of 1-based epochs (-1 = the last epoch)"
    if not isinstance(v, tuple | list) or not all(_is_int(e) and (e >= 1 or e == -1) for e in v):
        return want
    return None


def _eval_step(v, _):
    if v in EVAL_STEPS or (_is_int(v) and v >= 0) or (isinstance(v, str) and v.isdigit()):
        return None
    return "must be 'latest', 'best' or a checkpoint step (an integer >= 0)"


def _resume_changes(v, config):
    keys = {key for key, _ in leaves(config)}
    if not isinstance(v, tuple | list) or not all(isinstance(k, str) for k in v):
        return "must be a tuple of dotted config keys, e.g. '(\"optim.lr\",)', or ()"
    unknown = [k for k in v if k not in keys]
    return f"must name keys of the config (unknown: {unknown})" if unknown else None


def _warmup(v, config):
    total = _get(config, "train.total_steps")
    hi = total if _is_int(total) and total > 0 else None
    return integer(0, hi, " (at most train.total_steps)")(v, config)


positive_int = integer(1)
positive = number(0.0, lo_open=True)
non_negative = number(0.0)
unit_closed = number(0.0, 1.0)  # [0, 1]

RULES: dict[str, Rule] = {
    "seed": integer(0),
    "num_seeds": positive_int,
    "precision": one_of(_precisions),
    # data
    "data.name": string(),
    "data.source": one_of(_sources),
    "data.root": string(),
    "data.split_lists": string(),
    "data.test_fraction": number(0.0, 1.0, lo_open=True, hi_open=True),
    "data.classes": _classes,
    "data.tfds_name": _tfds_name,
    "data.tfds_data_dir": string(),
    "data.tfds_train_split": string(nonempty=True),
    "data.tfds_test_split": string(),
    "data.protocol": one_of(_protocols),
    "data.labels_per_class": positive_int,
    "data.unlabelled_whole_folder": _whole_folder,
    "data.image_size": positive_int,
    "data.crop_size": all_of(positive_int, at_most_key("data.image_size")),
    "data.batch_size": positive_int,
    "data.mu": positive_int,
    "data.eval_batch_size": positive_int,
    "data.workers": integer(-1, note=" (-1 = one per CPU core, 0 = in the main process)"),
    "data.cache_dir": string(),
    # augmentation
    "augment.where": one_of(AUGMENT_WHERE),
    "augment.normalize_strong1": boolean,
    "augment.randaugment_n": integer(0),
    "augment.randaugment_m": integer(2, 10),  # RandAugmentMC draws v in 1..m-1 of 10
    "augment.cutout": _cutout,
    # model
    "model.name": one_of(_models),
    "model.width": positive,
    "model.low_dim": positive_int,
    "model.conv_impl": string(nonempty=True),  # "auto", "lax" or a CPU plan; get_model checks
    # algorithm
    "algorithm.name": one_of(_algorithms),
    "algorithm.threshold": number(0.0, 1.0, lo_open=True),
    "algorithm.lambda_u": non_negative,
    "algorithm.queue_batch": positive_int,
    "algorithm.contrast_threshold": unit_closed,
    "algorithm.da_len": positive_int,
    "algorithm.T": positive,
    "algorithm.alpha": unit_closed,
    "algorithm.lambda_c": non_negative,
    "algorithm.lambda_dml": non_negative,
    "algorithm.triplet_margin": non_negative,
    "algorithm.lambda_ccssl": non_negative,
    "algorithm.supcon_temperature": positive,
    "algorithm.t_push": unit_closed,
    "algorithm.ccssl_diag_weight": one_of(CCSSL_DIAG_WEIGHTS),
    "algorithm.fixmatch_T": positive,
    # optimiser
    "optim.lr": positive,
    "optim.momentum": number(0.0, 1.0, hi_open=True),
    "optim.nesterov": boolean,
    "optim.weight_decay": non_negative,
    "optim.warmup_steps": _warmup,
    "optim.num_cycles": non_negative,
    "ema.decay": number(0.0, 1.0, hi_open=True),
    # training
    "train.total_steps": positive_int,
    "train.steps_per_epoch": positive_int,
    "train.log_every": all_of(
        positive_int, divides_keys("train.steps_per_epoch", "train.checkpoint_every")
    ),
    "train.checkpoint_every": positive_int,
    "train.keep_checkpoints": positive_int,
    "train.mean_of_last": positive_int,
    "train.save_embeddings_epochs": _save_embeddings_epochs,
    "train.steps_per_dispatch": integer(0, note=" (0 = chosen automatically)"),
    "train.resume_changes": _resume_changes,
    # eval / predict
    "eval.step": _eval_step,
    "eval.online": boolean,
    "eval.tsne_perplexity": positive,
    "eval.figures": boolean,
    "eval.after_training": boolean,
    "predict.input": string(),
    "predict.output": string(),
    "predict.seed": integer(-1, note=" (-1 = the best seed by EMA top-1)"),
}


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, value) of every leaf, depth first."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def unchecked_keys(config: ml_collections.ConfigDict) -> list[str]:
    """The config's dotted keys that have no rule in `RULES`."""
    return [key for key, _ in leaves(config) if key not in RULES]


def config_errors(config: ml_collections.ConfigDict) -> list[tuple[str, object, str]]:
    """(key, value, requirement) for every value that breaks its rule, in config order."""
    errors = []
    for key, value in leaves(config):
        rule = RULES.get(key)
        if rule is None:
            continue
        try:
            problem = rule(value, config)
        except Exception as e:  # a rule must never hide the other errors
            problem = f"could not be checked ({type(e).__name__}: {e})"
        if problem:
            errors.append((key, value, problem))
    return errors


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises one `ConfigError` listing every invalid value; returns None when all are fine."""
    errors = config_errors(config)
    if errors:
        raise ConfigError(errors)
