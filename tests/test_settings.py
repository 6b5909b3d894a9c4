"""Settings come from BITFIT_* variables; a bad one is refused without echoing secrets."""

import pytest
from pydantic import ValidationError

from server.settings import Settings


def test_bad_setting_error_never_shows_the_admin_token(monkeypatch):
    monkeypatch.setenv("BITFIT_ADMIN_TOKEN", "very-secret-token")
    monkeypatch.setenv("BITFIT_DTYPE", "bogus")
    with pytest.raises(ValidationError) as err:
        Settings()
    assert "bogus" in str(err.value)  # says what is wrong
    assert "very-secret-token" not in str(err.value)


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("BITFIT_PORT", "9123")
    monkeypatch.setenv("BITFIT_MAX_BATCH", "7")
    s = Settings()
    assert (s.port, s.max_batch) == (9123, 7)
