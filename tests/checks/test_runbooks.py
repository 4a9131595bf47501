"""The runbooks (docs/runbooks/): every alert and every monitoring alert kind has a page that
exists, every page has its three sections, and every mlgate command on a page parses against
the real command line (parsed by click, never run)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.core import TyperGroup

from checks.runbooks import ALERT_PAGES, MONITORING_PAGES, RUNBOOK_DIR, runbook_link
from checks.slo_rules import build_slo_rules
from checks.trigger import AlertKind
from flows.cli import app
from models.config import CostConfig, SloConfig
from services.metrics import LATENCY_BUCKETS_S

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted((REPO / RUNBOOK_DIR).glob("*.md"))
SECTIONS = ("## Signal", "## First safe action", "## Confirm recovery")


def generated_alerts() -> list[dict]:
    # capacity_rps, a cost budget and the batcher's deadline set: every alert the
    # generator can write.
    built = build_slo_rules(
        SloConfig(capacity_rps=100.0),
        "churn",
        256,
        LATENCY_BUCKETS_S,
        CostConfig(budget_per_1000=0.01),
        max_wait_s=2.0,
    )
    rules = yaml.safe_load(built.to_yaml())
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


def commands(page: Path) -> list[list[str]]:
    """The mlgate commands in the page's bash blocks, as argv."""
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)
    return [
        shlex.split(line)
        for block in blocks
        for line in block.splitlines()
        if line.strip().startswith("mlgate ")
    ]


def parse(argv: list[str]) -> Any:
    """Resolve argv to its command and parse its options and arguments as the command line
    does before running it; a usage error raises (typer's own copy of click's UsageError,
    a `typer.exceptions.TyperException`)."""
    command: Any = typer.main.get_command(app)
    ctx = command.make_context("mlgate", argv[1:])
    while isinstance(command, TyperGroup):
        rest = [*ctx._protected_args, *ctx.args]
        name, sub, args = command.resolve_command(ctx, rest)
        assert sub is not None and name is not None, argv
        ctx = sub.make_context(name, args, parent=ctx)
        command = sub
    return command


def test_every_generated_alert_links_a_page_that_exists() -> None:
    alerts = generated_alerts()
    assert {r["alert"] for r in alerts} == set(ALERT_PAGES)
    for rule in alerts:
        page = REPO / rule["annotations"]["runbook_page"]
        assert page.is_file(), (rule["alert"], page)
        # The page names the alert, so a reader who arrives from it finds their section.
        assert rule["alert"] in page.read_text(), (rule["alert"], page)


def test_every_monitoring_alert_kind_has_a_page() -> None:
    assert set(MONITORING_PAGES) == {kind.value for kind in AlertKind}
    for stem in MONITORING_PAGES.values():
        assert (REPO / runbook_link(stem, None)).is_file(), stem


def test_a_published_location_is_linked_instead_of_the_repository_path() -> None:
    assert runbook_link("error-burst", "https://wiki.example/runbooks/") == (
        "https://wiki.example/runbooks/error-burst.md"
    )


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_each_page_has_its_sections_and_its_commands_parse(page: Path) -> None:
    if page.name == "README.md":
        linked = set(re.findall(r"\]\(([\w-]+\.md)\)", page.read_text()))
        assert linked == {p.name for p in PAGES if p.name != "README.md"}
        return
    text = page.read_text()
    positions = [text.find(section) for section in SECTIONS]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), page.name
    found = commands(page)
    assert found, f"{page.name} gives no mlgate command"
    for argv in found:
        parse(argv)


def test_the_parser_refuses_what_the_command_line_would() -> None:
    from typer.exceptions import TyperException

    with pytest.raises(TyperException, match="No such option"):
        parse(["mlgate", "rollback", "churn", "--reasn", "typo"])
    with pytest.raises(TyperException, match="Missing parameter: reason"):
        parse(["mlgate", "canary", "abort"])
    with pytest.raises(TyperException, match="No such command"):
        parse(["mlgate", "modles", "list"])
