"""Which runbook page (docs/runbooks/) answers which signal: the Prometheus alerts that
`mlgate slo rules` generates and the alerts the monitoring flow sends.

The pages are the repository's; `slo.runbook_url` says where they are published, so that an
alert can link the page itself. tests/checks/test_runbooks.py checks that every signal has a
page that exists and that every command on a page parses.
"""

from __future__ import annotations

RUNBOOK_DIR = "docs/runbooks"

# Alert name (checks/slo_rules.py) -> page stem.
ALERT_PAGES = {
    "MlgateAvailabilityBudgetBurn": "error-burst",
    "MlgateLatencyP95BudgetBurn": "latency-spike",
    "MlgateLatencyP99BudgetBurn": "latency-spike",
    "MlgateBatcherShedding": "latency-spike",
    "MlgateBatcherSaturated": "latency-spike",
    "MlgateLoadNearCapacity": "latency-spike",
    "MlgateBatcherQueueBacklog": "latency-spike",
    "MlgateBatcherWaitHigh": "latency-spike",
    "MlgateInFlightNearLimit": "latency-spike",
    "MlgateCircuitBreakerOpen": "dependency-down",
    "MlgateInferenceLogDropping": "inference-log-drops",
    "MlgateServingLastKnownGood": "registry-down",
    "MlgateCostOverBudget": "cost-over-budget",
}

# The monitoring flow's alert kinds (checks/trigger.AlertKind values) -> page stem.
MONITORING_PAGES = {
    "data_quality": "data-quality-failure",
    "no_traffic": "no-traffic",
}


def runbook_page(stem: str) -> str:
    """The page's path in the repository."""
    return f"{RUNBOOK_DIR}/{stem}.md"


def runbook_link(stem: str, base_url: str | None) -> str:
    """Where a reader finds the page: under `base_url` when the pages are published there,
    else its path in the repository."""
    if base_url:
        return f"{base_url.rstrip('/')}/{stem}.md"
    return runbook_page(stem)
