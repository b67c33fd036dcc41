# tests/browser.rs drives the example page in headless Chromium (through playwright-core, installed
# by node.sh). Playwright's own browser download cannot be used here: Debian's chromium is.
# Sourced by .ci/install-tools, which provides apt_install.
if ! command -v chromium >/dev/null; then
  apt_install chromium
fi
