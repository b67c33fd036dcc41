#!/usr/bin/env bash
# The benchmark scenario set (issue 5), against sse-gateway or a peer, with release builds.
#
#   bench/scenarios/run.sh [--target gateway|nchan|pushpin] [SCENARIO ...]
#
# SCENARIO is any of: idle idle-multi unicast unicast-search broadcast storm durable durable-cluster
# resync (default: all; the peers skip idle-multi, durable, durable-cluster and resync, which are the
# gateway's own). Results: one JSON summary per run in $RESULTS (default
# bench/results/<date>-<target>), progress logs beside them.
#
# Sizes and rates come from the environment, defaults being the documented scenario set:
#   IDLE_SIZES="10000:1000 19500:5000"   streams:connect-rate pairs, one fresh server each
#   MULTI_SIZES="50000 100000"           idle-multi totals over MULTI_INSTANCES (6) gateways
#   UNICAST_USERS=2000 UNICAST_MESSAGES=20000 UNICAST_RATE=5000
#   SEARCH_RATES="5000 10000 ... 150000" SEARCH_SECS=4 SEARCH_MAX_P99_US=50000
#   BROADCAST_CONNS=5000 BROADCAST_MESSAGES=200 BROADCAST_RATES="10 20 0"   (0 = one burst)
#   STORM_CONNS=19500 STORM_PROCS=2 STORM_PUB_RATE=20 STORM_PUB_SECS=6
#   DURABLE_RATES="1000 2000 5000 10000" DURABLE_SECS=4   durable unicast, through FCALL and POST
#     (durable-cluster: the same on a fresh 6-node Redis Cluster per repeat, redis-cli needed)
#   RESYNC_CONNS=19500 RESYNC_EVENTS=20   open streams re-synced after a Redis restart (AOF)
#   HOLD=35 PING_INTERVAL=30 REPEAT=1 (REPEAT=3 for medians of three)
# SMOKE=1 shrinks everything to a quick check (at most 2,000 streams, runs of a few seconds).
set -euo pipefail

TARGET=gateway
if [ "${1:-}" = "--target" ]; then
  TARGET=${2:?--target needs gateway, nchan or pushpin}
  shift 2
fi
case $TARGET in gateway | nchan | pushpin) ;; *)
  echo "unknown target $TARGET" >&2
  exit 2
  ;;
esac

RESULTS=${RESULTS:-$(cd "$(dirname "$0")/.." && pwd)/results/$(date +%Y%m%d-%H%M%S)-$TARGET}
source "$(dirname "$0")/lib.sh"

if [ -n "${SMOKE:-}" ]; then
  : "${IDLE_SIZES:=1000:1000}" "${MULTI_SIZES:=1200}" "${MULTI_INSTANCES:=2}"
  : "${UNICAST_USERS:=500}" "${UNICAST_MESSAGES:=2000}" "${UNICAST_RATE:=1000}"
  : "${SEARCH_RATES:=2000 5000}" "${SEARCH_SECS:=1}"
  : "${BROADCAST_CONNS:=500}" "${BROADCAST_MESSAGES:=40}" "${BROADCAST_RATES:=20 0}"
  : "${STORM_CONNS:=1000}" "${STORM_PUB_SECS:=4}" "${HOLD:=3}" "${PING_INTERVAL:=1}"
  : "${DURABLE_RATES:=1000 2000}" "${DURABLE_SECS:=1}" "${RESYNC_CONNS:=1000}"
fi
: "${IDLE_SIZES:=10000:1000 19500:5000}"
: "${MULTI_SIZES:=50000 100000}" "${MULTI_INSTANCES:=6}" "${MULTI_RATE:=6000}"
: "${UNICAST_USERS:=2000}" "${UNICAST_MESSAGES:=20000}" "${UNICAST_RATE:=5000}"
: "${SEARCH_RATES:=5000 10000 20000 30000 40000 50000 60000 80000 100000 120000 150000}" "${SEARCH_SECS:=4}"
: "${SEARCH_MAX_P99_US:=50000}"
: "${BROADCAST_CONNS:=5000}" "${BROADCAST_MESSAGES:=200}" "${BROADCAST_RATES:=10 20 0}"
: "${STORM_CONNS:=19500}" "${STORM_PROCS:=2}" "${STORM_RATE:=5000}"
: "${STORM_PUB_RATE:=20}" "${STORM_PUB_SECS:=6}"
: "${DURABLE_RATES:=1000 2000 5000 10000}" "${DURABLE_SECS:=4}"
: "${RESYNC_CONNS:=19500}" "${RESYNC_EVENTS:=20}"
: "${HOLD:=35}" "${REPEAT:=1}" "${PER_PROC:=10000}"
export PING_INTERVAL=${PING_INTERVAL:-30}

# Per target: how streams are opened and messages published. start_target [REDIS_URL]: the
# gateway's Redis (default: the run's standalone Redis; PUB_ARGS still publish there).
SUB_URL="" SUB_ARGS=() PUB_ARGS=() PID_ARGS=()
start_target() {
  local port
  port=$(free_port)
  PID_ARGS=()
  case $TARGET in
    gateway)
      start_gateway "$port" "${1:-redis://127.0.0.1:$REDIS_PORT}"
      SERVER_PID=$GATEWAY_PID
      SUB_URL="http://127.0.0.1:$port/sse"
      SUB_ARGS=(--url "$SUB_URL" --token-in header --secret "$SECRET")
      PUB_ARGS=(--publish redis --redis-url "redis://127.0.0.1:$REDIS_PORT")
      if [ "${GATEWAY_PUBLISH:-redis}" = http ]; then
        PUB_ARGS=(--publish http --http-style gateway --http-publish-conns 8)
      fi
      PID_ARGS=(--server-pid "$GATEWAY_PID")
      ;;
    nchan)
      start_nchan "$port"
      SERVER_PID=$NCHAN_PID
      SUB_URL="http://127.0.0.1:$port/sub/{app}/{user}"
      SUB_ARGS=(--url "$SUB_URL" --token-in none)
      PUB_ARGS=(--publish http --http-style nchan --http-publish-conns 8
        --http-publish-url "http://127.0.0.1:$port/pub/{channel}")
      # Master and worker both hold the listening socket: measured together (the master is idle).
      ;;
    pushpin)
      start_pushpin "$port"
      SERVER_PID=$PUSHPIN_PID
      SUB_URL="http://127.0.0.1:$port/sub/{app}/{user}"
      SUB_ARGS=(--url "$SUB_URL" --token-in none)
      PUB_ARGS=(--publish http --http-style pushpin --http-publish-conns 8
        --http-publish-url "http://127.0.0.1:$PUSHPIN_PUBLISH_PORT/publish/")
      local p
      for p in $PUSHPIN_SERVER_PIDS; do PID_ARGS+=(--server-pid "$p"); done
      ;;
  esac
}

stop_target() {
  stop_started "$SERVER_PID"
  # Pushpin's runner may leave its children behind if it had to be killed.
  local p
  if [ "$TARGET" = pushpin ]; then
    for p in $PUSHPIN_SERVER_PIDS; do stop_pid "$p"; done
  fi
  sleep 1
}

# split_run NAME PROCS ARGS...: PROCS sse-bench processes, shards of one run started together,
# merged into NAME.json. SHARD0_ARGS (an array) go to the first process only (the publisher); the
# others read its per-channel counts from a shared --sent-file to count losses exactly.
SHARD0_ARGS=()
split_run() {
  local name=$1 procs=$2 i pids=() parts=() start_at extra
  shift 2
  mkdir -p "$RESULTS"
  start_at=$(($(date +%s%3N) + 1500))
  rm -f "$WORK/$name.sent"
  log "$name: $procs processes: sse-bench run $* ${SHARD0_ARGS[*]}"
  redis_stats_reset
  for ((i = 0; i < procs; i++)); do
    extra=()
    if [ ${#SHARD0_ARGS[@]} -gt 0 ]; then
      extra=(--sent-file "$WORK/$name.sent")
      [ "$i" = 0 ] && extra+=("${SHARD0_ARGS[@]}")
    fi
    "$SSE_BENCH" run --label "$name" --shard "$i/$procs" --start-at "$start_at" \
      --out "$RESULTS/$name.part$i.json" "$@" "${extra[@]}" >/dev/null 2>"$RESULTS/$name.part$i.log" &
    pids+=("$!")
    parts+=("$RESULTS/$name.part$i.json")
  done
  local failed=0
  for i in "${!pids[@]}"; do wait "${pids[$i]}" || failed=1; done
  [ "$failed" = 0 ] || {
    log "$name: a process failed, see $RESULTS/$name.part*.log"
    return 1
  }
  "$SSE_BENCH" merge --label "$name" --out "$RESULTS/$name.json" "${parts[@]}" >/dev/null
  redis_stats "$name"
  headline "$RESULTS/$name.json"
}

# run_sized NAME N ARGS...: one process, or split when N is more than one process should hold.
run_sized() {
  local name=$1 n=$2 procs
  shift 2
  procs=$(((n + PER_PROC - 1) / PER_PROC))
  if [ "$procs" -le 1 ]; then
    bench "$name" --connections "$n" "$@"
  else
    split_run "$name" "$procs" --connections "$n" "$@"
  fi
}

suffix() { [ "$REPEAT" -gt 1 ] && echo "-r$1" || true; }

# 1. Idle capacity: RSS per stream (pings on, after a hold longer than the ping interval, and
#    again after one reconnect wave: churn), connect rate and connect latency.
scenario_idle() {
  local pair n rate procs r
  for r in $(seq "$REPEAT"); do
    for pair in $IDLE_SIZES; do
      n=${pair%%:*} rate=${pair##*:}
      procs=$(((n + PER_PROC - 1) / PER_PROC))
      start_target
      run_sized "idle-$n$(suffix "$r")" "$n" "${SUB_ARGS[@]}" "${PID_ARGS[@]}" \
        --connect-rate "$((rate / procs))" --hold "$HOLD" \
        --reconnect-waves 1 --reconnect-rate "$((rate / procs))" || true
      stop_target
    done
  done
}

# 1b. 50k / 100k idle streams on one box: MULTI_INSTANCES gateways sharing one Redis, one
#     sse-bench process per instance, merged (RSS per stream summed over the instances).
scenario_idle_multi() {
  [ "$TARGET" = gateway ] || {
    log "idle-multi: gateway only"
    return 0
  }
  local n i per name r ports=() gpids=() pids=() parts=() start_at
  for r in $(seq "$REPEAT"); do
    for n in $MULTI_SIZES; do
      per=$((n / MULTI_INSTANCES))
      [ "$per" -le 19000 ] || die "idle-multi: $per streams per instance exceeds the 20,000 fd limit"
      name="idle-multi-$n$(suffix "$r")"
      ports=() gpids=() pids=() parts=()
      for ((i = 0; i < MULTI_INSTANCES; i++)); do
        ports+=("$(free_port)")
        start_gateway "${ports[$i]}" "redis://127.0.0.1:$REDIS_PORT"
        gpids+=("$GATEWAY_PID")
      done
      mkdir -p "$RESULTS"
      start_at=$(($(date +%s%3N) + 1500))
      log "$name: $MULTI_INSTANCES gateways, $per streams each"
      for ((i = 0; i < MULTI_INSTANCES; i++)); do
        "$SSE_BENCH" run --label "$name" --url "http://127.0.0.1:${ports[$i]}/sse" \
          --secret "$SECRET" --server-pid "${gpids[$i]}" --connections "$per" \
          --user-prefix "i${i}u" --connect-rate "$((MULTI_RATE / MULTI_INSTANCES))" \
          --hold "$HOLD" --start-at "$start_at" --out "$RESULTS/$name.part$i.json" \
          >/dev/null 2>"$RESULTS/$name.part$i.log" &
        pids+=("$!")
        parts+=("$RESULTS/$name.part$i.json")
      done
      for i in "${!pids[@]}"; do wait "${pids[$i]}" || log "$name: process $i failed"; done
      "$SSE_BENCH" merge --label "$name" --out "$RESULTS/$name.json" "${parts[@]}" >/dev/null &&
        headline "$RESULTS/$name.json"
      for i in "${!gpids[@]}"; do stop_started "${gpids[$i]}"; done
      sleep 1
    done
  done
}

# 2. Unicast: UNICAST_USERS users, one stream each, UNICAST_MESSAGES at UNICAST_RATE/s to random users.
scenario_unicast() {
  local r
  for r in $(seq "$REPEAT"); do
    start_target
    bench "unicast-$UNICAST_RATE$(suffix "$r")" "${SUB_ARGS[@]}" "${PID_ARGS[@]}" "${PUB_ARGS[@]}" \
      --connections "$UNICAST_USERS" --connect-rate 2000 --hold 2 --pattern unicast \
      --messages "$UNICAST_MESSAGES" --rate "$UNICAST_RATE" --drain 5 || true
    stop_target
  done
}

# 2b. The highest sustainable unicast rate: each rate for SEARCH_SECS; sustainable means no loss,
#     no duplicate, the publisher kept 95% of the rate, and p99 under SEARCH_MAX_P99_US.
scenario_unicast_search() {
  local rate best name f ok tried r sfx
  for r in $(seq "$REPEAT"); do
    sfx=$(suffix "$r") best=0 tried=()
    start_target
    for rate in $SEARCH_RATES; do
      name="unicast-search-$rate$sfx"
      bench "$name" "${SUB_ARGS[@]}" "${PID_ARGS[@]}" "${PUB_ARGS[@]}" \
        --connections "$UNICAST_USERS" --connect-rate 2000 --hold 1 --pattern unicast \
        --user-prefix "s${rate}u" --messages "$((rate * SEARCH_SECS))" --rate "$rate" --drain 5 || break
      f="$RESULTS/$name.json"
      ok=$(jq --argjson r "$rate" --argjson p "$SEARCH_MAX_P99_US" \
        '.deliveries.lost == 0 and .deliveries.duplicated == 0 and .deliveries.expected > 0
         and .publish.rate_achieved >= 0.95 * $r and .deliveries.latency.p99_us <= $p' "$f")
      tried+=("{\"rate\":$rate,\"sustainable\":$ok}")
      [ "$ok" = true ] || break
      best=$rate
    done
    stop_target
    (
      IFS=,
      echo "{\"highest_sustainable_rate\":$best,\"max_p99_us\":$SEARCH_MAX_P99_US,\"tried\":[${tried[*]}]}"
    ) | jq . >"$RESULTS/unicast-search$sfx.json"
    log "unicast-search$sfx: highest sustainable rate $best msg/s"
  done
}

# 3. Broadcast fan-out: BROADCAST_CONNS streams of one app, BROADCAST_MESSAGES at each rate.
scenario_broadcast() {
  local rate label r
  for r in $(seq "$REPEAT"); do
    start_target
    for rate in $BROADCAST_RATES; do
      label=$rate
      [ "$rate" = 0 ] && label=burst
      bench "broadcast-$label$(suffix "$r")" "${SUB_ARGS[@]}" "${PID_ARGS[@]}" "${PUB_ARGS[@]}" \
        --connections "$BROADCAST_CONNS" --apps 1 --connect-rate 5000 --hold 2 \
        --pattern broadcast --messages "$BROADCAST_MESSAGES" --rate "$rate" --drain 10 || true
    done
    stop_target
  done
}

# 4. Connect storm: STORM_CONNS streams, then all of them reconnect at once (as after a deploy)
#    while broadcasts go on at STORM_PUB_RATE/s; each stream resumes with Last-Event-ID, so with
#    replay (the gateway's durable path) nothing may be lost. The figures: the wave's time to all
#    re-established, its connect latency and failures, and the messages lost across it.
scenario_storm() {
  local r procs=$STORM_PROCS name pub=()
  [ "$STORM_CONNS" -le "$PER_PROC" ] && procs=1
  local common=(--connections "$STORM_CONNS" --connect-rate "$((STORM_RATE / procs))" --hold 3
    --reconnect-waves 1 --reconnect-rate 0 --last-event-id --connect-timeout 30
    --publish-during-waves --waves-after 2 --drain 10)
  for r in $(seq "$REPEAT"); do
    name="storm-$STORM_CONNS$(suffix "$r")"
    start_target
    # The publish arguments name this server's ports, so they come after it started. The
    # gateway's replay needs durable publishing (history); the peers keep their own buffers.
    pub=("${PUB_ARGS[@]}")
    [ "$TARGET" = gateway ] && pub=(--publish durable --redis-url "redis://127.0.0.1:$REDIS_PORT")
    pub+=(--pattern broadcast --messages "$((STORM_PUB_RATE * STORM_PUB_SECS))" --rate "$STORM_PUB_RATE")
    if [ "$procs" -le 1 ]; then
      bench "$name" "${SUB_ARGS[@]}" "${PID_ARGS[@]}" "${common[@]}" "${pub[@]}" || true
    else
      SHARD0_ARGS=("${pub[@]}")
      split_run "$name" "$procs" "${SUB_ARGS[@]}" "${PID_ARGS[@]}" "${common[@]}" || true
      SHARD0_ARGS=()
    fi
    stop_target
  done
}

# 5. The durable path: unicast to UNICAST_USERS users, each message through `FCALL sse_publish`
#    (history, then publish) and, separately, `POST /publish` (durable): per rate, the rate the
#    publisher sustained, the delivery p99 and losses (none allowed).
# durable_runs NAME SUFFIX FCALL-ARGS...: every rate through the FCALL (these publish arguments),
# then every rate through POST /publish, against the target started.
durable_runs() {
  local name=$1 sfx=$2 via rate pub
  shift 2
  for via in fcall http; do
    for rate in $DURABLE_RATES; do
      pub=("$@")
      [ "$via" = http ] && pub=(--publish http --http-style gateway-durable --http-publish-conns 8)
      bench "$name-$via-$rate$sfx" "${SUB_ARGS[@]}" "${PID_ARGS[@]}" "${pub[@]}" \
        --connections "$UNICAST_USERS" --connect-rate 2000 --hold 1 --pattern unicast \
        --user-prefix "d${via}${rate}u" --messages "$((rate * DURABLE_SECS))" --rate "$rate" \
        --drain 5 || true
    done
  done
}

scenario_durable() {
  [ "$TARGET" = gateway ] || {
    log "durable: gateway only"
    return 0
  }
  local r
  for r in $(seq "$REPEAT"); do
    start_target
    durable_runs durable "$(suffix "$r")" --publish durable --redis-url "redis://127.0.0.1:$REDIS_PORT"
    stop_target
  done
}

# 5b. The durable path on Redis Cluster: as `durable`, on a fresh cluster of six nodes per repeat
#     (three primaries, three replicas, no persistence), the gateway's REDIS_URL naming node 0 only.
#     The FCALL takes the cluster form, `FCALL sse_publish 1 {app0} app0 <user> <envelope>`, on
#     one connection to the primary that holds the slot of {app0} (every stream is in app0).
scenario_durable_cluster() {
  [ "$TARGET" = gateway ] || {
    log "durable-cluster: gateway only"
    return 0
  }
  local r primary
  for r in $(seq "$REPEAT"); do
    start_cluster
    primary=$(cluster_primary "{app0}")
    log "durable-cluster: nodes on ${CLUSTER_PORTS[*]}, {app0} on the primary at $primary"
    start_target "redis-cluster://127.0.0.1:${CLUSTER_PORTS[0]}"
    durable_runs durable-cluster "$(suffix "$r")" --publish durable --durable-keyed \
      --redis-url "redis://127.0.0.1:$primary"
    stop_target
    stop_cluster
  done
}

# 6. Re-sync after a Redis restart: RESYNC_CONNS open streams on one gateway whose Redis (with an
#    append-only file) is killed and started again; RESYNC_EVENTS durable broadcasts are published
#    the moment it is back, before the gateway has its subscriptions again, so every stream must
#    get them from history. The figures, from the gateway's metrics: the time from the lost link
#    to every stream live again, and the events replayed.
scenario_resync() {
  [ "$TARGET" = gateway ] || {
    log "resync: gateway only"
    return 0
  }
  local r n=$RESYNC_CONNS port rport dir procs name bench_pid metrics i
  procs=$(((n + PER_PROC - 1) / PER_PROC))
  for r in $(seq "$REPEAT"); do
    name="resync-$n$(suffix "$r")"
    rport=$(free_port) port=$(free_port) dir="$WORK/resync-redis-$r"
    mkdir -p "$dir" "$RESULTS"
    local redis_cmd=(redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly yes
      --appendfsync everysec --dir "$dir" --maxclients 10000 --logfile "$dir/redis.log")
    "${redis_cmd[@]}" &
    local rpid=$!
    STARTED_PIDS+=("$rpid")
    wait_port "$rport"
    start_gateway "$port" "redis://127.0.0.1:$rport"
    # The streams are held open through the restart (no publishing from the tool: its publisher
    # stops at the first lost Redis reply).
    run_sized "$name" "$n" --url "http://127.0.0.1:$port/sse" --token-in header \
      --secret "$SECRET" --server-pid "$GATEWAY_PID" --connect-rate 5000 --hold 25 &
    bench_pid=$!
    sleep $((n / 5000 + 6))
    redis-cli -p "$rport" FCALL sse_publish 0 app0 "" '{"type":"before"}' >/dev/null
    kill -9 "$rpid"
    sleep 1
    "${redis_cmd[@]}" &
    rpid=$!
    STARTED_PIDS+=("$rpid")
    wait_port "$rport"
    # Redis answers -LOADING while it reads its append-only file.
    for ((i = 0; i < 100; i++)); do
      [ "$(redis-cli -p "$rport" PING 2>/dev/null)" = PONG ] && break
      sleep 0.02
    done
    # One redis-cli for all of them: they land within milliseconds of Redis being back, before
    # the gateway's next reconnect attempt.
    for ((i = 0; i < RESYNC_EVENTS; i++)); do
      printf 'FCALL sse_publish 0 app0 "" "{\\"type\\":\\"during\\",\\"data\\":%d}"\n' "$i"
    done | redis-cli -p "$rport" >/dev/null
    for ((i = 0; i < 300; i++)); do
      metrics=$(curl -s "http://127.0.0.1:$OPERATOR_PORT/metrics" || true)
      grep -q '^sse_resyncs_total [1-9]' <<<"$metrics" && break
      sleep 0.2
    done
    wait "$bench_pid" || true
    jq -n --argjson streams "$n" \
      --argjson seconds "$(awk '/^sse_resync_duration_seconds_sum /{print $2}' <<<"$metrics")" \
      --argjson replayed "$(awk '/^sse_replayed_events_total/{s+=$2} END{print s+0}' <<<"$metrics")" \
      --argjson resets "$(awk '/^sse_replay_resets_total/{s+=$2} END{print s+0}' <<<"$metrics")" \
      '{streams: $streams, resync_seconds: $seconds, replayed_events: $replayed, resets: $resets}' \
      >"$RESULTS/$name.resync.json"
    log "$name: $(jq -c . "$RESULTS/$name.resync.json")"
    stop_started "$GATEWAY_PID"
    stop_started "$rpid"
    sleep 1
  done
}

main() {
  local scenarios=("$@") s
  if [ ${#scenarios[@]} -eq 0 ]; then
    scenarios=(idle idle-multi unicast unicast-search broadcast storm durable durable-cluster resync)
  fi
  command -v jq >/dev/null || die "jq is needed (apt-get install jq)"
  command -v curl >/dev/null || die "curl is needed (apt-get install curl)"
  build_release
  [ -x "$SSE_BENCH" ] || die "$SSE_BENCH not built"
  if [ "$TARGET" = gateway ]; then start_redis; fi
  mkdir -p "$RESULTS"
  log "target $TARGET, results in $RESULTS"
  {
    echo "{\"target\":\"$TARGET\",\"date\":\"$(date -u +%FT%TZ)\",\"nproc\":$(nproc),"
    echo "\"kernel\":\"$(uname -r)\",\"git\":\"$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)\","
    echo "\"smoke\":$([ -n "${SMOKE:-}" ] && echo true || echo false),\"scenarios\":\"${scenarios[*]}\"}"
  } | jq . >"$RESULTS/run.json"
  for s in "${scenarios[@]}"; do
    case $s in
      idle) scenario_idle ;;
      idle-multi) scenario_idle_multi ;;
      unicast) scenario_unicast ;;
      unicast-search) scenario_unicast_search ;;
      broadcast) scenario_broadcast ;;
      storm) scenario_storm ;;
      durable) scenario_durable ;;
      durable-cluster) scenario_durable_cluster ;;
      resync) scenario_resync ;;
      *) die "unknown scenario $s" ;;
    esac
  done
  log "done: $RESULTS"
}

main "$@"
