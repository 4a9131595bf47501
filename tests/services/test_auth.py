"""API keys, the per-key token bucket and the failed-authentication limit per client
address, without a server."""

from __future__ import annotations

import pytest

from models.config import ServingConfig
from services.auth import (
    ApiKey,
    Authenticator,
    TokenBucket,
    check_api_key_name,
    client_address,
    configured_api_keys,
    hash_api_key,
    merge_api_keys,
    new_api_key_token,
    parse_api_keys_env,
)

pytestmark = pytest.mark.fast


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def bearer(token: str) -> bytes:
    return f"Bearer {token}".encode()


def make_auth(clock: Clock, *keys: ApiKey, rate: float = 10.0, burst: int = 3) -> Authenticator:
    return Authenticator(merge_api_keys(keys), rate_per_s=rate, burst=burst, clock=clock)


def test_no_keys_means_authentication_off_and_says_so() -> None:
    auth = make_auth(Clock())
    assert not auth.enabled
    assert auth.check(None) == (None, None)
    assert "OFF" in auth.describe()


def test_missing_or_malformed_header_is_401_with_a_challenge() -> None:
    auth = make_auth(Clock(), ApiKey("a", hash_api_key("t")))
    for header in (None, b"Basic dTpw", b"Bearer", b"Bearer   ", b"t"):
        name, denial = auth.check(header)
        assert name is None and denial is not None
        assert denial.status == 401
        assert "Bearer" in denial.message
        assert (b"www-authenticate", b'Bearer realm="mlgate"') in denial.headers


def test_unknown_is_403_revoked_is_403_naming_the_key_and_a_good_key_passes() -> None:
    auth = make_auth(
        Clock(), ApiKey("live", hash_api_key("good")), ApiKey("old", hash_api_key("gone"), True)
    )
    assert auth.check(bearer("good")) == ("live", None)
    assert auth.check(b"bearer good") == ("live", None)
    _, unknown = auth.check(bearer("guess"))
    assert unknown is not None and (unknown.status, unknown.message) == (403, "unknown API key")
    _, revoked = auth.check(bearer("gone"))
    assert revoked is not None and revoked.status == 403 and "'old'" in revoked.message


def test_revocation_anywhere_wins_over_an_active_entry() -> None:
    digest = hash_api_key("t")
    merged = merge_api_keys([ApiKey("a", digest)], [ApiKey("a-revoked", digest.upper(), True)])
    assert merged[digest].revoked


def test_bucket_allows_the_burst_then_429_with_retry_after_then_refills() -> None:
    clock = Clock()
    auth = make_auth(clock, ApiKey("k", hash_api_key("t")), rate=0.5, burst=2)
    assert auth.check(bearer("t"))[1] is None
    assert auth.check(bearer("t"))[1] is None
    _, denial = auth.check(bearer("t"))
    assert denial is not None and denial.status == 429
    assert dict(denial.headers)[b"retry-after"] == b"2"
    assert "'k'" in denial.message and "0.5 requests/s" in denial.message
    clock.now += 2.0
    assert auth.check(bearer("t"))[1] is None


def test_per_key_limits_override_the_service_limits() -> None:
    clock = Clock()
    auth = make_auth(
        clock,
        ApiKey("big", hash_api_key("b")),
        ApiKey("small", hash_api_key("s"), rate_per_s=1.0, burst=1),
        rate=1000.0,
        burst=1000,
    )
    assert auth.check(bearer("s"))[1] is None
    small = auth.check(bearer("s"))[1]
    assert small is not None and small.status == 429
    assert all(auth.check(bearer("b"))[1] is None for _ in range(50))


def test_token_bucket_never_exceeds_its_burst() -> None:
    bucket = TokenBucket(rate=100.0, burst=5.0, tokens=5.0, updated=0.0)
    assert [bucket.take(1000.0) for _ in range(6)][:5] == [0.0] * 5
    assert bucket.take(1000.0) > 0


def test_env_keys_parse_named_and_unnamed_and_refuse_tokens() -> None:
    a, b = hash_api_key("x"), hash_api_key("y")
    keys = parse_api_keys_env(f"ci:{a}, {b.upper()}\n")
    assert [(k.name, k.sha256) for k in keys] == [("ci", a), (f"env-{b[:8]}", b)]
    assert parse_api_keys_env(None) == [] and parse_api_keys_env("  ") == []
    with pytest.raises(ValueError, match="not a sha256"):
        parse_api_keys_env("my-secret-token")
    with pytest.raises(ValueError, match="key name"):
        parse_api_keys_env(f"bad!name:{a}")


def test_new_tokens_are_random_and_recognisable() -> None:
    tokens = {new_api_key_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(t.startswith("mlg_") and len(t) == 47 for t in tokens)
    # Tokens go into `Authorization: Bearer` headers and shells unquoted.
    assert all(t.replace("_", "").replace("-", "").isalnum() for t in tokens)


def test_key_names_are_checked_as_the_environment_form_needs_them() -> None:
    assert check_api_key_name("ci-2026.q1@team") == "ci-2026.q1@team"
    for bad in ("", "has space", "a:b", "x" * 65):
        with pytest.raises(ValueError, match="key name"):
            check_api_key_name(bad)


def test_configured_keys_merge_the_config_and_the_environment() -> None:
    a, b = hash_api_key("a"), hash_api_key("b")
    serving = ServingConfig(
        api_keys=[
            {"name": "cfg", "sha256": a, "rate_limit_per_s": 2.0},
            {"name": "gone", "sha256": b, "revoked": True},
        ]
    )
    keys = configured_api_keys(serving, f"env:{b.upper()}")
    assert keys[a] == ApiKey("cfg", a, False, 2.0, None)
    assert keys[b].revoked  # revoked in the config, active in the environment: revoked
    assert configured_api_keys(ServingConfig(), None) == {}
    with pytest.raises(ValueError, match="MLGATE_API_KEYS"):
        configured_api_keys(ServingConfig(), "a-token")


def test_failed_authentications_per_address_run_out_then_every_request_is_429() -> None:
    clock = Clock()
    good = ApiKey("good", hash_api_key("good-token"))
    auth = Authenticator(
        merge_api_keys([good]),
        rate_per_s=1000.0,
        burst=1000,
        failed_auth_per_s=0.5,
        failed_auth_burst=3,
        clock=clock,
    )
    attacker, neighbour = "203.0.113.7", "198.51.100.2"
    for _ in range(3):
        assert auth.check(bearer("guess"), attacker)[1].status == 403  # type: ignore[union-attr]
    # The burst is spent: 429 naming the address, for a good key too.
    name, denial = auth.check(bearer("guess"), attacker)
    assert name is None and denial is not None and denial.status == 429
    assert attacker in denial.message and "failed authentications" in denial.message
    assert dict(denial.headers)[b"retry-after"] == b"2"
    assert auth.check(bearer("good-token"), attacker)[1].status == 429  # type: ignore[union-attr]
    assert auth.check(None, attacker)[1].status == 429  # type: ignore[union-attr]
    # Another address is not affected; this host's own processes (None) are never counted.
    assert auth.check(bearer("good-token"), neighbour) == ("good", None)
    for _ in range(10):
        assert auth.check(bearer("guess"), None)[1].status == 403  # type: ignore[union-attr]
    assert auth.check(bearer("good-token"), None) == ("good", None)
    # One token comes back after 1/rate seconds: a success takes none; one more failure
    # spends it, and the address is refused again.
    clock.now += 2.0
    assert auth.check(bearer("good-token"), attacker) == ("good", None)
    assert auth.check(None, attacker)[1].status == 401  # type: ignore[union-attr]
    assert auth.check(bearer("good-token"), attacker)[1].status == 429  # type: ignore[union-attr]


def test_failed_authentication_memory_is_bounded_by_the_lru(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import services.auth as auth_module

    monkeypatch.setattr(auth_module, "FAILED_AUTH_ADDRESSES", 100)
    auth = make_auth(Clock(), ApiKey("a", hash_api_key("t")))
    for i in range(5000):
        auth.check(bearer("wrong"), f"10.0.{i // 256}.{i % 256}")
    assert len(auth._failures) == 100


def test_client_address_trusts_forwarded_for_only_from_a_trusted_proxy() -> None:
    proxies = frozenset({"127.0.0.1"})
    # Straight from a remote peer: its own address, whatever it claims.
    assert client_address("203.0.113.7", b"10.9.9.9", proxies) == ("203.0.113.7", False)
    # Through the trusted proxy: the last entry, the one the proxy appended.
    assert client_address("127.0.0.1", b"1.2.3.4, 203.0.113.7", proxies) == (
        "203.0.113.7",
        False,
    )
    # This host's own process, unproxied: local.
    assert client_address("127.0.0.1", None, proxies) == ("127.0.0.1", True)
    assert client_address("::1", None, proxies) == ("::1", True)
    assert client_address("203.0.113.7", None, proxies) == ("203.0.113.7", False)
    assert client_address(None, None, proxies) == (None, False)


def test_trusted_proxies_must_be_addresses() -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        ServingConfig(trusted_proxies=("haproxy.local",))
