"""../shared is optional on a user's clone and required in CI (CI=true)."""
import conftest
import pytest


def test_missing_shared_skips_on_a_users_clone(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception):
        conftest.need(tmp_path / "absent")


def test_missing_shared_fails_under_ci(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="CI=true requires"):
        conftest.need(tmp_path / "absent")


def test_present_shared_is_returned(tmp_path):
    assert conftest.need(tmp_path) == tmp_path
