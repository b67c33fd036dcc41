# Python tools the tests drive: schemathesis (tests/openapi.rs), pinned, in a virtualenv outside the
# repository (Debian's python3 is "externally managed": no pip installs into it). The tests look for
# it in $SSE_TEST_VENV (default /opt/sse-test-venv), then on PATH.
# Sourced by .ci/install-tools, which provides apt_install: no `cd`, no `exit`.
sse_schemathesis_version=4.32.5
sse_venv="${SSE_TEST_VENV:-/opt/sse-test-venv}"
if ! "$sse_venv/bin/schemathesis" --version 2>/dev/null | grep -qx "schemathesis, version $sse_schemathesis_version"; then
  if ! command -v python3 >/dev/null; then
    apt_install python3
  fi
  # `python3 -m venv` needs ensurepip, which Debian ships separately.
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    apt_install python3-venv
  fi
  if [ ! -x "$sse_venv/bin/pip" ]; then
    python3 -m venv "$sse_venv"
  fi
  echo "installing schemathesis $sse_schemathesis_version into $sse_venv"
  "$sse_venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$sse_schemathesis_version"
  "$sse_venv/bin/schemathesis" --version
fi
unset sse_schemathesis_version sse_venv
