# tests/edge.rs checks /metrics with promtool, from Debian's prometheus package (whose service is
# not started). Sourced by .ci/install-tools.

if ! command -v promtool >/dev/null; then
  sse_install_without_services prometheus
fi
