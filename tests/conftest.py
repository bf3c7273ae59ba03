"""Shared test fixtures: where the real data lives, and a small CPU-friendly environment."""

import os
import pathlib

import pytest

from ssl_jax import xla_cpu

REPO = pathlib.Path(__file__).resolve().parents[1]

# Reuse compiled XLA programs across the tests' many tiny runs (and their subprocesses):
# compiling dominates a tiny CPU run. Set before JAX is imported by any test module.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(REPO / ".pytest_cache" / "jax_compilation_cache")
)


# The same XLA:CPU convolution library launch.py picks (ssl_jax/xla_cpu.py), so the tests
# exercise the default path; set before any test starts a JAX backend.
xla_cpu.prefer_eigen_convolutions()


def shared_data_dir() -> pathlib.Path | None:
    """`$SSL_JAX_DATA`, else ../shared/data beside the checkout (as on dev machines and CI)."""
    candidates = [os.environ.get("SSL_JAX_DATA"), REPO.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (pathlib.Path(candidate) / "ucm").is_dir():
            return pathlib.Path(candidate)
    return None


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data not found: set SSL_JAX_DATA to the folder holding ucm/ and aid/")
    return path


@pytest.fixture(autouse=True, scope="session")
def _data_env():
    """Configs read $SSL_JAX_DATA for their default roots; point it at the shared data."""
    path = shared_data_dir()
    if path is not None and "SSL_JAX_DATA" not in os.environ:
        os.environ["SSL_JAX_DATA"] = str(path)
    yield
