//! Helpers for tests that drive external programs (nginx, newman, schemathesis, Chromium, Node).
//! `.ci/install-tools` (run by `make test`) installs them; a missing one fails the test, loudly.

use std::path::PathBuf;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Finds an executable on PATH or in `tests/node/node_modules/.bin`; panics with the fix otherwise.
pub fn tool(name: &str) -> PathBuf {
    let node_bin = repo().join("tests/node/node_modules/.bin").join(name);
    if node_bin.exists() {
        return node_bin;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{name}` is not installed: run `make tools` (or .ci/install-tools)");
}
