"""MLflow helpers: secrets never become params; the SQLite default; disabled tracking."""

import pytest

from uta_core.tracking import TrackingConfig, redact_params, resolve_tracking_uri, start_run


def test_redact_drops_secret_keys_and_masks_url_credentials():
    params = {
        "output.token_codec": "int8", "s3.endpoint_url": "http://minio:9000", "aws_secret_access_key": "x",
        "s3.session_token": "y", "db.password": "z", "auth.header": "w",
        "tracking.tracking_uri": "https://user:pw@mlflow.example/", "input.paths": ["a", "b"],
    }
    out = redact_params(params)
    assert out == {"output.token_codec": "int8", "s3.endpoint_url": "http://minio:9000",
                   "tracking.tracking_uri": "https://***@mlflow.example/", "input.paths": "['a', 'b']"}


def test_tracking_uri_default_is_sqlite_in_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert resolve_tracking_uri() == "http://server:5000" and resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_disabled_tracking_yields_no_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with start_run(TrackingConfig(enabled=False), "uta-test") as run:
        assert run is None
    assert list(tmp_path.iterdir()) == []


def test_tracking_uri_with_credentials_is_refused():
    with pytest.raises(ValueError, match="user:password"):
        TrackingConfig(tracking_uri="https://u:p@host")
