# sse-gateway. `make run` starts the gateway (no Redis needed); `make test` runs every test.
# The Docker targets (build, up, down, restart, logs) need a Docker engine.

COMPOSE ?= docker compose -f docker/docker-compose.yml --env-file .env

.PHONY: run test tools lint fmt bench build up down restart logs token env

.env:
	@cp .env.example .env
	@echo "created .env from .env.example: set JWT_SECRET before going anywhere near production" >&2

env: .env

run: .env
	cargo run --bin sse-gateway

# Installs the programs the tests drive (redis-server, nginx, Chromium, Node and Python tools) when
# missing, then runs every test against real processes.
test: tools
	cargo test --workspace --all-targets

tools:
	.ci/install-tools

lint:
	cargo fmt --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt

# Runs the benchmark scenario set against sse-gateway with release builds (long: see
# docs/benchmarks.md); results land in bench/results/<date>-gateway/. Pass SCENARIOS="unicast
# broadcast" for a subset, SMOKE=1 for a quick check. Peers: bench/peers/{nchan,pushpin}/run.sh.
bench:
	bench/scenarios/run.sh $(SCENARIOS)

# Usage: make token APP=shop USER_ID=alice [ROLE=publisher]
token: .env
	@cargo run -q --bin sse-token -- $(APP) $(USER_ID) $(if $(ROLE),--role $(ROLE))

build: .env
	$(COMPOSE) build

up: .env
	$(COMPOSE) up -d

down:
	$(COMPOSE) down

restart:
	$(COMPOSE) restart

logs:
	$(COMPOSE) logs --follow
