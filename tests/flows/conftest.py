from __future__ import annotations

import pytest
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    # A temporary Prefect API backed by a throwaway SQLite database, for the whole session.
    with prefect_test_harness(server_startup_timeout=120):
        yield
