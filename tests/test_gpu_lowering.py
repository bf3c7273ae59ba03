"""The GPU path, checked without a GPU: the K-step training program and the evaluation forward,
built for CUDA as they are on a GPU, lower with `jax.export(..., platforms=("cuda",))`.

This is evidence that the programs lower (StableHLO), not that they compile or run fast.
"""

import re

import jax
import numpy as np
import pytest

from configs import base
from ssl_jax import dispatch, inference, train, train_state
from ssl_jax.data.on_device import device_cache, make_augment_fn
from ssl_jax.data.synthetic import synthetic_dataset
from ssl_jax.models import cpu_conv

# Custom calls a CUDA build of XLA provides for what these programs use; anything else (a CPU
# library call, a TPU op) would fail to compile on a GPU.
GPU_CUSTOM_CALLS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}
STEPS_PER_DISPATCH = 8


def _spec(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def _custom_calls(text: str) -> set[str]:
    return set(re.findall(r"stablehlo\.custom_call @([\w.]+)", text)) | set(
        re.findall(r'call_target_name = "([^"]+)"', text)
    )


@pytest.fixture(autouse=True)
def _no_cpu_plans(monkeypatch):
    """A model built for CUDA must not reach any CPU formulation while it is traced."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a CPU convolution plan was used in a CUDA program")

    for name in ("planned_conv", "conv", "max_pool_argmax", "conv_patches", "conv_taps"):
        if hasattr(cpu_conv, name):
            monkeypatch.setattr(cpu_conv, name, forbidden)


def test_k_step_training_program_lowers_for_cuda_at_paper_shapes():
    config = base.get_config()  # CoMatch+Triplet, ResNet-18, B 32, mu 7, 60-px crops
    config.precision = "bf16"
    config.augment.where = "device"
    data = synthetic_dataset(num_classes=10, num_unlabelled=256, num_labelled=40, seed=0)
    setup = train_state.setup(config, 10, platform="cuda", abstract=True)
    views = setup.algorithm.unlabelled_views
    assert train_state.images_per_step(config, setup.algorithm) == 704
    assert config.data.crop_size == 60 and config.model.name == "resnet18"

    step_fn = train.make_step_fn(config, setup, make_augment_fn(config, views), platform="cuda")
    device_data = _spec(device_cache(data))
    b, bu = config.data.batch_size, config.data.mu * config.data.batch_size
    one_step = {
        "y": jax.ShapeDtypeStruct((b,), np.int32),
        "x_index": jax.ShapeDtypeStruct((b,), np.int32),
        "u_y": jax.ShapeDtypeStruct((bu,), np.int32),
        "u_index": jax.ShapeDtypeStruct((bu,), np.int32),
    }
    names = dispatch.metric_names(step_fn, setup.state, one_step, device_data)
    assert {"loss", "loss_dml", "ema_param_norm"} <= set(names)
    state = setup.state.replace(
        metric_sums=jax.eval_shape(lambda: dispatch.empty_metric_sums(names))
    )
    block = {
        key: jax.ShapeDtypeStruct((STEPS_PER_DISPATCH, *s.shape), s.dtype)
        for key, s in one_step.items()
    }
    program = dispatch.make_multi_step(step_fn, log_every=128, jit=False)
    exported = jax.export.export(jax.jit(program, donate_argnums=(0,)), platforms=("cuda",))(
        state, block, device_data
    )
    text = exported.mlir_module()
    assert exported.platforms == ("cuda",)
    assert "stablehlo.while" in text  # the K steps are one scan, not K copies
    assert "stablehlo.convolution" in text
    assert "bf16" in text  # the network computes in bfloat16
    assert _custom_calls(text) <= GPU_CUSTOM_CALLS, _custom_calls(text)


def test_evaluation_forward_lowers_for_cuda():
    config = base.get_config()
    config.precision = "bf16"
    setup = train_state.setup(config, 10, platform="cuda", abstract=True)
    variables = {"params": setup.state.ema_params, "batch_stats": setup.state.ema_batch_stats}
    images = jax.ShapeDtypeStruct((config.data.eval_batch_size, 60, 60, 3), np.uint8)
    eval_step = inference.make_eval_step(setup.model)
    exported = jax.export.export(eval_step, platforms=("cuda",))(variables, images)
    text = exported.mlir_module()
    assert "stablehlo.convolution" in text
    assert _custom_calls(text) <= GPU_CUSTOM_CALLS, _custom_calls(text)
