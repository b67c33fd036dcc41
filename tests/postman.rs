//! The Postman collection (`postman/`), run headless by newman against a real gateway on a real
//! Redis, with one stream kept open so that the *Connections* requests list a real entry.
//!
//! `GET /sse` never ends on its own, so the collection's folder *Manual only* (streams with
//! hour-long tokens, for trying by hand) is left out of the run: every other top-level folder is
//! named with `--folder`. The 200 path of `/sse` is still run, bounded: the *Streams* folder opens
//! streams with a token that expires two seconds later, and the gateway ends a stream at its
//! token's expiry (with a `token_expired` event), so each response is complete.
//!
//! *Manual only* also holds the 413 `body_too_large` example: the gateway answers it without
//! reading the 4 MiB body and closes the connection, so newman sometimes gets EPIPE instead.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use common::external::{repo, run_bounded, tool};
use common::{Gateway, RedisServer, SECRET, SseClient, TempDir, eventually, http, operator_token};

const APP: &str = "shop";
const USER: &str = "alice";
/// The folder of endless streams (and other requests for people); never run automatically.
const MANUAL_FOLDER: &str = "Manual only";
/// Longest a whole newman run may take (it takes about 25 s).
const RUN_LIMIT: Duration = Duration::from_secs(240);

fn collection_path() -> PathBuf {
    repo().join("postman/sse-gateway.postman_collection.json")
}

fn environment_path() -> PathBuf {
    repo().join("postman/local.postman_environment.json")
}

fn load(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The top-level folders of the collection, in order.
fn folders(collection: &Value) -> Vec<String> {
    collection["item"]
        .as_array()
        .expect("collection items")
        .iter()
        .map(|f| {
            assert!(f["item"].is_array(), "top-level items must be folders: {f}");
            f["name"].as_str().expect("folder name").to_string()
        })
        .collect()
}

/// Every request of a folder, nested folders included, with its path of names.
fn requests<'a>(item: &'a Value, path: &str, out: &mut Vec<(String, &'a Value)>) {
    let name = item["name"].as_str().unwrap_or_default();
    let here = if path.is_empty() {
        name.to_string()
    } else {
        format!("{path} / {name}")
    };
    match item["item"].as_array() {
        Some(children) => children.iter().for_each(|c| requests(c, &here, out)),
        None => out.push((here, item)),
    }
}

fn script(item: &Value, listen: &str) -> String {
    item["event"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["listen"] == listen)
        .flat_map(|e| e["script"]["exec"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The collection's structure, checked without running it: what the run below relies on.
#[test]
fn collection_is_complete_and_its_endless_streams_are_fenced_off() {
    let collection = load(&collection_path());
    assert_eq!(
        collection["info"]["schema"],
        "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"
    );
    let names = folders(&collection);
    assert!(names.iter().any(|n| n == MANUAL_FOLDER), "{names:?}");
    // The tokens come from the collection's pre-request script, so nobody pastes one.
    let pre = script(&collection, "prerequest");
    for token in [
        "user_token",
        "publisher_token",
        "operator_token",
        "stream_token",
    ] {
        assert!(pre.contains(&format!("{token}:")), "no {token} minted");
    }

    let mut routes_seen = std::collections::BTreeSet::new();
    for folder in collection["item"].as_array().unwrap() {
        let mut all = Vec::new();
        requests(folder, "", &mut all);
        let manual = folder["name"] == MANUAL_FOLDER;
        for (name, item) in all {
            let tests = script(item, "test");
            assert!(
                tests.contains("pm.test("),
                "{name}: every request needs a test script"
            );
            let request = &item["request"];
            let method = request["method"].as_str().unwrap_or_default();
            let path: Vec<&str> = request["url"]["path"]
                .as_array()
                .unwrap_or_else(|| panic!("{name}: url.path"))
                .iter()
                .filter_map(Value::as_str)
                .collect();
            let raw = request["url"]["raw"].as_str().unwrap_or_default();
            // The public port, or the operator listener (metrics, health and readiness only).
            let host = request["url"]["host"][0].as_str().unwrap_or_default();
            assert!(
                host == "{{base_url}}"
                    || host == "{{operator_url}}"
                        && ["metrics", "health", "ready"].contains(&path.join("/").as_str()),
                "{name}: url.host {host:?}"
            );
            assert!(
                raw.starts_with(&format!("{host}/{}", path.join("/"))),
                "{name}: url.raw {raw:?} disagrees with url.path {path:?}"
            );
            // /metrics names every application: the public port answers 404.
            if host == "{{base_url}}" && path == ["metrics"] {
                assert!(
                    tests.contains("have.status(404)"),
                    "{name}: /metrics on the public port must be a 404"
                );
            }
            routes_seen.insert(format!("{method} /{}", path.join("/")));
            // An hour-long token on /sse means a stream that does not end: manual folder only.
            let bearer = request["auth"]["bearer"][0]["value"]
                .as_str()
                .unwrap_or_default();
            if method == "GET" && path == ["sse"] && !manual {
                let query_token = request["url"]["query"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|q| q["value"] == "{{user_token}}");
                assert!(
                    bearer != "{{user_token}}" && (!query_token || !bearer.is_empty()),
                    "{name}: an endless stream outside {MANUAL_FOLDER:?}"
                );
            }
        }
    }
    for route in [
        "GET /",
        "HEAD /",
        "GET /health",
        "HEAD /health",
        "GET /ready",
        "GET /metrics",
        "GET /sse",
        "POST /publish",
        "GET /connections/{{app}}",
        "GET /connections/{{app}}/{{user}}",
        "OPTIONS /sse",
    ] {
        assert!(routes_seen.contains(route), "no request for {route}");
    }

    let env = load(&environment_path());
    let keys: Vec<&str> = env["values"]
        .as_array()
        .expect("environment values")
        .iter()
        .filter_map(|v| v["key"].as_str())
        .collect();
    for key in [
        "base_url",
        "operator_url",
        "jwt_secret",
        "app",
        "user",
        "other_user",
        "other_app",
    ] {
        assert!(keys.contains(&key), "environment lacks {key}");
    }
}

/// Runs newman with `args` appended, bounded by [`RUN_LIMIT`]; returns (success, output).
async fn newman(dir: &Path, args: &[String]) -> (bool, String) {
    let mut cmd = Command::new(tool("newman"));
    cmd.arg("run")
        .arg(collection_path())
        .arg("--environment")
        .arg(environment_path())
        .args(args)
        .args(["--timeout-request", "20000"])
        .args(["--timeout", &(RUN_LIMIT.as_millis() - 10_000).to_string()])
        .args(["--reporters", "cli", "--color", "off", "--disable-unicode"]);
    run_bounded(cmd, dir, RUN_LIMIT).await
}

#[tokio::test(flavor = "multi_thread")]
async fn collection_passes_under_newman() {
    let collection = load(&collection_path());
    let redis = RedisServer::start();
    let gw = Gateway::builder()
        .redis(&redis)
        .env("PING_INTERVAL", "1")
        .start()
        .await;

    // A stream for the *Connections* folder to find, open for the whole run.
    let stream = SseClient::open(
        gw.sse()
            .bearer_auth(common::user_token(APP, USER))
            .header("user-agent", "sse-gateway-tests/postman"),
    )
    .await;
    assert_eq!(stream.status, 200, "{}", gw.logs());
    let conn_id = stream.connection_id();
    let listing = gw.url(&format!("/connections/{APP}/{USER}"));
    eventually(Duration::from_secs(10), "the stream is registered", || {
        let listing = listing.clone();
        let conn_id = conn_id.clone();
        async move {
            match http()
                .get(listing)
                .bearer_auth(operator_token(APP))
                .send()
                .await
            {
                Ok(r) if r.status() == 200 => r.text().await.is_ok_and(|t| t.contains(&conn_id)),
                _ => false,
            }
        }
    })
    .await;

    let mut args: Vec<String> = Vec::new();
    for (k, v) in [
        ("base_url", format!("http://127.0.0.1:{}", gw.port)),
        (
            "operator_url",
            format!("http://127.0.0.1:{}", gw.operator_port),
        ),
        ("jwt_secret", SECRET.to_string()),
        ("app", APP.to_string()),
        ("user", USER.to_string()),
        ("expect_connection_id", conn_id.clone()),
    ] {
        args.push("--env-var".into());
        args.push(format!("{k}={v}"));
    }
    let automated: Vec<String> = folders(&collection)
        .into_iter()
        .filter(|f| f != MANUAL_FOLDER)
        .collect();
    assert!(automated.len() >= 5, "{automated:?}");
    for f in &automated {
        args.push("--folder".into());
        args.push(f.clone());
    }

    let dir = TempDir::new();
    let (ok, output) = newman(&dir.path, &args).await;
    assert!(
        ok,
        "newman failed:\n{output}\n--- gateway log (last 4000 bytes) ---\n{}",
        tail(&gw.logs(), 4000)
    );
    // Every automated folder ran, and the bounded streams with it.
    for f in &automated {
        // newman's cli reporter heads each folder with "Folder <name>" under --disable-unicode.
        assert!(
            output.contains(&format!("Folder {f}\n")),
            "folder {f:?} did not run:\n{output}"
        );
    }
    assert!(
        output.contains("ends with token_expired"),
        "the stream checks did not run:\n{output}"
    );
    drop(stream);
}

fn tail(text: &str, bytes: usize) -> &str {
    let mut start = text.len().saturating_sub(bytes);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}
