"""Where the tests find the real data: an explicitly set $SSL_JAX_DATA wins."""

import conftest
import pytest


@pytest.fixture
def default_with_data(tmp_path, monkeypatch):
    """A stand-in for the default folder beside the checkout, holding ucm/ and aid/."""
    default = tmp_path / "beside_checkout"
    (default / "ucm").mkdir(parents=True)
    (default / "aid").mkdir()
    monkeypatch.setattr(conftest, "DEFAULT_DATA", default)
    return default


def test_explicit_empty_folder_gives_no_data(tmp_path, monkeypatch, default_with_data):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("SSL_JAX_DATA", str(empty))
    assert conftest.shared_data_dir() is None  # no fallback to the default, which has ucm/
    with pytest.raises(pytest.skip.Exception, match="SSL_JAX_DATA"):
        conftest.require_data("ucm")


def test_explicit_folder_is_used(tmp_path, monkeypatch, default_with_data):
    explicit = tmp_path / "mine"
    (explicit / "ucm").mkdir(parents=True)
    monkeypatch.setenv("SSL_JAX_DATA", str(explicit))
    assert conftest.shared_data_dir() == explicit
    with pytest.raises(pytest.skip.Exception, match="aid"):  # the default's aid/ is not used
        conftest.require_data("aid")


def test_default_beside_the_checkout_when_unset(monkeypatch, default_with_data):
    monkeypatch.delenv("SSL_JAX_DATA", raising=False)
    assert conftest.shared_data_dir() == default_with_data
    assert conftest.require_data("aid") == default_with_data / "aid"


def test_real_default_is_ignored_when_env_points_elsewhere(tmp_path, monkeypatch):
    """The same with the real default folder (meaningful where the default data exists)."""
    monkeypatch.setenv("SSL_JAX_DATA", str(tmp_path))
    assert conftest.shared_data_dir() is None
