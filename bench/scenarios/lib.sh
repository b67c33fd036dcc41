# Shared by bench/scenarios/run.sh and the bench/peers/* scripts (sourced, not run): paths, the
# release build, free ports, starting and stopping the servers under test (sse-gateway, Redis or a
# Redis Cluster, Nchan, Pushpin) and running sse-bench into the results directory.
#
# Only processes started here are stopped here, by their pid.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_DIR/target}
BIN_DIR=$CARGO_TARGET_DIR/release
SSE_BENCH=$BIN_DIR/sse-bench
GATEWAY=$BIN_DIR/sse-gateway
RESULTS=${RESULTS:-$BENCH_DIR/results/$(date +%Y%m%d-%H%M%S)}
# 32 bytes or more: the gateway runs in production mode, which refuses shorter secrets.
SECRET=${BENCH_SECRET:-bench-$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')}
WORK=$(mktemp -d /tmp/sse-bench-run.XXXXXX)
STARTED_PIDS=()
# A command the gateway runs under (a profiler: bench/scenarios/heap.sh), none by default.
GATEWAY_WRAP=()

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

cleanup() {
  local pid
  for pid in "${STARTED_PIDS[@]}"; do
    stop_pid "$pid"
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

build_release() {
  if [ -n "${BENCH_NO_BUILD:-}" ]; then
    return 0
  fi
  log "building release binaries into $CARGO_TARGET_DIR"
  (cd "$REPO_DIR" && cargo build --release -q -p sse-gateway --bin sse-gateway &&
    cargo build --release -q -p sse-bench)
}

# A TCP port nobody listens on, below the ephemeral range (so outgoing connections never take it).
free_port() {
  local p
  for p in $(shuf -i 20000-32000 -n 200); do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  die "no free port found"
}

# wait_port PORT [SECONDS]: until something accepts on 127.0.0.1:PORT.
wait_port() {
  local port=$1 limit=${2:-20} i
  for ((i = 0; i < limit * 10; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  die "nothing listening on port $port after ${limit}s"
}

stop_pid() {
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

# Stops one started process and forgets it.
stop_started() {
  local pid=$1 keep=() p
  stop_pid "$pid"
  for p in "${STARTED_PIDS[@]}"; do
    [ "$p" = "$pid" ] || keep+=("$p")
  done
  STARTED_PIDS=("${keep[@]}")
}

# start_redis: sets REDIS_PORT and REDIS_PID.
start_redis() {
  command -v redis-server >/dev/null || die "redis-server is not installed"
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --maxclients 10000 --logfile "$WORK/redis-$REDIS_PORT.log" &
  REDIS_PID=$!
  STARTED_PIDS+=("$REDIS_PID")
  wait_port "$REDIS_PORT"
}

# redis_stats_reset / redis_stats NAME: the run's standalone Redis's per-command counts and times
# and its CPU (`INFO commandstats`, `INFO cpu`), reset before a run and written after it to
# $RESULTS/NAME.redis.txt: where Redis's share of a run goes, command by command.
redis_cpu() {
  redis-cli -p "$REDIS_PORT" INFO cpu 2>/dev/null | tr -d '\r' |
    awk -F: '/^used_cpu_(sys|user):/ { s += $2 } END { print s + 0 }'
}
redis_stats_reset() {
  [ -n "${REDIS_PORT:-}" ] && command -v redis-cli >/dev/null || return 0
  redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null 2>&1 || true
  REDIS_CPU0=$(redis_cpu)
}
redis_stats() {
  [ -n "${REDIS_PORT:-}" ] && command -v redis-cli >/dev/null || return 0
  {
    echo "redis cpu seconds during the run: $(echo "$(redis_cpu) ${REDIS_CPU0:-0}" | awk '{ print $1 - $2 }')"
    redis-cli -p "$REDIS_PORT" INFO commandstats 2>/dev/null | tr -d '\r'
  } >"$RESULTS/$1.redis.txt" || true
}

# start_cluster: a Redis Cluster of six nodes (three primaries, three replicas) on free ports, bus
# ports chosen explicitly, no persistence, each node's files in its own directory under $WORK; waits
# until every node says the cluster is ok and every primary has its replica in sync. Sets
# CLUSTER_PORTS and CLUSTER_PIDS (node 0 first); stop_cluster stops them.
start_cluster() {
  local dir i port bus state ok primaries
  command -v redis-cli >/dev/null || die "redis-cli is not installed"
  CLUSTER_PORTS=() CLUSTER_PIDS=()
  for ((i = 0; i < 6; i++)); do
    port=$(free_port)
    bus=$(free_port)
    while [ "$bus" = "$port" ]; do bus=$(free_port); done
    dir="$WORK/cluster-$port"
    mkdir -p "$dir"
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
      --cluster-port "$bus" --dir "$dir" --maxclients 10000 --logfile "$dir/redis.log" &
    CLUSTER_PIDS+=("$!")
    STARTED_PIDS+=("$!")
    CLUSTER_PORTS+=("$port")
    # Listening before the next free_port, so no two nodes pick the same port.
    wait_port "$port"
  done
  timeout 60 redis-cli --cluster create "${CLUSTER_PORTS[@]/#/127.0.0.1:}" --cluster-replicas 1 \
    --cluster-yes >"$WORK/cluster-create.log" 2>&1 ||
    die "redis-cli --cluster create failed, see $WORK/cluster-create.log"
  for ((i = 0; i < 300; i++)); do
    ok=0 primaries=0
    for port in "${CLUSTER_PORTS[@]}"; do
      redis-cli -p "$port" CLUSTER INFO 2>/dev/null | grep -q '^cluster_state:ok' && ok=$((ok + 1))
      state=$(redis-cli -p "$port" INFO replication 2>/dev/null || true)
      grep -q '^role:master' <<<"$state" && grep -q 'state=online' <<<"$state" &&
        primaries=$((primaries + 1))
    done
    [ "$ok" = 6 ] && [ "$primaries" = 3 ] && return 0
    sleep 0.1
  done
  die "the cluster on ports ${CLUSTER_PORTS[*]} is not ok after 30 s"
}

# cluster_primary KEY: the port of the primary that holds KEY's slot now.
cluster_primary() {
  local slot port
  slot=$(redis-cli -p "${CLUSTER_PORTS[0]}" CLUSTER KEYSLOT "$1")
  port=$(redis-cli -p "${CLUSTER_PORTS[0]}" CLUSTER NODES | awk -v s="$slot" '
    $3 ~ /master/ {
      for (i = 9; i <= NF; i++) {
        n = split($i, r, "-")
        if (n == 1) r[2] = r[1]
        if (s + 0 >= r[1] + 0 && s + 0 <= r[2] + 0) { split($2, a, "[:@]"); print a[2]; exit }
      }
    }')
  [ -n "$port" ] || die "no primary holds slot $slot of $1"
  echo "$port"
}

# stop_cluster: every node at once (TERM, then the bounded wait of stop_pid each).
stop_cluster() {
  local pid
  for pid in "${CLUSTER_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${CLUSTER_PIDS[@]}"; do stop_started "$pid"; done
  CLUSTER_PIDS=() CLUSTER_PORTS=()
}

# start_gateway PORT [REDIS_URL]: sets GATEWAY_PID, and OPERATOR_PORT (its /metrics; a free port
# each, since several gateways run side by side). Pings on (PING_INTERVAL, default 30 s), logs at
# warn so per-stream log lines do not cost the server CPU during the measurement.
start_gateway() {
  local port=$1 redis=${2:-}
  [ -x "$GATEWAY" ] || die "$GATEWAY not built"
  OPERATOR_PORT=$(free_port)
  (
    ulimit -n "$(ulimit -Hn)"
    export APP_HOST=127.0.0.1 APP_PORT="$port" JWT_SECRET="$SECRET" APP_MODE=production \
      OPERATOR_ADDR="127.0.0.1:$OPERATOR_PORT" \
      PING_INTERVAL="${PING_INTERVAL:-30}" RUST_LOG="${GATEWAY_LOG:-warn}"
    if [ -n "$redis" ]; then export REDIS_URL="$redis"; else unset REDIS_URL REDIS_HOST; fi
    exec "${GATEWAY_WRAP[@]}" "$GATEWAY"
  ) >"$WORK/gateway-$port.log" 2>&1 &
  GATEWAY_PID=$!
  STARTED_PIDS+=("$GATEWAY_PID")
  wait_port "$port"
  # Listening comes before the broker link is up: measure a gateway that is ready, not one still
  # connecting to Redis.
  local i
  for ((i = 0; i < 100; i++)); do
    curl -sf "http://127.0.0.1:$port/ready" >/dev/null && return 0
    sleep 0.1
  done
  die "gateway on port $port not ready after 10 s"
}

# start_nchan PORT: nginx with one worker and the nchan module (bench/peers/nchan/nginx.conf);
# sets NCHAN_PID (the master; the worker is found through the listening port).
start_nchan() {
  local port=$1 dir="$WORK/nchan-$1"
  local module=${NCHAN_MODULE:-/usr/lib/nginx/modules/ngx_nchan_module.so}
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || die "nginx is not installed"
  # NCHAN_MODULE can point at a module unpacked with `apt-get download libnginx-mod-nchan` and
  # `dpkg -x`, leaving the system's nginx untouched.
  [ -e "$module" ] || die "the nchan module is missing: apt-get install libnginx-mod-nchan"
  mkdir -p "$dir/logs" "$dir/tmp"
  sed -e "s|@PORT@|$port|g" -e "s|@DIR@|$dir|g" -e "s|@PING@|${PING_INTERVAL:-30}|g" \
    -e "s|@MODULE@|$module|g" "$BENCH_DIR/peers/nchan/nginx.conf" >"$dir/nginx.conf"
  (
    ulimit -n "$(ulimit -Hn)"
    exec /usr/sbin/nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;'
  ) >"$dir/stdout.log" 2>&1 &
  NCHAN_PID=$!
  STARTED_PIDS+=("$NCHAN_PID")
  wait_port "$port"
}

# start_pushpin PORT: Pushpin (bench/peers/pushpin) plus its tiny GRIP origin; sets PUSHPIN_PID,
# PUSHPIN_PUBLISH_PORT and PUSHPIN_SERVER_PIDS (the runner's children, measured together).
start_pushpin() {
  local port=$1 dir="$WORK/pushpin-$1" origin_port offset
  command -v pushpin >/dev/null || die "pushpin is not installed: apt-get install pushpin"
  origin_port=$(free_port)
  # Pushpin's ZeroMQ and control ports are its defaults shifted by port_offset.
  offset=$((RANDOM % 2000 + 100))
  PUSHPIN_PUBLISH_PORT=$((5561 + offset))
  mkdir -p "$dir/run" "$dir/log"
  python3 "$BENCH_DIR/peers/pushpin/origin.py" "$origin_port" "${PING_INTERVAL:-30}" \
    >"$dir/origin.log" 2>&1 &
  STARTED_PIDS+=("$!")
  wait_port "$origin_port"
  sed -e "s|@PORT@|$port|g" -e "s|@DIR@|$dir|g" -e "s|@OFFSET@|$offset|g" \
    "$BENCH_DIR/peers/pushpin/pushpin.conf" >"$dir/pushpin.conf"
  echo "* 127.0.0.1:$origin_port" >"$dir/routes"
  (
    ulimit -n "$(ulimit -Hn)"
    exec pushpin --config "$dir/pushpin.conf"
  ) >"$dir/stdout.log" 2>&1 &
  PUSHPIN_PID=$!
  STARTED_PIDS+=("$PUSHPIN_PID")
  wait_port "$port" 90
  wait_port "$PUSHPIN_PUBLISH_PORT" 90
  sleep 1
  PUSHPIN_SERVER_PIDS=$(pgrep -P "$PUSHPIN_PID" | tr '\n' ' ')
}

# bench NAME ARGS...: one sse-bench run; the summary goes to $RESULTS/NAME.json, progress to .log.
bench() {
  local name=$1
  shift
  mkdir -p "$RESULTS"
  log "$name: sse-bench run $*"
  redis_stats_reset
  if ! "$SSE_BENCH" run --label "$name" --out "$RESULTS/$name.json" "$@" \
    >/dev/null 2>"$RESULTS/$name.log"; then
    log "$name: sse-bench failed, see $RESULTS/$name.log"
    tail -3 "$RESULTS/$name.log" >&2
    return 1
  fi
  redis_stats "$name"
  headline "$RESULTS/$name.json"
}

# headline FILE: the figures a reader looks for first.
headline() {
  jq -r '"  streams ok \(.connections.ok)/\(.connections.requested) failed \(.connections.failed)"
    + " connect p50/p99 \(.connections.latency.p50_us)/\(.connections.latency.p99_us) us"
    + " rate \(.connections.rate_achieved)/s"
    + (if .server.rss_per_conn_bytes then " rss/stream \(.server.rss_per_conn_bytes) B" else "" end)
    + (if .publish then " | sent \(.publish.sent) at \(.publish.rate_achieved)/s" else "" end)
    + (if .deliveries.expected > 0 then " delivered \(.deliveries.received)/\(.deliveries.expected)"
       + " lost \(.deliveries.lost) dup \(.deliveries.duplicated)"
       + " p50/p99/max \(.deliveries.latency.p50_us)/\(.deliveries.latency.p99_us)/\(.deliveries.latency.max_us) us"
       + (if .server.deliveries_per_cpu_sec then " \(.server.deliveries_per_cpu_sec)/server-cpu-s" else "" end)
       else "" end)
    + " | tool cpu \(.tool_cpu.user_secs + .tool_cpu.sys_secs | . * 100 | round / 100) s"' "$1" >&2
}
