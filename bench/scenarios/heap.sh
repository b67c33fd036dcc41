#!/usr/bin/env bash
# What an idle stream is made of, allocation by allocation: a gateway built with the system
# allocator runs under heaptrack with STREAMS idle streams (sse-bench), is killed while they are
# open, and the call sites of what was still allocated are printed, largest first, in bytes per
# stream. Sites that do not grow with the streams (fred's message buffers, the runtime) are
# divided by the streams too: they are the ones whose figure halves when STREAMS doubles.
#
#   bench/scenarios/heap.sh            STREAMS=2000 by default; TOP=25 sites
#
# Needs heaptrack (apt-get install heaptrack). The build goes to target/heap (its own directory:
# the feature changes the binary).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
STREAMS=${STREAMS:-2000}
TOP=${TOP:-25}
command -v heaptrack >/dev/null || die "heaptrack is needed (apt-get install heaptrack)"
command -v redis-server >/dev/null || die "redis-server is needed"
HEAP_TARGET=$REPO_DIR/target/heap
log "building the gateway with the system allocator into $HEAP_TARGET"
(cd "$REPO_DIR" && CARGO_TARGET_DIR=$HEAP_TARGET cargo build --release -q -p sse-gateway \
  --bin sse-gateway --features system-allocator && cargo build --release -q -p sse-bench)
start_redis
GATEWAY=$HEAP_TARGET/release/sse-gateway
GATEWAY_WRAP=(heaptrack -o "$WORK/heap")
port=$(free_port)
start_gateway "$port" "redis://127.0.0.1:$REDIS_PORT"
# heaptrack runs the gateway as its child: the pid to kill is the gateway's own.
gateway=$(pgrep -f "^$GATEWAY" | head -1)
[ -n "$gateway" ] || die "the gateway did not start (see $WORK/gateway-$port.log)"
(
  ulimit -n "$(ulimit -Hn)"
  exec "$SSE_BENCH" run --url "http://127.0.0.1:$port/sse" --token-in header --secret "$SECRET" \
    --connections "$STREAMS" --connect-rate 1000 --hold 600 --quiet
) >"$WORK/bench.log" 2>&1 &
STARTED_PIDS+=("$!")
# Connected, then idle long enough for a ping round and the registry's first heartbeat.
sleep $((STREAMS / 1000 + 15))
open=$(curl -sf "http://127.0.0.1:$OPERATOR_PORT/metrics" | awk '/^sse_active_clients /{print $2}')
log "killing the gateway with ${open:-?} streams open"
kill -KILL "$gateway"
sleep 3
heaptrack_print -f "$WORK/heap.zst" --flamegraph-cost-type leaked -F "$WORK/leaked.folded" \
  >/dev/null 2>&1 || true
python3 - "$WORK/leaked.folded" "${open:-$STREAMS}" "$TOP" <<'PY'
import re, sys
path, streams, top = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
# Frames that only say "an allocation happened": the site is the first frame below them.
noise = re.compile(r"^(alloc|alloc_impl|allocate|try_allocate_in|with_capacity|box_new_uninit|"
                   r"new<> \(boxed|exchange_malloc|aligned_malloc|new_uninit_in|try_new_uninit_in|"
                   r"finish_grow|grow|do_reserve|reserve|malloc|_R|__rdl|new_uninitialized|do_alloc|"
                   r"fallible_with_capacity|prepare_resize|resize_inner|reserve_rehash)")
sites = {}
for line in open(path):
    stack, _, n = line.rstrip().rpartition(" ")
    frames = [f for f in stack.split(";") if not noise.match(f)]
    site = " <- ".join(reversed(frames[-6:]))
    sites[site] = sites.get(site, 0) + int(n)
total = sum(sites.values())
print(f"{total:,} B still allocated with {streams:,.0f} streams open (fixed costs included)")
for site, n in sorted(sites.items(), key=lambda kv: -kv[1])[:top]:
    print(f"{n / streams:9.1f}  {site[:220]}")
PY
