"""Shared test fixtures: where the real data lives, and a small CPU-friendly environment."""

import importlib
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


def tiny_run_config(name, cache_dir, **train_overrides):
    """``configs/<name>.py:smoke`` cut to 8 steps: the one tiny real-data run of the tests.

    Every test file that trains uses it, so their runs share shapes and therefore the
    compiled programs in the compilation cache.
    """
    config = importlib.import_module(f"configs.{name}").get_config("smoke")
    config.train.total_steps = 8
    config.train.steps_per_epoch = 4
    config.train.log_every = 2
    config.train.checkpoint_every = 4
    config.data.cache_dir = cache_dir
    config.eval.figures = False
    for key, value in train_overrides.items():
        config.train[key] = value
    return config
