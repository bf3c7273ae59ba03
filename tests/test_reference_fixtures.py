"""Every golden fixture (tests/fixtures/README.md) against the code the train step runs.

One test per ``.npz`` in ``$SSL_JAX_FIXTURES`` (default ``tests/fixtures``), dispatched on the
file-name prefix; an unknown prefix fails, and so does any fixture key left unchecked, so a new
fixture or key cannot pass silently. Tolerances are the README's.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from helpers import da_history, semihard_triplet_masks, state_from_reference

import configs.base
from ssl_jax import losses, optim
from ssl_jax.algorithms import comatch, fixmatch, get_algorithm
from ssl_jax.models.heads import l2_normalize

FIXTURE_DIR = Path(os.environ.get("SSL_JAX_FIXTURES", Path(__file__).parent / "fixtures"))
FIXTURE_FILES = sorted(FIXTURE_DIR.glob("*.npz"))

# README tolerances (float32).
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}
PROB_TOL = {"rtol": 0.0, "atol": 1e-6}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}


class Fixture:
    """Read access to an ``.npz`` that remembers which keys were checked."""

    def __init__(self, path: Path):
        with np.load(path, allow_pickle=False) as data:
            self._arrays = {k: data[k] for k in data.files}
        self.used: set[str] = set()

    def __getitem__(self, key: str) -> np.ndarray:
        self.used.add(key)
        return self._arrays[key]

    def __contains__(self, key: str) -> bool:
        return key in self._arrays

    def keys(self):
        return self._arrays.keys()

    def scalar(self, key: str):
        return self[key].item()

    def assert_all_used(self):
        unchecked = sorted(set(self._arrays) - self.used)
        assert not unchecked, f"fixture keys not checked: {unchecked}"


def assert_close(actual, expected, tol, what):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64), err_msg=what, **tol
    )


def assert_exact(actual, expected, what):
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected), err_msg=what)


def assert_zero_rows(grad, expected, rows: slice, what):
    """Stop-gradient rows are exactly zero, in the fixture and here."""
    assert np.all(np.asarray(expected)[rows] == 0), f"{what}: fixture rows {rows} not zero"
    assert np.all(np.asarray(grad)[rows] == 0), f"{what}: rows {rows} not exactly zero"


# ---------------------------------------------------------------------------------- config

# Fixture hyper-parameter -> config.algorithm key (FixMatch's T is its own key).
CFG_KEYS = {
    "cfg_threshold": "threshold",
    "cfg_queue_batch": "queue_batch",
    "cfg_contrast_threshold": "contrast_threshold",
    "cfg_da_len": "da_len",
    "cfg_T": "T",
    "cfg_alpha": "alpha",
    "cfg_lambda_u": "lambda_u",
    "cfg_lambda_c": "lambda_c",
    "cfg_lambda_dml": "lambda_dml",
    "cfg_lambda_supcon": "lambda_ccssl",
    "cfg_lambda_contrast": "lambda_ccssl",
    "cfg_supcon_temperature": "supcon_temperature",
}


def algorithm_cfg(fx: Fixture, *, fixmatch_temperature: bool = False):
    """``configs.base`` algorithm config overridden by every ``cfg_*`` of the fixture."""
    cfg = configs.base.get_config().algorithm
    cfg_keys = [k for k in fx.keys() if k.startswith("cfg_")]
    for key in cfg_keys:
        if key in ("cfg_contrast_left_out", "cfg_contrast_with_thresh"):
            continue
        name = "fixmatch_T" if (key == "cfg_T" and fixmatch_temperature) else CFG_KEYS[key]
        cfg[name] = type(cfg[name])(fx.scalar(key))
    if "cfg_contrast_left_out" in fx:
        left_out = fx.scalar("cfg_contrast_left_out")
        thresh = fx.scalar("cfg_contrast_with_thresh")
        # docs/method.md#ccssl-settings: T_push applies only with contrast_left_out; ID leaves the
        # threshold at 0.
        cfg.t_push = float(thresh) if left_out else 0.0
        if not left_out:
            assert thresh == 0.0
    return cfg


# ------------------------------------------------------------------------------- triplet


@jax.jit
def _triplet(emb, emb_raw, labels):
    """Loss, counts and gradients w.r.t. the normalised and the raw embeddings, in one compile."""

    def loss_fn(e):
        return losses.semihard_triplet_loss(embeddings=e, labels=labels, margin=0.2)

    (loss, stats), grad_emb = jax.value_and_grad(loss_fn, has_aux=True)(emb)
    grad_emb_raw = jax.grad(lambda r: loss_fn(l2_normalize(r))[0])(emb_raw)
    return loss, stats, grad_emb, grad_emb_raw


def check_triplet(fx: Fixture):
    emb_raw = jnp.asarray(fx["emb_raw"])
    labels = jnp.asarray(fx["labels"])
    emb = l2_normalize(emb_raw)
    assert_close(emb, fx["emb"], PROB_TOL, "emb")

    loss, stats, grad_emb, grad_emb_raw = _triplet(jnp.asarray(fx["emb"]), emb_raw, labels)
    assert_close(loss, fx["loss"], LOSS_TOL, "loss")
    assert_exact(stats.valid, fx["n_triplets_all"], "n_triplets_all")
    assert_exact(stats.mined, fx["n_mined"], "n_mined")
    assert_exact(stats.positive, fx["n_positive_loss"], "n_positive_loss")
    assert_exact(stats.ties, fx["n_exact_ties"], "n_exact_ties")
    assert_close(grad_emb, fx["grad_emb"], GRAD_TOL, "grad_emb")
    assert_close(grad_emb_raw, fx["grad_emb_raw"], GRAD_TOL, "grad_emb_raw")
    if int(fx["n_positive_loss"]) == 0:
        assert float(loss) == 0.0
        assert not np.any(np.asarray(grad_emb)) and not np.any(np.asarray(grad_emb_raw))

    sim = losses.cosine_similarity(jnp.asarray(fx["emb"]))
    if "sim" in fx:
        assert_close(sim, fx["sim"], PROB_TOL, "sim")
    if "mined_anchor" in fx:
        masks = semihard_triplet_masks(similarity=sim, labels=labels, margin=0.2)
        anchor, positive, negative = np.nonzero(np.asarray(masks.mined))  # lexicographic
        assert_exact(anchor, fx["mined_anchor"], "mined_anchor")
        assert_exact(positive, fx["mined_positive"], "mined_positive")
        assert_exact(negative, fx["mined_negative"], "mined_negative")


# ------------------------------------------------------------------------------- CoMatch


@functools.partial(jax.jit, static_argnames=("algorithm_name", "cfg"))
def _step(logits, feats_raw, batch, state, epoch, iteration, *, algorithm_name, cfg):
    """The registered loss_from_outputs and its gradients, exactly as the train step calls it."""
    algorithm = get_algorithm(algorithm_name)

    def total(logits, feats_raw):
        feats = None if feats_raw is None else l2_normalize(feats_raw)
        return algorithm.loss_from_outputs(
            logits=logits,
            feats=feats,
            batch=batch,
            state=state,
            epoch=epoch,
            iteration=iteration,
            cfg=cfg,
        )

    argnums = (0,) if feats_raw is None else (0, 1)
    (loss, (new_state, metrics)), grads = jax.value_and_grad(total, argnums, has_aux=True)(
        logits, feats_raw
    )
    return loss, new_state, metrics, grads


@functools.partial(jax.jit, static_argnames=("cfg",))
def _comatch_terms(logits, feats_raw, batch, state, epoch, iteration, *, cfg):
    terms = comatch.comatch_terms(
        logits=logits,
        feats=l2_normalize(feats_raw),
        batch=batch,
        state=state,
        epoch=epoch,
        iteration=iteration,
        cfg=cfg,
    )
    terms.pop("feats_s0"), terms.pop("feats_s1")
    return terms


def run_comatch_step(
    *, algorithm_name, cfg, logits, feats_raw, targets_x, targets_u, state, epoch, iteration
):
    args = (
        jnp.asarray(logits),
        jnp.asarray(feats_raw),
        {"y": jnp.asarray(targets_x), "u_y": jnp.asarray(targets_u)},
        state,
        jnp.asarray(epoch, jnp.int32),
        jnp.asarray(iteration, jnp.int32),
    )
    loss, new_state, metrics, grads = _step(*args, algorithm_name=algorithm_name, cfg=cfg)
    terms = _comatch_terms(*args, cfg=cfg)
    return loss, new_state, metrics, grads, terms


def check_comatch_outputs(fx, *, index, loss, new_state, metrics, grads, terms, b, bu, prefix):
    """Compares one step against the fixture (``index`` selects a step of a sequence)."""

    def ref(key):
        value = fx[key]
        return value if index is None else value[index]

    what = f"{prefix}step {index}: " if index is not None else prefix
    assert_close(loss, ref("loss"), LOSS_TOL, what + "loss")
    assert_close(metrics["loss"], ref("loss"), LOSS_TOL, what + "metrics.loss")
    for ours, theirs in [
        ("loss_x", "loss_x"),
        ("loss_u", "loss_u"),
        ("loss_c", "loss_contrast"),
        ("mask_prob", "mask_prob"),
        ("pseudo_acc", "pseudo_acc"),
    ]:
        assert_close(metrics[ours], ref(theirs), LOSS_TOL, what + theirs)
    assert_exact(terms["smoothing_applied"].astype(np.int32), ref("smoothing_applied"), what)
    assert_close(terms["probs_da"], ref("probs_da"), PROB_TOL, what + "probs_da")
    assert_close(terms["probs"], ref("probs"), PROB_TOL, what + "probs")
    assert_exact(terms["mask"], ref("mask"), what + "mask")
    if index is None:
        assert_exact(terms["guess"], fx["lbs_u_guess"], what + "lbs_u_guess")
        assert_close(terms["Q"], fx["Q"], PROB_TOL, what + "Q")
        assert_exact(terms["pos_mask"], fx["pos_mask"], what + "pos_mask")
        if "sim_probs" in fx:
            assert_close(terms["sim_probs"], fx["sim_probs"], PROB_TOL, what + "sim_probs")

    grad_logits, grad_feats_raw = grads
    assert_close(grad_logits, ref("grad_logits"), GRAD_TOL, what + "grad_logits")
    assert_close(grad_feats_raw, ref("grad_feats_raw"), GRAD_TOL, what + "grad_feats_raw")
    # docs/method.md#total-loss: nothing reaches u_w logits, u_s1 logits, x features or u_w
    # features.
    assert_zero_rows(grad_logits, ref("grad_logits"), slice(b, b + bu), what + "grad ℓw")
    assert_zero_rows(grad_logits, ref("grad_logits"), slice(b + 2 * bu, None), what + "grad ℓs1")
    assert_zero_rows(grad_feats_raw, ref("grad_feats_raw"), slice(0, b + bu), what + "grad zx,zw")


def check_comatch_step(fx: Fixture, algorithm_name: str):
    cfg = algorithm_cfg(fx)
    b, mu = fx.scalar("batch_size"), fx.scalar("mu")
    bu = mu * b
    assert fx["queue_feats_in"].shape[0] == comatch.queue_size(cfg, batch_size=b, mu=mu)
    state = state_from_reference(
        queue_feats=fx["queue_feats_in"],
        queue_probs=fx["queue_probs_in"],
        queue_ptr=fx["queue_ptr_in"],
        prob_hist=fx["prob_hist_in"],
        da_len=cfg.da_len,
    )
    if "feats" in fx:
        assert_close(l2_normalize(jnp.asarray(fx["feats_raw"])), fx["feats"], PROB_TOL, "feats")
    loss, new_state, metrics, grads, terms = run_comatch_step(
        algorithm_name=algorithm_name,
        cfg=ml_collections.FrozenConfigDict(cfg),
        logits=fx["logits"],
        feats_raw=fx["feats_raw"],
        targets_x=fx["targets_x"],
        targets_u=fx["targets_u"],
        state=state,
        epoch=fx["epoch"],
        iteration=fx["iter"],
    )
    check_comatch_outputs(
        fx,
        index=None,
        loss=loss,
        new_state=new_state,
        metrics=metrics,
        grads=grads,
        terms=terms,
        b=b,
        bu=bu,
        prefix=f"{algorithm_name}: ",
    )
    assert_close(new_state["queue_feats"], fx["queue_feats_out"], PROB_TOL, "queue_feats_out")
    assert_close(new_state["queue_probs"], fx["queue_probs_out"], PROB_TOL, "queue_probs_out")
    assert_exact(new_state["queue_ptr"], fx["queue_ptr_out"], "queue_ptr_out")
    hist = da_history(new_state)
    assert hist.shape == fx["prob_hist_out"].shape
    assert_close(hist, fx["prob_hist_out"], PROB_TOL, "prob_hist_out")
    if algorithm_name == "comatch_triplet":
        assert_close(metrics["loss_dml"], fx["loss_dml"], LOSS_TOL, "loss_dml")
    if algorithm_name == "comatch_ccssl":
        assert_close(metrics["loss_ccssl"], fx["loss_ccssl"], LOSS_TOL, "loss_ccssl")


def check_comatch_sequence(fx: Fixture):
    cfg = algorithm_cfg(fx)
    b, mu = fx.scalar("batch_size"), fx.scalar("mu")
    bu = mu * b
    num_steps, _, num_classes = fx["logits"].shape
    state = comatch.init_state(
        cfg, num_classes=num_classes, low_dim=fx["feats_raw"].shape[2], batch_size=b, mu=mu
    )
    assert state["queue_feats"].shape[0] == fx.scalar("queue_size")
    for s in range(num_steps):
        loss, state, metrics, grads, terms = run_comatch_step(
            algorithm_name="comatch",
            cfg=ml_collections.FrozenConfigDict(cfg),
            logits=fx["logits"][s],
            feats_raw=fx["feats_raw"][s],
            targets_x=fx["targets_x"][s],
            targets_u=fx["targets_u"][s],
            state=state,
            epoch=0,
            iteration=s,
        )
        check_comatch_outputs(
            fx,
            index=s,
            loss=loss,
            new_state=state,
            metrics=metrics,
            grads=grads,
            terms=terms,
            b=b,
            bu=bu,
            prefix="comatch: ",
        )
        what = f"step {s}: "
        assert_close(state["queue_feats"], fx["queue_feats_after"][s], PROB_TOL, what + "QF")
        assert_close(state["queue_probs"], fx["queue_probs_after"][s], PROB_TOL, what + "QP")
        assert_exact(state["queue_ptr"], fx["queue_ptr_after"][s], what + "ptr")
        assert_exact(state["prob_hist_len"], fx["prob_hist_len_after"][s], what + "hist len")
    # The fixture is only meaningful if it crossed the interesting boundaries.
    assert 0 in fx["smoothing_applied"] and 1 in fx["smoothing_applied"]
    assert 0 in fx["queue_ptr_after"]


# ------------------------------------------------------------------------------- CCSSL


def check_ccssl_supcon(fx: Fixture):
    labels = jnp.asarray(fx["labels"])
    confidence = jnp.asarray(fx["max_probs"])
    temperature = fx.scalar("temperature")
    select = losses.ccssl_select_matrix(confidence=confidence, t_push=fx.scalar("t_push"))
    assert_exact(select, fx["select_matrix_od"], "select_matrix_od")

    def per_anchor(raw0, raw1, select, diag_weight="one"):
        return losses.class_aware_contrastive_loss(
            view0=l2_normalize(raw0),
            view1=l2_normalize(raw1),
            confidence=confidence,
            labels=labels,
            temperature=temperature,
            select=select,
            diag_weight=diag_weight,
        )

    raw = (jnp.asarray(fx["feats_raw_view0"]), jnp.asarray(fx["feats_raw_view1"]))
    for setting, sel in [("id", None), ("od", select)]:
        anchors = jax.jit(per_anchor)(*raw, sel)
        grads = jax.grad(lambda r0, r1, s=sel: jnp.mean(per_anchor(r0, r1, s)), (0, 1))(*raw)
        assert_close(anchors, fx[f"loss_per_anchor_{setting}"], LOSS_TOL, f"per anchor {setting}")
        assert_close(jnp.mean(anchors), fx[f"loss_{setting}"], LOSS_TOL, f"loss_{setting}")
        for v in (0, 1):
            key = f"grad_feats_raw_view{v}_{setting}"
            assert_close(grads[v], fx[key], GRAD_TOL, key)
        old = jnp.mean(per_anchor(*raw, sel, diag_weight="confidence_squared"))
        assert_close(old, fx[f"loss_{setting}_nodiagfix"], LOSS_TOL, f"nodiagfix {setting}")


# ------------------------------------------------------------------------------ FixMatch


def check_fixmatch_step(fx: Fixture, algorithm_name: str):
    cfg = algorithm_cfg(fx, fixmatch_temperature=True)
    b, mu = fx.scalar("batch_size"), fx.scalar("mu")
    bu = mu * b
    with_ccssl = algorithm_name == "fixmatch_ccssl"
    num_views = 3 if with_ccssl else 2
    assert fx["logits"].shape[0] == b + num_views * bu
    feats_raw = jnp.asarray(fx["feats_raw"]) if with_ccssl else None
    if with_ccssl:
        assert_close(l2_normalize(feats_raw), fx["feats"], PROB_TOL, "feats")
    batch = {"y": jnp.asarray(fx["targets_x"]), "u_y": jnp.asarray(fx["targets_u"])}
    loss, _, metrics, grads = _step(
        jnp.asarray(fx["logits"]),
        feats_raw,
        batch,
        {},
        jnp.asarray(0, jnp.int32),
        jnp.asarray(0, jnp.int32),
        algorithm_name=algorithm_name,
        cfg=ml_collections.FrozenConfigDict(cfg),
    )
    _, _, aux = fixmatch.fixmatch_terms(
        logits=jnp.asarray(fx["logits"]), batch=batch, cfg=cfg, num_views=num_views
    )
    assert_close(aux["max_probs"], fx["max_probs"], PROB_TOL, "max_probs")
    assert_exact(aux["pseudo_labels"], fx["pseudo_labels"], "pseudo_labels")
    assert_exact(aux["mask"], fx["mask"], "mask")
    assert_close(loss, fx["loss"], LOSS_TOL, "loss")
    for key in ("loss", "loss_x", "loss_u", "mask_prob", "pseudo_acc"):
        assert_close(metrics[key], fx[key], LOSS_TOL, key)
    grad_logits = grads[0]
    assert_close(grad_logits, fx["grad_logits"], GRAD_TOL, "grad_logits")
    assert_zero_rows(grad_logits, fx["grad_logits"], slice(b, b + bu), "grad ℓw")
    if with_ccssl:
        assert_close(metrics["loss_ccssl"], fx["loss_ccssl"], LOSS_TOL, "loss_ccssl")
        assert_close(grads[1], fx["grad_feats_raw"], GRAD_TOL, "grad_feats_raw")
        assert_zero_rows(grad_logits, fx["grad_logits"], slice(b + 2 * bu, None), "grad ℓs1")
        assert_zero_rows(grads[1], fx["grad_feats_raw"], slice(0, b + bu), "grad zx,zw")


# ------------------------------------------------------------------------ optimiser, EMA


def check_lr_cosine(fx: Fixture):
    schedule = optim.cosine_schedule(
        fx.scalar("base_lr"),
        fx.scalar("total_steps"),
        warmup_steps=fx.scalar("warmup_steps"),
        num_cycles=fx.scalar("num_cycles"),
    )
    lr = np.array([schedule(k) for k in fx["steps"]])
    assert_close(lr, fx["lr"], {"rtol": 1e-5, "atol": 1e-9}, "lr")


# Flax paths of the fixture's flat PyTorch order (fc.weight is (out, in); a kernel is (in, out)).
PARAM_PATHS = [
    ("fc", "kernel"),
    ("fc", "bias"),
    ("bn", "scale"),
    ("bn", "bias"),
    ("downsample_bn", "scale"),
    ("downsample_bn", "bias"),
]


def params_from_flat(flat: np.ndarray, sizes: np.ndarray) -> dict:
    pieces = np.split(np.asarray(flat), np.cumsum(sizes)[:-1])
    tree = {}
    for path, piece in zip(PARAM_PATHS, pieces, strict=True):
        value = piece.reshape(2, 3).T if path == ("fc", "kernel") else piece
        tree.setdefault(path[0], {})[path[1]] = jnp.asarray(value)
    return tree


def params_to_flat(tree: dict) -> np.ndarray:
    pieces = []
    for module, name in PARAM_PATHS:
        value = np.asarray(tree[module][name])
        pieces.append((value.T if (module, name) == ("fc", "kernel") else value).ravel())
    return np.concatenate(pieces)


def check_sgd_ema(fx: Fixture):
    sizes = fx["param_sizes"]
    params = params_from_flat(fx["params_init"], sizes)
    assert_exact(params_to_flat(params), fx["params_init"], "flat round trip")
    mask = params_to_flat(
        jax.tree.map(lambda m, p: np.full(p.shape, m), optim.decay_mask(params), params)
    )
    assert_exact(mask.astype(np.float32), fx["decay_mask"], "decay_mask")

    optim_cfg = configs.base.get_config().optim
    optim_cfg.lr = fx.scalar("cfg_lr")
    optim_cfg.momentum = fx.scalar("cfg_momentum")
    optim_cfg.weight_decay = fx.scalar("cfg_weight_decay")
    optim_cfg.warmup_steps = 0
    total_steps = fx.scalar("total_steps")
    tx, schedule = optim.make_optimizer(optim_cfg, total_steps, params)  # the schedule tx uses
    opt_state = tx.init(params)
    ema_params = params
    ema_decay = fx.scalar("cfg_ema_decay")
    tol = {"rtol": 1e-5, "atol": 1e-7}
    for k in range(fx["grads"].shape[0]):
        assert_close(schedule(k), fx["lr_used"][k], {"rtol": 1e-5, "atol": 1e-9}, f"lr {k}")
        grads = params_from_flat(fx["grads"][k], sizes)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema_params = optim.ema_update(ema_params, params, ema_decay)
        assert_close(params_to_flat(params), fx["params_after"][k], tol, f"params {k}")
        assert_close(params_to_flat(ema_params), fx["ema_params_after"][k], tol, f"ema {k}")
        # docs/method.md#ema: buffers are copied into the EMA model, not averaged.
        assert_exact(fx["ema_buffers_after"][k], fx["buffers_set"][k], f"ema buffers {k}")


# ------------------------------------------------------------------------------ dispatch

HANDLERS: dict[str, Callable[[Fixture], None]] = {
    "triplet_": check_triplet,
    "comatch_step_": functools.partial(check_comatch_step, algorithm_name="comatch"),
    "comatch_sequence_": check_comatch_sequence,
    "comatch_triplet_step_": functools.partial(
        check_comatch_step, algorithm_name="comatch_triplet"
    ),
    "comatch_ccssl_step_": functools.partial(check_comatch_step, algorithm_name="comatch_ccssl"),
    "ccssl_supcon_loss": check_ccssl_supcon,
    "fixmatch_step": functools.partial(check_fixmatch_step, algorithm_name="fixmatch"),
    "fixmatch_ccssl_step_": functools.partial(check_fixmatch_step, algorithm_name="fixmatch_ccssl"),
    "lr_cosine_": check_lr_cosine,
    "sgd_ema_": check_sgd_ema,
}


def test_fixture_folder_is_populated():
    assert FIXTURE_FILES, f"no .npz fixtures in {FIXTURE_DIR}"


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
def test_reference_fixture(path: Path):
    prefixes = [p for p in HANDLERS if path.stem.startswith(p)]
    assert prefixes, f"no checker for fixture {path.name}"
    handler = HANDLERS[max(prefixes, key=len)]
    fx = Fixture(path)
    with jax.default_matmul_precision("float32"):
        handler(fx)
    fx.assert_all_used()
