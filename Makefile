# sse-gateway. `make run` starts the gateway (no Redis needed); `make test` runs every test.
# The Docker targets (build, up, down, restart, logs) need a Docker engine.

COMPOSE ?= docker compose -f docker/docker-compose.yml --env-file .env

.PHONY: run test tools lint fmt bench build up down restart logs token env compose-v2 secret-check

# A new .env gets a random JWT_SECRET of its own: the example's placeholder is public, and `make up`
# refuses it.
.env:
	@secret="$$(openssl rand -hex 32 2>/dev/null || od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"; \
	sed "s/^JWT_SECRET=.*/JWT_SECRET=$$secret/" .env.example > .env
	@echo "created .env from .env.example, with a random JWT_SECRET (tokens: make token)" >&2

env: .env

# On 127.0.0.1:8080, metrics on 127.0.0.1:9180: the gateway's own defaults are loopback (APP_HOST=0.0.0.0
# make run for every interface).
run: .env
	cargo run --bin sse-gateway

# Installs the programs the tests drive (redis-server, nginx, Chromium, Node and Python tools,
# promtool, a Docker engine) when missing, then runs every test against real processes.
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

# Usage: make token APP=shop USER_ID=alice [ROLE=publisher] [TTL=seconds]
token: .env
	@cargo run -q --bin sse-token -- $(APP) $(USER_ID) $(if $(ROLE),--role $(ROLE)) $(if $(TTL),--ttl $(TTL))

# The Docker targets need Compose v2 (Debian's docker-compose 1.x cannot read the file's `name:`).
# Base images come from the environment when set: RUST_IMAGE, RUNTIME_IMAGE, REDIS_IMAGE,
# NGINX_IMAGE (docs/deployment.md).
compose-v2:
	@docker compose version >/dev/null 2>&1 || { echo "make: the Docker targets need Docker Compose v2 (the 'docker compose' CLI plugin): install it (.ci/tools/deploy.sh does) and a Docker engine" >&2; exit 1; }

# The placeholder secret of .env.example is public: the stack never runs with it.
secret-check: .env
	@! grep -qx "$$(grep '^JWT_SECRET=' .env.example)" .env || { echo "make: .env has the example JWT_SECRET: set a long random one (openssl rand -hex 32)" >&2; exit 1; }

build: compose-v2 secret-check
	$(COMPOSE) build

up: compose-v2 secret-check
	$(COMPOSE) up -d

# The gateways stop first: nginx still carries their drain (a `shutdown` event to every stream, so
# clients reconnect elsewhere). `down` alone would stop nginx first and cut the streams.
down: compose-v2
	$(COMPOSE) stop gateway
	$(COMPOSE) down

restart: compose-v2
	$(COMPOSE) restart

logs: compose-v2
	$(COMPOSE) logs --follow
