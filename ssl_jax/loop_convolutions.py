"""Convolutions that XLA:CPU runs fast inside loops: the K-step program's scan body.

Reverse-mode autodiff writes a convolution's input and kernel gradients as convolutions
whose dimension orders are permuted (the kernel gradient treats the input's channels as its
batch, e.g. ``f01b_i01o->01bf``). Outside loops XLA:CPU rewrites every convolution into
``NHWC x HWIO -> NHWC`` with explicit transposes and hands it to its Eigen library; inside a
while loop's body (the `jax.lax.scan` of `ssl_jax.dispatch`) it does not, and runs them
with its generic loop emitter instead (jax-ml/jax#12868, still open). Measured on the
2-core development CPU (2026-12-02, `benchmarks/scan_convolutions.py`, benchmarks/RESULTS.md),
one CoMatch+Triplet step of ResNet-18, B 8, mu 2: 376 ms jitted alone, 13.5 s as the body of
a one-step scan, 385 ms as that body after `canonical_convolutions`; at 1/16 width 44 ms,
67 ms and 32 ms.

`canonical_convolutions(fn)` is `fn` with every convolution (at any depth of nested jitted
calls) written in that canonical order, transposes made explicit: the same arithmetic XLA
does outside loops, so the values match a step jitted alone. Only programs built for the
CPU use it (`ssl_jax.program`); programs for other platforms are left as autodiff wrote
them (XLA:GPU assigns cuDNN's layouts itself; not measured here, no GPU has been lent).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jax_core

_CONV = lax.conv_general_dilated_p
_CALLS = ("pjit", "jit")  # nested jitted functions: their bodies are rewritten inline


def canonical_conv(lhs, rhs, *, dimension_numbers, **params):
    """`conv_general_dilated` with any dimension order, computed as batch-spatial-feature
    input, spatial-in-out kernel and batch-spatial-feature output, transposing around it."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    batch, feature, *lhs_spatial = lhs_spec
    out_feature, in_feature, *rhs_spatial = rhs_spec
    n = len(lhs_spatial)
    lhs = jnp.transpose(lhs, (batch, *lhs_spatial, feature))
    rhs = jnp.transpose(rhs, (*rhs_spatial, in_feature, out_feature))
    spatial = tuple(range(1, n + 1))
    canonical = lax.ConvDimensionNumbers(
        lhs_spec=(0, n + 1, *spatial),
        rhs_spec=(n + 1, n, *range(n)),
        out_spec=(0, n + 1, *spatial),
    )
    out = _CONV.bind(lhs, rhs, dimension_numbers=canonical, **params)
    out_batch, out_feat, *out_spatial = out_spec
    perm = [0] * (n + 2)  # out's axes are (batch, spatial..., feature)
    perm[out_batch], perm[out_feat] = 0, n + 1
    for axis, dim in enumerate(out_spatial, start=1):
        perm[dim] = axis
    return jnp.transpose(out, perm)


def _evaluate(jaxpr, consts, *args):
    """Evaluates `jaxpr` into the current trace, convolutions rewritten by `canonical_conv`."""
    env = {}

    def read(var):
        return var.val if isinstance(var, jax_core.Literal) else env[var]

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = value
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        inputs = [read(var) for var in eqn.invars]
        if eqn.primitive is _CONV:
            outputs = [canonical_conv(*inputs, **eqn.params)]
        elif eqn.primitive.name in _CALLS:
            inner = eqn.params["jaxpr"]
            outputs = _evaluate(inner.jaxpr, inner.consts, *inputs)
        else:
            with eqn.ctx.manager:
                outputs = eqn.primitive.bind(*inputs, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outputs = [outputs]
        for var, value in zip(eqn.outvars, outputs, strict=True):
            env[var] = value
    return [read(var) for var in jaxpr.outvars]


_TRACES_KEPT = 4


def _shape_dtype(x) -> tuple:
    aval = jax.typeof(x)
    return aval.shape, aval.dtype, aval.weak_type


def canonical_convolutions(fn: Callable) -> Callable:
    """`fn` (array pytrees in and out) with its convolutions in XLA:CPU's canonical order."""

    traced = {}  # the last few traces, by argument structure and types: tracing is costly

    def rewritten(*args):
        leaves, treedef = jax.tree.flatten(args)
        # Not the avals' shardings: the names of the mesh's automatic axes change no trace.
        key = (treedef, tuple(_shape_dtype(leaf) for leaf in leaves))
        if key not in traced:
            if len(traced) >= _TRACES_KEPT:
                del traced[next(iter(traced))]
            traced[key] = jax.make_jaxpr(fn, return_shape=True)(*args)
        closed, out_shape = traced[key]
        outputs = _evaluate(closed.jaxpr, closed.consts, *leaves)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outputs)

    return rewritten
