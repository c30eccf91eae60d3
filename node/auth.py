"""publickey -> app id.

With no keys configured every non-empty key maps to one default app, which is what
a laptop wants. With keys configured only listed keys are accepted. The key itself
is a secret: it is never logged, only a short fingerprint of it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


class AuthError(Exception):
    """The key was refused (HTTP 403)."""


def fingerprint(key: str) -> str:
    """A log-safe stand-in for a key."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


@dataclass(slots=True)
class Auth:
    keys: dict[str, str]
    default_app: str = "default"
    open_mode: bool = True

    @classmethod
    def from_keys(cls, keys: dict[str, str], default_app: str = "default") -> Auth:
        return cls(keys=dict(keys), default_app=default_app, open_mode=not keys)

    def app_for(self, publickey: str) -> str:
        if self.open_mode:
            return self.default_app
        app = self.keys.get(publickey)
        if app is None:
            raise AuthError(f"unknown publickey (fingerprint {fingerprint(publickey)})")
        return app
