"""XLA:CPU settings that make ssl_jax's CPU training faster, and the default platform.

`prefer_eigen_convolutions` runs before jax starts; `default_platform` is the one place
ssl_jax asks which platform jax runs on, for the callers that choose a CPU formulation
(`ssl_jax.models.get_model`, the triplet loss's anchor blocks) when none was given.

jax 0.10's XLA:CPU hands convolutions to YNNPACK, which runs ResNet-18's 64-channel layers on
one thread and its 2x2-map layers at 2-3 GFLOP/s. The flag below sends convolutions to Eigen
instead: a paper-shape CoMatch+Triplet step (B 32, mu 7, ResNet-18) went from 6.7 s to 4.9 s
on the 2-core development CPU (benchmarks/RESULTS.md). The flag is experimental, and XLA
aborts on flags it does not know, so it is only added where it was measured and known to
exist (jaxlib 0.10 without a GPU plugin); anything the user put in XLA_FLAGS wins, and
``SSL_JAX_CPU_CONVOLUTIONS=ynn`` keeps XLA's default.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

EIGEN_CONVOLUTIONS_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# jaxlib versions on which the flag exists and was measured to help.
_MEASURED_JAXLIB_PREFIXES = ("0.10.",)
_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")


def prefer_eigen_convolutions(environ: dict | None = None) -> bool:
    """Adds `EIGEN_CONVOLUTIONS_FLAG` to XLA_FLAGS where safe; returns whether it did.

    Must run before jax creates its backends (they read XLA_FLAGS once); if it is too late,
    nothing is changed.
    """
    environ = os.environ if environ is None else environ
    if environ.get("SSL_JAX_CPU_CONVOLUTIONS", "eigen").lower() != "eigen":
        return False
    flags = environ.get("XLA_FLAGS", "")
    if "ynn_fusion_type" in flags:
        return False  # the user chose
    try:
        jaxlib_version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return False
    if not jaxlib_version.startswith(_MEASURED_JAXLIB_PREFIXES):
        return False
    if any(importlib.util.find_spec(name) is not None for name in _GPU_PLUGINS):
        return False
    if _backends_started():
        return False
    environ["XLA_FLAGS"] = f"{flags} {EIGEN_CONVOLUTIONS_FLAG}".strip()
    return True


def _backends_started() -> bool:
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(xla_bridge is not None and getattr(xla_bridge, "_backends", None))


def default_platform() -> str:
    """The platform jax computes on by default ("cpu", "gpu", "tpu"): `jax.default_backend`."""
    import jax  # here: the rest of this module sets XLA flags and must not need jax

    return jax.default_backend()
