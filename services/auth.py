"""API keys as `Authorization: Bearer <token>` and a token bucket per key.

Keys are stored as the sha256 hex digest of the token (in `serving.api_keys`, or as extra
digests in `MLGATE_API_KEYS`), so a leaked config leaks no usable token; `mlgate init` and
`mlgate keys create` mint tokens (`new_api_key_token`) and print them once. A request without
a usable header is a 401; a token whose digest is unknown or revoked is a 403; a key over
its rate is a 429 with `Retry-After`. Buckets live in each worker process: with
`serving.workers` above one, a key's effective rate is that many times its limit.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.config import ServingConfig

API_KEYS_ENV = "MLGATE_API_KEYS"
# In front of every token mlgate mints, so that people and secret scanners can tell one.
TOKEN_PREFIX = "mlg_"
_TOKEN_BYTES = 32
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    revoked: bool = False
    rate_per_s: float | None = None
    burst: int | None = None


@dataclass(frozen=True)
class Denial:
    """Why a request was refused, as the client will read it."""

    status: int
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


def hash_api_key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_api_key_token() -> str:
    """A new client token: 256 random bits, URL-safe base64 (safe in a header and a shell)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)


def check_api_key_name(name: str) -> str:
    """`name`, when it can name a key in `serving.api_keys` and in `MLGATE_API_KEYS` alike."""
    if not _NAME.match(name):
        raise ValueError(
            f"{name[:80]!r} is not an API key name: 1 to 64 letters, digits, '_', '.', '@' or '-'"
        )
    return name


def configured_api_keys(serving: ServingConfig, env_value: str | None) -> dict[str, ApiKey]:
    """The keys a service started now would hold, by digest: `serving.api_keys` merged with
    `env_value` (the value of `MLGATE_API_KEYS`; ValueError for a malformed entry)."""
    return merge_api_keys(
        (
            ApiKey(k.name, k.sha256, k.revoked, k.rate_limit_per_s, k.rate_limit_burst)
            for k in serving.api_keys
        ),
        parse_api_keys_env(env_value),
    )


def parse_api_keys_env(value: str | None) -> list[ApiKey]:
    """`MLGATE_API_KEYS`: digests separated by commas or whitespace, each optionally named
    (`ci:3b4c…`); an unnamed one is called `env-<first 8 hex digits>`."""
    keys: list[ApiKey] = []
    for entry in re.split(r"[,\s]+", value or ""):
        if not entry:
            continue
        name, _, digest = entry.rpartition(":")
        if not _SHA256.match(digest):
            raise ValueError(
                f"{API_KEYS_ENV} entry {entry[:80]!r} is not a sha256 hex digest (64 hex "
                "digits, optionally `name:` in front); store digests, never tokens"
            )
        if name and not _NAME.match(name):
            raise ValueError(f"{API_KEYS_ENV} entry has an invalid key name {name[:80]!r}")
        digest = digest.lower()
        keys.append(ApiKey(name=name or f"env-{digest[:8]}", sha256=digest))
    return keys


def merge_api_keys(*sources: Iterable[ApiKey]) -> dict[str, ApiKey]:
    """By digest; a digest listed as revoked anywhere stays revoked."""
    merged: dict[str, ApiKey] = {}
    for source in sources:
        for key in source:
            digest = key.sha256.lower()
            known = merged.get(digest)
            if known is None or (key.revoked and not known.revoked):
                merged[digest] = ApiKey(key.name, digest, key.revoked, key.rate_per_s, key.burst)
    return merged


@dataclass
class TokenBucket:
    """`rate` tokens a second up to `burst`; each request takes one."""

    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class Authenticator:
    """Checks the Authorization header of a request; off when it holds no keys."""

    keys: dict[str, ApiKey]
    rate_per_s: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, TokenBucket] = field(default_factory=dict, init=False, repr=False)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def describe(self) -> str:
        if not self.enabled:
            return (
                "authentication is OFF: no API keys in serving.api_keys or "
                f"{API_KEYS_ENV}; every client is served without a key or a rate limit"
            )
        active = sum(not k.revoked for k in self.keys.values())
        return (
            f"authentication is on: {active} active and {len(self.keys) - active} revoked "
            f"API key(s), {self.rate_per_s:g} requests/s per key (burst {self.burst})"
        )

    def check(self, authorization: bytes | None) -> tuple[str | None, Denial | None]:
        """(key name, None) for a request that may go on, (None, denial) otherwise."""
        if not self.enabled:
            return None, None
        if authorization is None:
            return None, _unauthorized("missing `Authorization: Bearer <API key>` header")
        scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None, _unauthorized("the Authorization header must be `Bearer <API key>`")
        key = self.keys.get(hash_api_key(token))
        if key is None:
            return None, Denial(403, "unknown API key")
        if key.revoked:
            return None, Denial(403, f"API key {key.name!r} has been revoked")
        now = self.clock()
        bucket = self._buckets.get(key.sha256)
        if bucket is None:
            burst = float(key.burst or self.burst)
            bucket = TokenBucket(key.rate_per_s or self.rate_per_s, burst, burst, now)
            self._buckets[key.sha256] = bucket
        wait = bucket.take(now)
        if wait > 0.0:
            retry_after = max(1, math.ceil(wait))
            return None, Denial(
                429,
                f"rate limit of {bucket.rate:g} requests/s (burst {bucket.burst:g}) for "
                f"API key {key.name!r} exceeded; retry after {retry_after} s",
                ((b"retry-after", str(retry_after).encode()),),
            )
        return key.name, None


def _unauthorized(message: str) -> Denial:
    return Denial(401, message, ((b"www-authenticate", b'Bearer realm="mlgate"'),))
