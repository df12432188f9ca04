"""Console sign-in: a session cookie derived from the API token, and CSRF tokens. Pure.

The cookie never holds the token. It holds when the session was opened, who signed in
(recorded as the actor of every command), and an HMAC of both keyed by the token:
``<issued_ms>:<name>:<hex>``. So changing ``SCOREMESH_API_TOKEN`` ends every session, and
a session cannot be forged or stretched without the token.

Forms that change something carry a CSRF token: an HMAC of the session cookie keyed by the
API token. A page of another site can make the browser send the cookie (it is
``SameSite=Strict``, which modern browsers already refuse) but cannot read the CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

COOKIE = "scoremesh_console"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
NAME_RULE = "1-64 letters, digits, '.', '_', '@' or '-'"


@dataclass(frozen=True)
class Session:
    issued_ms: int
    name: str

    @property
    def actor(self) -> str:
        """Who the registry records for this session's commands."""
        return f"console:{self.name}"


def _sign(token: str, purpose: str, message: str) -> str:
    return hmac.new(
        token.encode(), f"scoremesh-console/{purpose}/{message}".encode(), hashlib.sha256
    ).hexdigest()


def open_session(token: str, name: str, now_ms: int) -> str:
    """The cookie value for a new session (``name`` must match ``NAME_PATTERN``)."""
    if not NAME_PATTERN.match(name):
        raise ValueError(f"the name must be {NAME_RULE}")
    message = f"{now_ms}:{name}"
    return f"{message}:{_sign(token, 'session', message)}"


def read_session(token: str, cookie: str | None, now_ms: int, ttl_s: float) -> Session | None:
    """The session a cookie proves, or None (missing, forged, from another token, expired)."""
    if not cookie or not token:
        return None
    parts = cookie.split(":")
    if len(parts) != 3 or not parts[0].isdigit() or not NAME_PATTERN.match(parts[1]):
        return None
    issued, name, signature = int(parts[0]), parts[1], parts[2]
    expected = _sign(token, "session", f"{parts[0]}:{name}")
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        return None
    if not issued <= now_ms <= issued + ttl_s * 1000:
        return None
    return Session(issued, name)


def csrf_token(token: str, cookie: str) -> str:
    return _sign(token, "csrf", cookie)


def csrf_ok(token: str, cookie: str | None, sent: str | None) -> bool:
    if not cookie or not sent or not token:
        return False
    return hmac.compare_digest(sent.encode(), csrf_token(token, cookie).encode())
