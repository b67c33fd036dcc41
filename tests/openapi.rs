//! `docs/openapi.yaml` against the real gateway.
//!
//! - schemathesis generates requests from the spec (its examples, boundary values, random and
//!   deliberately invalid data) and checks every answer: the status is documented, the content
//!   type and body conform, documented headers conform, undocumented methods get a 405 with the
//!   documented `Allow`, invalid data is refused, valid data accepted, a missing token refused.
//! - A cheap check, without any YAML crate, that the spec's paths and methods are exactly the
//!   routes of the router's table (`sse_gateway::http::ROUTES`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use common::external::{repo, run_bounded, tool};
use common::{Gateway, SseClient, TempDir, now, sign, user_token};

const APP: &str = "shop";
/// The longest one schemathesis run may take (each takes about 15 s).
const RUN_LIMIT: Duration = Duration::from_secs(300);

fn spec_path() -> PathBuf {
    repo().join("docs/openapi.yaml")
}

/// schemathesis from the virtualenv `.ci/tools/python.sh` makes, else from PATH.
fn schemathesis() -> PathBuf {
    let venv = std::env::var_os("SSE_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/sse-test-venv"));
    let bin = venv.join("bin/schemathesis");
    if bin.is_file() {
        bin
    } else {
        tool("schemathesis")
    }
}

/// Runs `schemathesis run <spec> --url <base> <args>`, bounded by [`RUN_LIMIT`].
async fn run_schemathesis(dir: &Path, base: &str, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(schemathesis());
    cmd.arg("run")
        .arg(spec_path())
        .args(["--url", base])
        // `/` answers 301: the redirect itself is what the spec documents, so do not follow it.
        .args(["--max-redirects", "0"])
        .args(["--checks", "all"])
        .args(["--max-examples", "50"])
        .args(["--request-timeout", "10"])
        .args(["--generation-database", "none", "--no-color"])
        // A loaded CI machine must not turn slow data generation into a failure.
        .args(["--suppress-health-check", "too_slow"])
        .args(args);
    run_bounded(cmd, dir, RUN_LIMIT).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_agrees_with_the_spec() {
    let gw = Gateway::embedded().await;
    let base = format!("http://127.0.0.1:{}", gw.port);
    // A live stream, so that the spec's examples (`shop`, `alice`) list something: the 200 of
    // both /connections routes is checked, not only their 204.
    let stream = SseClient::open(
        gw.sse()
            .bearer_auth(user_token(APP, "alice"))
            .header("user-agent", "sse-gateway-tests/openapi"),
    )
    .await;
    assert_eq!(stream.status, 200);
    // One token that may do everything the spec describes in the examples' application.
    let token = sign(&json!({
        "iss": APP, "sub": "schemathesis", "exp": now() + 3600,
        "sse_role": ["publisher", "operator"],
    }));
    let auth = format!("Authorization: Bearer {token}");
    let dir = TempDir::new();

    // Every operation but GET /sse, with the valid token. A 200 of GET /sse is an endless
    // `text/event-stream`: schemathesis would wait on its body until the request timeout and
    // report an error, so that one operation is excluded here and run below without a token.
    let (ok, output) = run_schemathesis(
        &dir.path,
        &base,
        &["--header", &auth, "--exclude-operation-id", "openStream"],
    )
    .await;
    assert!(
        ok,
        "schemathesis found the server disagreeing with docs/openapi.yaml:\n{output}\n\
         --- gateway log ---\n{}",
        gw.logs()
    );
    // "Selected: 19/20": every operation but the one excluded.
    let selected = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Selected: "))
        .and_then(|n| n.split_once('/'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
    assert!(
        matches!(selected, Some((a, b)) if a + 1 == b && a >= 10),
        "not every operation but GET /sse was tested ({selected:?}):\n{output}"
    );

    // GET /sse with no valid token: every answer is a (finite) 401, checked against the spec like
    // the rest. Its 200 (the stream and its event format) is covered by tests/postman.rs,
    // tests/delivery.rs and the others, with streams that end.
    let (ok, output) = run_schemathesis(
        &dir.path,
        &base,
        &["--include-operation-id", "openStream", "--warnings", "off"],
    )
    .await;
    assert!(
        ok,
        "schemathesis found GET /sse disagreeing with docs/openapi.yaml:\n{output}\n\
         --- gateway log ---\n{}",
        gw.logs()
    );
    drop(stream);
}

/// Methods per path, from the router's own table.
fn router_routes() -> BTreeMap<String, BTreeSet<String>> {
    let mut routes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for route in sse_gateway::http::ROUTES {
        assert!(
            !route.methods.is_empty(),
            "no methods for {}",
            route.pattern
        );
        routes
            .entry(route.pattern.to_string())
            .or_default()
            .extend(route.methods.iter().map(|m| m.as_str().to_string()));
    }
    routes
}

/// Methods per path in `docs/openapi.yaml`: the keys under `paths:` (two spaces in) and their
/// operations (four spaces in).
fn spec_routes() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(spec_path()).expect("docs/openapi.yaml");
    let mut routes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut in_paths = false;
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        if indent == 0 {
            in_paths = line.trim_end() == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        let key = line.trim().strip_suffix(':');
        match (indent, key) {
            (2, Some(path)) => {
                let path = path.trim_matches(|c| c == '"' || c == '\'').to_string();
                routes.entry(path.clone()).or_default();
                current = Some(path);
            }
            (4, Some(op)) if op != "parameters" => {
                let path = current.clone().expect("an operation outside a path");
                routes
                    .get_mut(&path)
                    .unwrap()
                    .insert(op.to_ascii_uppercase());
            }
            _ => {}
        }
    }
    routes
}

#[test]
fn the_spec_lists_exactly_the_routes_of_the_router() {
    let router = router_routes();
    let spec = spec_routes();
    assert!(router.len() >= 7, "router table looks wrong: {router:?}");
    for (path, methods) in &router {
        let documented = spec
            .get(path)
            .unwrap_or_else(|| panic!("{path} is a route but not in docs/openapi.yaml"));
        // Every route answers OPTIONS (CORS preflight), which the spec documents too.
        let mut expected = methods.clone();
        expected.insert("OPTIONS".into());
        assert_eq!(
            documented, &expected,
            "methods of {path}: docs/openapi.yaml vs http::ROUTES"
        );
    }
    for path in spec.keys() {
        assert!(
            router.contains_key(path),
            "docs/openapi.yaml documents {path}, which is not a route"
        );
    }
}
