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


DATA_ENV = "SSL_JAX_DATA"
DEFAULT_DATA = REPO.parent / "shared" / "data"  # beside the checkout, as on dev machines and CI


def data_root() -> pathlib.Path:
    """`$SSL_JAX_DATA` when it is set (it wins, even when it lacks a dataset), else the default."""
    explicit = os.environ.get(DATA_ENV)
    return pathlib.Path(explicit) if explicit else DEFAULT_DATA


def shared_data_dir() -> pathlib.Path | None:
    """The real-data folder (holding ucm/, and aid/ where present), or None when it has no ucm/.

    An explicitly set `$SSL_JAX_DATA` is the only place looked at: a folder without ucm/ gives
    None, never a silent fallback to the default beside the checkout.
    """
    root = data_root()
    return root if (root / "ucm").is_dir() else None


def require_data(*parts: str) -> pathlib.Path:
    """`<data root>/<parts...>`, or skips the test saying what is missing and where it looked."""
    root = data_root()
    path = root.joinpath(*parts)
    if not path.exists():
        source = f"${DATA_ENV}" if os.environ.get(DATA_ENV) else f"the default ({DEFAULT_DATA})"
        pytest.skip(
            f"real data not found: {path} is missing; set {DATA_ENV} to the folder holding "
            f"ucm/ and aid/ (looked in {source})"
        )
    return path


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The real-data folder; skips when it has no ucm/."""
    require_data("ucm")
    return data_root()


@pytest.fixture(scope="session")
def aid_data(shared_data) -> pathlib.Path:
    """`<data>/aid` (AID10 class folders); skips when absent."""
    return require_data("aid")


@pytest.fixture(scope="session")
def originals_data(shared_data) -> pathlib.Path:
    """`<data>/originals` (the original TIFF/JPEG files); skips when absent."""
    return require_data("originals")


@pytest.fixture(autouse=True, scope="session")
def _data_env():
    """Configs read $SSL_JAX_DATA for their default roots; point it at the shared data."""
    path = shared_data_dir()
    if path is not None and DATA_ENV not in os.environ:
        os.environ[DATA_ENV] = str(path)
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
