"""The XLA:CPU convolution-library default is added only where it is safe."""

import importlib.metadata

import pytest

from ssl_jax import xla_cpu


@pytest.fixture
def measured_jaxlib(monkeypatch):
    real_version = importlib.metadata.version

    def version(name):
        return "0.10.2" if name == "jaxlib" else real_version(name)

    monkeypatch.setattr(xla_cpu.importlib.metadata, "version", version)
    monkeypatch.setattr(xla_cpu.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(xla_cpu, "_backends_started", lambda: False)


def test_flag_added_and_existing_flags_kept(measured_jaxlib):
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert xla_cpu.prefer_eigen_convolutions(environ)
    assert environ["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=4",
        xla_cpu.EIGEN_CONVOLUTIONS_FLAG,
    ]
    # Idempotent: a second call sees the flag and leaves XLA_FLAGS alone.
    assert not xla_cpu.prefer_eigen_convolutions(environ)
    assert environ["XLA_FLAGS"].count("ynn_fusion_type") == 1


def test_user_choice_and_opt_out_win(measured_jaxlib):
    chosen = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"}
    assert not xla_cpu.prefer_eigen_convolutions(chosen)
    assert chosen["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
    opted_out = {"SSL_JAX_CPU_CONVOLUTIONS": "ynn"}
    assert not xla_cpu.prefer_eigen_convolutions(opted_out)
    assert "XLA_FLAGS" not in opted_out


def test_not_added_on_unmeasured_jaxlib_gpu_plugin_or_started_backend(monkeypatch):
    monkeypatch.setattr(xla_cpu.importlib.metadata, "version", lambda name: "0.11.0")
    environ = {}
    assert not xla_cpu.prefer_eigen_convolutions(environ) and environ == {}

    monkeypatch.setattr(xla_cpu.importlib.metadata, "version", lambda name: "0.10.2")
    monkeypatch.setattr(
        xla_cpu.importlib.util, "find_spec", lambda name: name == "jax_cuda12_plugin" or None
    )
    assert not xla_cpu.prefer_eigen_convolutions(environ) and environ == {}

    monkeypatch.setattr(xla_cpu.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(xla_cpu, "_backends_started", lambda: True)
    assert not xla_cpu.prefer_eigen_convolutions(environ) and environ == {}
