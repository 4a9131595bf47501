"""API keys as `Authorization: Bearer <token>` and a token bucket per key.

Keys are stored as the sha256 hex digest of the token (in `serving.api_keys`, or as extra
digests in `MLGATE_API_KEYS`), so a leaked config leaks no usable token; `mlgate init` and
`mlgate keys create` mint tokens (`new_api_key_token`) and print them once. A request without
a usable header is a 401; a token whose digest is unknown or revoked is a 403; a key over
its rate is a 429 with `Retry-After`. Buckets live in each worker process: with
`serving.workers` above one, a key's effective rate is that many times its limit.

Failed authentications (401 and 403) are limited per client address too: each takes a token
from the address's bucket (`serving.failed_auth_burst`, refilled at
`serving.failed_auth_per_s`), and an address with none left gets a 429 for any request that
needs a key, a good one included, until a token comes back. The client address is the
peer's, or, when the peer is a trusted proxy (HAProxy in front of the canary), the last
X-Forwarded-For entry (`client_address`). A loopback peer that no proxy forwarded is this
host's own process and is not counted. The buckets are held in a bounded LRU map
(cachetools), so a flood of addresses costs a fixed amount of memory; an evicted address
starts again with a full burst. The token bucket itself is a dozen lines and written here:
the rate-limiting libraries bring storage back-ends and async wrappers the hot path does not
need.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cachetools import LRUCache

if TYPE_CHECKING:
    from models.config import ServingConfig

API_KEYS_ENV = "MLGATE_API_KEYS"
# In front of every token mlgate mints, so that people and secret scanners can tell one.
TOKEN_PREFIX = "mlg_"
_TOKEN_BYTES = 32
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
# Client addresses whose failed authentications are remembered at once, per worker.
FAILED_AUTH_ADDRESSES = 65_536


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

    def wait(self, now: float) -> float:
        """The seconds until a token is available (0: one is), taking none."""
        tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate


def client_address(
    peer: str | None, forwarded_for: bytes | None, trusted_proxies: frozenset[str]
) -> tuple[str | None, bool]:
    """(the client's address, whether it is this host's own unproxied process). The peer's
    address, or, when the peer is a trusted proxy that sent X-Forwarded-For, that header's
    last entry (the one the proxy appended; earlier entries are the client's word)."""
    if peer is None:
        return None, False
    if forwarded_for is not None and peer in trusted_proxies:
        last = forwarded_for.decode("latin-1").rsplit(",", 1)[-1].strip()
        return (last or peer), False
    return peer, forwarded_for is None and _is_loopback(peer)


@functools.lru_cache(maxsize=1024)
def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@dataclass
class Authenticator:
    """Checks the Authorization header of a request; off when it holds no keys."""

    keys: dict[str, ApiKey]
    rate_per_s: float
    burst: int
    failed_auth_per_s: float = 0.2
    failed_auth_burst: int = 20
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, TokenBucket] = field(default_factory=dict, init=False, repr=False)
    _failures: LRUCache[str, TokenBucket] = field(
        default_factory=lambda: LRUCache(maxsize=FAILED_AUTH_ADDRESSES), init=False, repr=False
    )

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
            f"API key(s), {self.rate_per_s:g} requests/s per key (burst {self.burst}); "
            f"{self.failed_auth_burst} failed authentications per client address, then "
            f"{self.failed_auth_per_s:g}/s"
        )

    def check(
        self, authorization: bytes | None, client: str | None = None
    ) -> tuple[str | None, Denial | None]:
        """(key name, None) for a request that may go on, (None, denial) otherwise.
        `client`: the address whose failed authentications are counted (None: not counted;
        `client_address` gives it, None for this host's own processes)."""
        if not self.enabled:
            return None, None
        now = self.clock()
        failures = self._failures.get(client) if client is not None else None
        if failures is not None:
            wait = failures.wait(now)
            if wait > 0.0:
                retry_after = max(1, math.ceil(wait))
                return None, Denial(
                    429,
                    f"too many failed authentications from {client} "
                    f"({self.failed_auth_burst}, then {self.failed_auth_per_s:g}/s); retry "
                    f"after {retry_after} s",
                    ((b"retry-after", str(retry_after).encode()),),
                )
        found = self._identify(authorization)
        if isinstance(found, Denial):
            if client is not None:
                if failures is None:
                    burst = float(self.failed_auth_burst)
                    failures = TokenBucket(self.failed_auth_per_s, burst, burst, now)
                    self._failures[client] = failures
                failures.take(now)
            return None, found
        key = found
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

    def _identify(self, authorization: bytes | None) -> ApiKey | Denial:
        """The active key the header names, or why there is none."""
        if authorization is None:
            return _unauthorized("missing `Authorization: Bearer <API key>` header")
        scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _unauthorized("the Authorization header must be `Bearer <API key>`")
        key = self.keys.get(hash_api_key(token))
        if key is None:
            return Denial(403, "unknown API key")
        if key.revoked:
            return Denial(403, f"API key {key.name!r} has been revoked")
        return key


def _unauthorized(message: str) -> Denial:
    return Denial(401, message, ((b"www-authenticate", b'Bearer realm="mlgate"'),))
