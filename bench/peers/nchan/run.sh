#!/usr/bin/env bash
# Runs the benchmark scenario set against Nchan (nginx, one worker), with the configs in this
# directory. Same arguments and environment as bench/scenarios/run.sh (e.g. SMOKE=1, scenario names).
# Needs: apt-get install nginx libnginx-mod-nchan jq
set -euo pipefail
exec "$(dirname "$0")/../../scenarios/run.sh" --target nchan "$@"
