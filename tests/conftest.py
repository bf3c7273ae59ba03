"""Shared test fixtures: where the real data lives, and a small CPU-friendly environment."""

import contextlib
import dataclasses
import importlib
import os
import pathlib
import shutil

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


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "heavy(seconds): one of the suite's longest tests, with its rough time on 2 cores; "
        "scheduled first, longest first",
    )


def pytest_collection_modifyitems(config, items):
    """The longest tests first (a stable sort: equals keep their order), so that the two
    pytest-xdist workers of README's test command finish together instead of one of them
    starting a long test at the end. Mark whole modules or tests without module fixtures:
    moving a test away from its module would set that module's fixtures up twice."""

    def seconds(item):
        heavy = item.get_closest_marker("heavy")
        return heavy.args[0] if heavy else 0

    items.sort(key=lambda item: -seconds(item))


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


@pytest.fixture(scope="session")
def decoded_cache(tmp_path_factory, shared_data) -> str:
    """One decoded-image cache (`config.data.cache_dir`) for every tiny real-data run."""
    return str(tmp_path_factory.mktemp("decoded_cache"))


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


@dataclasses.dataclass
class TinyRun:
    """A finished tiny run that several tests read; `copy_to` before changing anything in it."""

    workdir: pathlib.Path
    config: object  # the ml_collections config it was trained with (copy before editing)
    meta: dict  # what train_and_evaluate returned
    programs: list  # every jitted K-step program the loop built (dispatch.make_multi_step)
    compiled_signatures: list  # each program's jit cache size when the run ended

    def copy_to(self, dest) -> pathlib.Path:
        shutil.copytree(self.workdir, dest)
        return pathlib.Path(dest)

    def fresh_config(self):
        return self.config.copy_and_resolve_references()


class TinyRuns:
    """`tiny_run_config` runs trained once per session and shared by every test that reads them.

    Compiling dominates a tiny CPU run, and several test files read the same tiny run
    (train, evaluate, report, dispatch), so each distinct run is trained once.
    """

    def __init__(self, root: pathlib.Path, cache_dir: str):
        self.root, self.cache_dir, self._runs = root, cache_dir, {}

    def get(self, name: str, *, seed: int = 0, **train_overrides) -> TinyRun:
        key = (name, seed, tuple(sorted(train_overrides.items())))
        if key not in self._runs:
            from ssl_jax import dispatch, train

            config = tiny_run_config(name, self.cache_dir, **train_overrides)
            config.seed = seed
            workdir = self.root / f"run{len(self._runs)}_{name}_seed{seed}"
            made = []
            make_multi_step = dispatch.make_multi_step
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(
                    dispatch,
                    "make_multi_step",
                    lambda *a, **k: made.append(make_multi_step(*a, **k)) or made[-1],
                )
                meta = train.train_and_evaluate(config.copy_and_resolve_references(), str(workdir))
            signatures = [program._cache_size() for program in made]
            self._runs[key] = TinyRun(workdir, config, meta, made, signatures)
        return self._runs[key]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, decoded_cache) -> TinyRuns:
    return TinyRuns(tmp_path_factory.mktemp("tiny_runs"), decoded_cache)


@pytest.fixture(scope="session")
def supervised_run(tiny_runs) -> TinyRun:
    """The tiny supervised run (seed 0): test_train, test_report."""
    return tiny_runs.get("ucm10_supervised")


@pytest.fixture(scope="session")
def triplet_run(tiny_runs) -> TinyRun:
    """The tiny CoMatch+Triplet run, saving embeddings: test_train, test_evaluate, test_dispatch."""
    return tiny_runs.get("ucm10_triplet", save_embeddings_epochs=(1, -1))


DISABLE_MOST_OPTIMIZATIONS = "jax_disable_most_optimizations"


@contextlib.contextmanager
def less_optimized_compiles():
    """Programs compiled inside are built with XLA's optimisations mostly off (several times
    faster to compile; compiling dominates the tests' tiny CPU programs).

    Only for tests of behaviour (shapes, what is logged, raised, written or resumed, and
    numbers compared with programs also built inside), never where numbers are compared
    with a program built without it or with fixtures. The setting is part of the
    compilation cache's key, and in-memory executables are dropped on the way in and out,
    so nothing built inside is served outside, nor the other way round.
    """
    import jax

    from ssl_jax import inference
    from ssl_jax.models import cpu_conv

    def forget_compiled():  # memoised jitted functions keep their executables in memory
        inference.make_eval_step.cache_clear()
        jax.clear_caches()

    cpu_conv.xla_cpu_conv_library()  # memoised probe of the optimised build: read it first
    previous = jax.config.read(DISABLE_MOST_OPTIMIZATIONS)
    forget_compiled()
    jax.config.update(DISABLE_MOST_OPTIMIZATIONS, True)
    try:
        yield
    finally:
        jax.config.update(DISABLE_MOST_OPTIMIZATIONS, previous)
        forget_compiled()


@pytest.fixture
def less_optimized():
    """`less_optimized_compiles` around one test."""
    with less_optimized_compiles():
        yield


@pytest.fixture(scope="module")
def less_optimized_module():
    """`less_optimized_compiles` around a whole module (its module fixtures included, when
    they request it)."""
    with less_optimized_compiles():
        yield
