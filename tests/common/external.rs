//! Helpers for tests that drive external programs (nginx, newman, schemathesis, Chromium, Node).
