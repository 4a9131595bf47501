"""Waiting for services to answer with a version: bad URLs are refused by name, and an
address with nothing listening is waited on until the timeout, then named with what it
said. A live service answering is in tests/services/test_alias_follow.py."""

from __future__ import annotations

import time

import pytest

from services.served_wait import ServedWaitError, check_service_url, wait_until_served
from tests.services.conftest import free_port

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("url", ["127.0.0.1:3000", "ftp://host/x", "http://", "service"])
def test_a_url_that_names_no_service_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="is not a service URL"):
        check_service_url(url)


def test_a_service_url_loses_its_trailing_slash() -> None:
    assert check_service_url("http://127.0.0.1:3000/") == "http://127.0.0.1:3000"


def test_nothing_listening_is_a_timeout_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ServedWaitError) as caught:
        wait_until_served([url], "3", started=started, timeout_s=0.3)
    assert time.monotonic() - started >= 0.3
    assert caught.value.served == {url: None}
    assert caught.value.last_seen[url].startswith("unreachable")
    assert f"{url} said unreachable" in str(caught.value)
