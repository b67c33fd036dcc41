# Node tools the tests drive (tests/node/package.json: playwright-core, eventsource, newman), from
# npm, at the versions package-lock.json pins. Uses the machine's node and npm (CI has Node 20).
# Sourced by .ci/install-tools: no `cd`, no `exit`.
if ! command -v npm >/dev/null; then
  echo "npm is missing: install Node.js 20 or later with npm" >&2
  return 1
fi
if [ ! -d tests/node/node_modules ] || [ tests/node/package-lock.json -nt tests/node/node_modules ] \
  || [ tests/node/package.json -nt tests/node/node_modules ]; then
  if [ -f tests/node/package-lock.json ]; then
    echo "installing tests/node (npm ci)"
    (cd tests/node && npm ci --no-audit --no-fund --loglevel=error)
  else
    # No lock yet (a dependency was just added by hand): resolve and write one to commit.
    echo "installing tests/node (npm install: no package-lock.json)"
    (cd tests/node && npm install --no-audit --no-fund --loglevel=error)
  fi
  # npm recreates node_modules; mark it newer than the lock for the next run's check.
  touch tests/node/node_modules
fi
