"""The alias watch's decisions, step by step (`check`, the thread's step), with the registry
read, the model load and the swap as plain functions: the real registry, service and swap
are in tests/services/test_alias_follow.py."""

from __future__ import annotations

import logging

import pytest

from services.alias_watch import AliasWatch

pytestmark = pytest.mark.fast


class World:
    """What the watch sees: the alias's version in the registry and the served model."""

    def __init__(self) -> None:
        self.alias: str | None = "1"
        self.registry_down = False
        self.served = ("1", False)
        self.broken: set[str] = set()
        self.prepared: list[str] = []
        self.installed: list[str] = []
        self.counts = {True: 0, False: 0}

    def read(self) -> str | None:
        if self.registry_down:
            raise ConnectionError("registry down")
        return self.alias

    def prepare(self, version: str) -> str:
        self.prepared.append(version)
        if version in self.broken:
            raise ValueError(f"sha256 of v{version} does not match its tag")
        return f"runtime-{version}"

    def install(self, runtime: str) -> None:
        self.installed.append(runtime)
        self.served = (runtime.removeprefix("runtime-"), False)

    def count(self, done: bool) -> None:
        self.counts[done] += 1

    def watch(self) -> AliasWatch[str]:
        return AliasWatch(
            "champion",
            self.read,
            lambda: self.served,
            self.prepare,
            self.install,
            self.count,
            poll_s=60.0,
        )


def test_it_swaps_once_the_alias_moved_and_only_then() -> None:
    world = World()
    watch = world.watch()
    watch.check()
    assert world.prepared == [] and world.installed == []
    world.alias = "2"
    watch.check()
    watch.check()
    assert world.installed == ["runtime-2"]
    assert world.counts == {True: 1, False: 0}


def test_a_failed_load_keeps_the_old_model_is_counted_logged_once_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = World()
    world.alias = "3"
    world.broken.add("3")
    watch = world.watch()
    with caplog.at_level(logging.ERROR, logger="services.alias_watch"):
        watch.check()
        watch.check()
    assert world.served == ("1", False) and world.installed == []
    assert world.prepared == ["3", "3"]
    assert world.counts == {True: 0, False: 2}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "v3, which could not be served (sha256 of v3" in lines[0]
    assert "v1 keeps serving" in lines[0]
    world.broken.clear()
    watch.check()
    assert world.installed == ["runtime-3"]


def test_a_copy_served_during_an_outage_is_replaced_once_the_registry_answers() -> None:
    world = World()
    world.served = ("1", True)
    world.registry_down = True
    watch = world.watch()
    watch.check()
    assert world.prepared == []
    world.registry_down = False
    watch.check()
    assert world.installed == ["runtime-1"] and world.served == ("1", False)


def test_an_alias_removed_leaves_the_model_serving(caplog: pytest.LogCaptureFixture) -> None:
    world = World()
    world.alias = None
    watch = world.watch()
    with caplog.at_level(logging.ERROR, logger="services.alias_watch"):
        watch.check()
        watch.check()
    assert world.prepared == [] and world.served == ("1", False)
    assert [r.getMessage() for r in caplog.records] == [
        "@champion is not set in the registry; v1 keeps serving"
    ]


def test_a_swap_that_fails_is_counted_and_the_watch_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = World()
    world.alias = "2"
    installs: list[str] = []

    def failing_install(runtime: str) -> None:
        installs.append(runtime)
        raise TimeoutError("the event loop did not answer")

    world.install = failing_install  # type: ignore[method-assign]
    watch = world.watch()
    with caplog.at_level(logging.ERROR, logger="services.alias_watch"):
        watch.check()
        watch.check()
    assert installs == ["runtime-2", "runtime-2"]
    assert world.served == ("1", False) and world.counts == {True: 0, False: 2}
    assert len(caplog.records) == 1 and "the swap to v2 failed" in caplog.records[0].getMessage()
