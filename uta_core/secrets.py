"""Credentials never leave the process: URLs lose their ``user:password@`` part before they are
printed, logged, raised or stored; configs refuse URLs that carry one (credentials come from the
environment: the AWS chain, ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``)."""

from __future__ import annotations

import re

_URL_USERINFO = re.compile(r"(?<=://)[^/@\s'\"]+@")
_SECRET_KEY = re.compile(r"(secret|passw|credential|access_key|session_token|api_key|auth|private)", re.I)
REDACTED = "***@"


def has_userinfo(text: str) -> bool:
    """True when a URL in ``text`` embeds ``user[:password]@``."""
    return bool(_URL_USERINFO.search(text))


def redact_urls(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it replaced by ``***@``."""
    return _URL_USERINFO.sub(REDACTED, text)


def is_secret_key(name: str) -> bool:
    """A config or parameter name that looks like it holds a secret (never logged)."""
    return bool(_SECRET_KEY.search(name))
