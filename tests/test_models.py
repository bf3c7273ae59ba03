"""Backbones: architecture (docs/method.md#models), parameter counts, init, BN, heads,
weight-decay names (docs/method.md#sgd-and-weight-decay)."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from helpers import random_uniform

from ssl_jax import models
from ssl_jax.models import CPU_PLANS, MODELS, conv_layers, cpu_conv, get_model, layers

TINY_WIDTH = 0.125

# Every test here checks structure or compares programs built here with each other (never
# with fixtures): XLA's optimisations mostly off builds them several times faster.
pytestmark = pytest.mark.usefixtures("less_optimized_module")


def _abstract_variables(model, image_size=60):
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _decayed(path: tuple[str, ...]) -> bool:
    """The lead's weight-decay mask rule (docs/method.md#sgd-and-weight-decay restated for flax
    names)."""
    return path[-1] == "kernel" or (path[-1] == "scale" and path[-2].startswith("downsample_bn"))


def _images(n=2, size=60, seed=0):
    return random_uniform((n, size, size, 3), -2.0, 2.0, seed)


@pytest.fixture(scope="module")
def tiny_resnet18(less_optimized_module):
    """One tiny ResNet-18 initialisation shared by the tests (compiles dominate runtime)."""
    model = get_model("resnet18", 4, 8, width=TINY_WIDTH)
    images = _images(4, 32)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images)
    return model, variables, images


@pytest.mark.parametrize(
    "name,num_classes,expected",
    [
        ("resnet18", 10, 12_363_402),
        ("resnet50", 10, 27_856_010),
        ("wrn28_2", 10, 1_492_378),
        ("wrn28_2", 30, 1_494_958),
    ],
)
def test_parameter_counts(name, num_classes, expected):
    variables = _abstract_variables(get_model(name, num_classes, 64))
    assert _count(variables["params"]) == expected
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


@pytest.mark.parametrize(
    "name,backbone,classifier,fc1",
    [
        ("resnet18", 11_176_512, 5_130, 1_050_624),
        ("resnet50", 23_508_032, 20_490, 4_196_352),
    ],
)
def test_resnet_parameter_breakdown(name, backbone, classifier, fc1):
    params = _abstract_variables(get_model(name, 10, 64))["params"]
    heads = {"classifier", "proj_fc1", "proj_fc2"}
    assert _count({k: v for k, v in params.items() if k not in heads}) == backbone
    assert _count(params["classifier"]) == classifier
    assert _count(params["proj_fc1"]) == fc1
    assert _count(params["proj_fc2"]) == 131_136


def test_resnet18_batch_norm_running_statistics():
    batch_stats = _abstract_variables(get_model("resnet18", 10))["batch_stats"]
    assert _count(batch_stats) == 9_600
    paths = flatten_dict(batch_stats)
    assert {path[-1] for path in paths} == {"mean", "var"}
    assert all(leaf.dtype == jnp.float32 for leaf in paths.values())


@pytest.mark.parametrize(
    "name,decayed,not_decayed,downsample_bns",
    [
        ("resnet18", 12_352_576, 10_826, 3),
        ("resnet50", None, None, 4),
        ("wrn28_2", 1_488_560, 3_818, 0),
    ],
)
def test_weight_decay_names(name, decayed, not_decayed, downsample_bns):
    params = flatten_dict(_abstract_variables(get_model(name, 10, 64))["params"])
    n_decayed = sum(math.prod(v.shape) for k, v in params.items() if _decayed(k))
    n_other = sum(math.prod(v.shape) for k, v in params.items() if not _decayed(k))
    if decayed is not None:
        assert (n_decayed, n_other) == (decayed, not_decayed)
    leaf_names = {path[-1] for path in params}
    assert leaf_names == {"kernel", "bias", "scale"}
    # Every BN scale is paired with a bias; only downsample-shortcut BNs carry the name.
    bn_modules = {path[:-1] for path in params if path[-1] == "scale"}
    downsample = {m for m in bn_modules if m[-1].startswith("downsample_bn")}
    assert len(downsample) == downsample_bns
    assert all("downsample" not in m[-1] for m in bn_modules - downsample)
    assert all(m + ("bias",) in params for m in bn_modules)
    for head in ("classifier", "proj_fc1", "proj_fc2"):
        assert (head, "kernel") in params and (head, "bias") in params
    # Convolutions carry no bias.
    assert all(
        (*path[:-1], "bias") not in params
        for path, v in params.items()
        if path[-1] == "kernel" and v.ndim == 4
    )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shapes_dtypes_and_unit_norm(name):
    model = get_model(name, 7, 16, width=TINY_WIDTH)
    images = _images(3, 32)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images)
    (logits, z), _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, images
    )
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    assert z.shape == (3, 16) and z.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_resnet18_feature_map_sizes_at_60px():
    """The table of docs/method.md#resnet: 30 -> 15 (max-pool) -> 15 -> 8 -> 4 -> 2."""
    model = get_model("resnet18", 10, width=TINY_WIDTH)
    images = jax.ShapeDtypeStruct((2, 60, 60, 3), jnp.float32)

    def intermediates(x):
        variables = model.init(jax.random.PRNGKey(0), x, train=False)
        _, state = model.apply(
            variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
        return state["intermediates"]

    shapes = jax.eval_shape(intermediates, images)
    assert shapes["stem_conv"]["__call__"][0].shape == (2, 30, 30, 8)
    expected = {"layer1_1": (15, 8), "layer2_1": (8, 16), "layer3_1": (4, 32), "layer4_1": (2, 64)}
    for block, (size, channels) in expected.items():
        assert shapes[block]["__call__"][0].shape == (2, size, size, channels)


def test_no_projection_head():
    model = get_model("resnet18", 5, low_dim=0, width=TINY_WIDTH)
    variables = _abstract_variables(model, 32)
    assert set(variables["params"]) & {"proj_fc1", "proj_fc2"} == set()
    logits, z = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False),
        variables,
        jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
    )
    assert logits.shape == (2, 5) and z is None
    assert get_model("wrn28_2", 5, low_dim=None).low_dim is None


def test_unknown_model_name():
    with pytest.raises(ValueError, match="resnet18"):
        get_model("vgg16", 10)


def test_train_and_eval_batch_norm(tiny_resnet18):
    model, variables, images = tiny_resnet18
    (logits_train, _), updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    # Train mode updates every running statistic.
    old = flatten_dict(variables["batch_stats"])
    new = flatten_dict(updates["batch_stats"])
    assert all(not np.allclose(old[k], new[k]) for k in old)
    # PyTorch momentum 0.1: new mean = 0.1 * batch mean of the stem conv output (the BN input).
    stem_out = jax.lax.conv_general_dilated(
        images,
        variables["params"]["stem_conv"]["kernel"],
        (2, 2),
        [(3, 3), (3, 3)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(
        new[("stem_bn", "mean")], 0.1 * jnp.mean(stem_out, axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        new[("stem_bn", "var")], 0.9 + 0.1 * jnp.var(stem_out, axis=(0, 1, 2)), rtol=1e-4
    )
    # Eval mode mutates nothing and uses the running statistics: outputs differ from train mode.
    logits_eval, _ = model.apply(variables, images, train=False)
    assert not np.allclose(logits_eval, logits_train, atol=1e-3)
    trained = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    logits_eval_2, _ = model.apply(trained, images, train=False)
    assert not np.allclose(logits_eval_2, logits_eval, atol=1e-4)


def test_wrn_dead_batch_norm_quirk():
    """docs/method.md#q9-wrn-dead-batchnorm: BN1 of group2_0 / group3_0 is computed (stats update)
    but gets no gradient."""
    model = get_model("wrn28_2", 4, 8, width=TINY_WIDTH)
    images = _images(4, 32)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images)

    def loss(params):
        (logits, z), updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(logits) + jnp.sum(z), updates

    grads, updates = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    for block in ("group2_0", "group3_0"):
        assert float(jnp.max(jnp.abs(grads[block]["bn1"]["scale"]))) == 0.0
        assert float(jnp.max(jnp.abs(grads[block]["bn1"]["bias"]))) == 0.0
        # BN momentum 0.001: running mean moves from 0 by 0.001 * batch mean (nonzero).
        mean = updates["batch_stats"][block]["bn1"]["mean"]
        assert 0 < float(jnp.max(jnp.abs(mean))) < 0.01
    for block in ("group1_0", "group2_1", "group3_1"):
        assert float(jnp.max(jnp.abs(grads[block]["bn1"]["scale"]))) > 0.0
    # PyTorch momentum 0.001 on group1_0/bn1, whose input is the stem conv (3x3, pad 1) output.
    stem_out = jax.lax.conv_general_dilated(
        images,
        variables["params"]["stem_conv"]["kernel"],
        (1, 1),
        [(1, 1), (1, 1)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(
        updates["batch_stats"]["group1_0"]["bn1"]["mean"],
        0.001 * jnp.mean(stem_out, axis=(0, 1, 2)),
        rtol=1e-4,
        atol=1e-8,
    )


def test_cpu_built_models_have_the_lax_parameters_and_function(tiny_resnet18, less_optimized):
    """Checkpoints move between platforms: a model built with CPU plans has the lax-built
    model's parameter tree (same initial values) and computes the same function (a
    train-mode forward + backward), whichever conv_impl. (Every compared program is built
    here, alike, with XLA's optimisations mostly off: conftest.less_optimized_compiles.)"""
    _, variables, images = tiny_resnet18  # default build: CPU plans on a CPU machine
    lax_model = get_model("resnet18", 4, 8, width=TINY_WIDTH, platform="cuda")
    chex.assert_trees_all_equal(
        jax.jit(lambda x: lax_model.init(jax.random.PRNGKey(0), x, train=False))(images),
        variables,
    )
    results = []
    builds = [("cuda", "auto"), ("cpu", "patches"), ("cpu", "taps"), ("cpu", "auto")]
    for platform, impl in builds:
        model = get_model("resnet18", 4, 8, width=TINY_WIDTH, conv_impl=impl, platform=platform)

        def loss(params, model=model):
            (logits, z), _ = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(logits) + jnp.sum(z)

        results.append(jax.jit(jax.value_and_grad(loss))(variables["params"]))
    reference = results[0]
    for build, result in zip(builds[1:], results[1:], strict=True):
        np.testing.assert_allclose(result[0], reference[0], rtol=1e-4, err_msg=str(build))
        # Float32 summation order differs; a 4-image BatchNorm amplifies that, so compare
        # each gradient leaf relative to its own scale.
        leaves = zip(jax.tree.leaves(result[1]), jax.tree.leaves(reference[1]), strict=True)
        for a, b in leaves:
            assert float(jnp.max(jnp.abs(a - b))) <= 1e-3 * float(jnp.max(jnp.abs(b))) + 1e-6, build


def _cpu_plans_raise(monkeypatch):
    """Replaces every entry point of the CPU formulations with one that raises."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a CPU formulation was used")

    for name in ("planned_conv", "conv", "choose_conv_plan", "xla_cpu_conv_library"):
        monkeypatch.setattr(cpu_conv, name, forbidden)
    for name in ("max_pool_argmax", "conv_patches", "conv_dense", "conv_taps"):
        monkeypatch.setattr(cpu_conv, name, forbidden)
    # A fresh cache of the CPU layers, so earlier builds cannot hand back the real ones.
    fresh = functools.cache(models._cpu_conv_layers.__wrapped__)
    monkeypatch.setattr(models, "_cpu_conv_layers", fresh)


def _train_grad(model):
    def loss(variables, images):
        (logits, z), _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return jnp.sum(logits) + jnp.sum(z)

    return jax.grad(loss)


@pytest.mark.parametrize("name", ["resnet18", "wrn28_2"])
def test_model_built_for_cuda_holds_no_cpu_plan_and_exports_for_cuda(name, monkeypatch):
    """Whatever machine traces it, a model built for a GPU uses lax convolutions only."""
    _cpu_plans_raise(monkeypatch)
    with pytest.raises(AssertionError, match="CPU formulation"):  # the spy sees CPU builds
        cpu_model = get_model(name, 4, 8, width=TINY_WIDTH, conv_impl="patches", platform="cpu")
        jax.eval_shape(lambda: cpu_model.init(jax.random.PRNGKey(0), _images(2, 32), train=False))
    model = get_model(name, 4, 8, width=TINY_WIDTH, platform="cuda")
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
    exported = jax.export.export(jax.jit(_train_grad(model)), platforms=("cuda",))(
        variables, images
    )
    assert exported.platforms == ("cuda",)
    num_convs = sum(leaf.ndim == 4 for leaf in jax.tree.leaves(variables["params"]))
    # Forward, input gradient (but not for the stem, whose input is the images) and kernel
    # gradient of each convolution.
    assert exported.mlir_module().count("stablehlo.convolution") == 3 * num_convs - 1


def test_cpu_plans_are_visible_in_the_program_and_absent_from_a_cuda_build():
    """The same check without spies: CPU-built programs hold custom VJPs and fewer lax
    convolutions; the cuda build holds one lax convolution per layer and no custom VJP."""

    def program(platform, impl="auto"):
        model = get_model("resnet18", 4, 8, width=TINY_WIDTH, conv_impl=impl, platform=platform)
        images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
        variables = jax.eval_shape(
            lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images
        )
        forward = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, mutable=True))
        text = str(forward(variables, images))
        return text, sum(leaf.ndim == 4 for leaf in jax.tree.leaves(variables["params"]))

    cuda, num_convs = program("cuda")
    assert cuda.count("conv_general_dilated[") == num_convs == 20
    assert "custom_vjp" not in cuda and "reduce_window_max" in cuda
    cpu, _ = program("cpu")
    assert "custom_vjp" in cpu  # the stem max-pool at least
    patches, _ = program("cpu", "patches")
    assert "conv_general_dilated[" not in patches


def test_conv_layers_refuses_cpu_plans_off_the_cpu():
    for plan in CPU_PLANS:
        with pytest.raises(ValueError, match="CPU formulation"):
            get_model("resnet18", 4, conv_impl=plan, platform="cuda")
        conv_layers(plan, "cpu")  # accepted there
    with pytest.raises(ValueError, match="conv_impl"):
        conv_layers("cudnn", "cpu")
    assert conv_layers("auto", "tpu") == conv_layers("lax", "cpu") == (layers.Conv, layers.max_pool)
    assert conv_layers("auto", "cpu")[1] is cpu_conv.max_pool_argmax


def test_initialisation_statistics():
    model = get_model("resnet18", 10, 64, width=0.5)
    params = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(
        jnp.zeros((1, 32, 32, 3))
    )["params"]
    # He fan-out normal: std sqrt(2 / (3 * 3 * 256)) for layer4's 256 -> 256 conv.
    kernel = params["layer4_1"]["conv2"]["kernel"]
    assert kernel.shape == (3, 3, 256, 256)
    assert abs(float(jnp.std(kernel)) / math.sqrt(2 / (9 * 256)) - 1) < 0.02
    assert abs(float(jnp.mean(kernel))) < 1e-3
    # BN gamma 1, beta 0.
    np.testing.assert_array_equal(params["layer1_0"]["bn1"]["scale"], 1.0)
    np.testing.assert_array_equal(params["layer2_0"]["downsample_bn"]["scale"], 1.0)
    np.testing.assert_array_equal(params["layer2_0"]["downsample_bn"]["bias"], 0.0)
    # PyTorch Linear default: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    for head, fan_in in (("proj_fc1", 256), ("proj_fc2", 1024), ("classifier", 256)):
        bound = 1 / math.sqrt(fan_in)
        for leaf in ("kernel", "bias"):
            values = params[head][leaf]
            assert float(jnp.max(jnp.abs(values))) <= bound
            if values.size >= 1000:  # then the extremes come within 1% of the bound
                assert float(jnp.max(jnp.abs(values))) > 0.95 * bound
            assert float(jnp.min(jnp.abs(values))) > 0  # not zero-initialised
        w = params[head]["kernel"]
        assert abs(float(jnp.std(w)) / (bound / math.sqrt(3)) - 1) < 0.1

    wrn = get_model("wrn28_2", 10, 64)
    wrn_params = jax.jit(lambda x: wrn.init(jax.random.PRNGKey(0), x, train=False))(
        jnp.zeros((1, 8, 8, 3))
    )["params"]
    # Xavier-normal Linear weights, zero bias.
    fc1 = wrn_params["proj_fc1"]["kernel"]
    assert fc1.shape == (128, 128)
    assert abs(float(jnp.std(fc1)) / math.sqrt(2 / 256) - 1) < 0.05
    np.testing.assert_array_equal(wrn_params["proj_fc1"]["bias"], 0.0)
    np.testing.assert_array_equal(wrn_params["classifier"]["bias"], 0.0)
    conv = wrn_params["group3_1"]["conv2"]["kernel"]
    assert abs(float(jnp.std(conv)) / math.sqrt(2 / (9 * 128)) - 1) < 0.03


def test_bfloat16_path(tiny_resnet18):
    reference, variables, images = tiny_resnet18
    model = get_model("resnet18", 4, 8, width=TINY_WIDTH, dtype=jnp.bfloat16)
    assert jax.tree.map(
        jnp.shape, jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
    ) == jax.tree.map(jnp.shape, variables)
    assert all(
        leaf.dtype == jnp.float32
        for leaf in jax.tree.leaves(
            jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
        )
    )
    (logits, z), updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    assert logits.dtype == jnp.float32 and z.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates))
    np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)
    # Eval mode (running statistics, no tiny-batch normalisation) is close to float32.
    logits_16, _ = model.apply(variables, images, train=False)
    logits_32, _ = reference.apply(variables, images, train=False)
    assert logits_16.dtype == jnp.float32
    np.testing.assert_allclose(
        logits_16, logits_32, rtol=0.05, atol=0.05 * float(jnp.max(jnp.abs(logits_32)))
    )
