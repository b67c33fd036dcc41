//! What a newcomer meets in the first hour, from the README and docs: the messages that tell what
//! went wrong (a taken port, an unreachable Redis, a token signed with another secret), auth
//! failures in the log, `sse-token`'s command line, the Makefile's `.env`, secret and Compose
//! checks, and the safe defaults: production refuses a weak secret, `make run` listens on loopback
//! only. (`/metrics` and the operator listener are in tests/edge.rs.)

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::external::repo;
use common::*;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sse_token(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sse-token"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("JWT_SECRET", SECRET)
        .output()
        .expect("run sse-token")
}

#[test]
fn sse_token_help_goes_to_stdout() {
    let dir = TempDir::new();
    for flag in ["--help", "-h"] {
        let out = sse_token(&dir.path, &[flag]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(
            stdout.starts_with("usage: sse-token <app> <user>"),
            "{stdout}"
        );
        assert!(stdout.contains("--ttl"), "{stdout}");
        assert_eq!(stderr, "");
    }
}

#[test]
fn sse_token_refuses_what_the_gateway_would() {
    let dir = TempDir::new();
    for (args, why) in [
        (
            &["shop", "alice", "--role", "admin"][..],
            "unknown role \"admin\"",
        ),
        (&["shop", "alice", "--role"][..], "--role takes"),
        (&["shop", "al:ice"][..], "user \"al:ice\" is not a safe id"),
        (
            &["sh op", "alice"][..],
            "application \"sh op\" is not a safe id",
        ),
        (&["shop", ""][..], "is not a safe id"),
    ] {
        let out = sse_token(&dir.path, args);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}: no token");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }

    let out = sse_token(
        &dir.path,
        &["shop", "alice", "--role", "publisher", "--ttl", "60"],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let claims = jsonwebtoken::decode::<Value>(
        stdout.trim(),
        &DecodingKey::from_secret(SECRET.as_bytes()),
        &Validation::new(Algorithm::HS256),
    )
    .expect("a valid token")
    .claims;
    assert_eq!(
        (&claims["iss"], &claims["sub"]),
        (&json!("shop"), &json!("alice"))
    );
    assert_eq!(claims["sse_role"], json!(["publisher"]));
    assert_eq!(
        claims["exp"]
            .as_u64()
            .zip(claims["iat"].as_u64())
            .map(|(e, i)| e - i),
        Some(60)
    );
}

#[tokio::test]
async fn a_taken_port_suggests_app_port() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let mut gw = Gateway::builder().process().port(port).spawn();
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(1));
    let logs = gw.logs();
    assert!(
        logs.contains(&format!("cannot listen on 127.0.0.1:{port}"))
            && logs.contains("set APP_PORT to another port"),
        "{logs}"
    );
}

/// `JWT_SECRET` of .env.example: public, refused in production.
fn example_secret() -> String {
    std::fs::read_to_string(repo().join(".env.example"))
        .expect(".env.example")
        .lines()
        .find_map(|l| l.strip_prefix("JWT_SECRET="))
        .expect("JWT_SECRET in .env.example")
        .to_string()
}

/// Starts the gateway in production mode with `secret`; asserts it refuses to start, with exit
/// status 78 and one line that names JWT_SECRET and says how to make one.
fn assert_production_refuses(secret: &str, why: &str) {
    let mut gw = Gateway::builder()
        .process()
        .env("APP_MODE", "production")
        .env("JWT_SECRET", secret)
        .spawn();
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(78), "{why}");
    let logs = gw.logs();
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(lines.len(), 1, "{why}: one line: {logs}");
    assert!(
        lines[0].contains("JWT_SECRET") && lines[0].contains("openssl rand -hex 32"),
        "{why}: {logs}"
    );
    assert!(lines[0].contains(why), "{why}: {logs}");
    assert!(
        !logs.contains(secret),
        "{why}: the secret was printed: {logs}"
    );
}

#[test]
fn production_refuses_the_example_secret() {
    assert_production_refuses(&example_secret(), ".env.example's public placeholder");
}

#[test]
fn production_refuses_a_secret_under_32_bytes() {
    assert_production_refuses("0123456789abcdef0123456789abcde", "31 bytes long, under 32");
}

#[tokio::test]
async fn debug_mode_warns_about_a_weak_secret_and_starts() {
    let gw = Gateway::builder()
        .process()
        .env("APP_MODE", "debug")
        .env("JWT_SECRET", &example_secret())
        .start()
        .await;
    let logs = gw.logs();
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("openssl rand -hex 32"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning: {logs}");
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("production refuses it"),
        "{logs}"
    );
    assert!(!logs.contains(&example_secret()), "{logs}");
}

/// `make run` is `cargo run` of the gateway in the directory of the `.env` make created: the same
/// binary, in such a directory, with nothing else set, listens on loopback only, its operator
/// listener too. (Only the port is set, so that the test does not need 8080 free.)
#[tokio::test]
async fn make_run_listens_on_loopback_only() {
    let dir = make_dir();
    assert!(make(&dir.path, &["-s", "env"], 0).status.success());
    let out = Command::new("make")
        .args(["-n", "-s", "run"])
        .current_dir(&dir.path)
        .output()
        .expect("make -n run");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stdout.trim(),
        "cargo run --bin sse-gateway",
        "nothing else set"
    );
    let env = std::fs::read_to_string(dir.path.join(".env")).expect(".env");
    for var in ["APP_HOST", "OPERATOR_ADDR"] {
        assert!(
            !env.lines().any(|l| l.starts_with(&format!("{var}="))),
            ".env sets {var}: {env}"
        );
    }

    let port = free_port();
    let log = dir.path.join("gateway.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .current_dir(&dir.path)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("APP_PORT", port.to_string())
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(std::fs::File::create(dir.path.join("gateway.err")).expect("log"))
        .spawn()
        .expect("spawn gateway");
    let read = || {
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        let err = std::fs::read_to_string(dir.path.join("gateway.err")).unwrap_or_default();
        format!("{out}{err}")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let exited = loop {
        if read().contains("ready to accept connections") {
            break None;
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not start: {}",
            read()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let logs = read();
    let _ = child.kill();
    let _ = child.wait();
    let operator = "127.0.0.1:9180";
    if let Some(status) = exited {
        // The default operator port is taken on this machine: the refusal names the default.
        assert_eq!(status.code(), Some(1), "{logs}");
        assert!(
            logs.contains(&format!(
                "cannot listen on {operator} (the operator listener)"
            )) && logs.contains("OPERATOR_ADDR"),
            "{logs}"
        );
        return;
    }
    let line = |what: &str| {
        logs.lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no {what:?} line: {logs}"))
            .to_string()
    };
    assert!(
        line("ready to accept connections").contains(&format!("127.0.0.1:{port}")),
        "{logs}"
    );
    assert!(line("operator listener").contains(operator), "{logs}");
    assert!(
        !logs.contains("openssl"),
        "no weak-secret warning with make's secret: {logs}"
    );
}

/// The gateway's JSON log lines (production mode) with this message.
fn json_lines(logs: &str, message: &str) -> Vec<Value> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == message)
        .collect()
}

#[tokio::test]
async fn an_unreachable_redis_is_named_with_a_hint() {
    let port = free_port();
    let gw = Gateway::builder()
        .process()
        .env("APP_MODE", "production")
        .env("REDIS_URL", &format!("redis://127.0.0.1:{port}"))
        .spawn();
    eventually(
        Duration::from_secs(15),
        "a Redis connection error",
        || async { !json_lines(&gw.logs(), "Redis connection error").is_empty() },
    )
    .await;
    for line in json_lines(&gw.logs(), "Redis connection error") {
        assert_eq!(line["server"], format!("127.0.0.1:{port}"), "{line}");
        assert!(
            line["hint"]
                .as_str()
                .is_some_and(|h| h.contains("REDIS_URL")),
            "{line}"
        );
    }
}

/// Sleeps into the next wall-clock second (plus a margin), where the auth log's one-second window
/// starts afresh.
async fn next_second() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .subsec_millis();
    tokio::time::sleep(Duration::from_millis(u64::from(1050 - now))).await;
}

#[tokio::test]
async fn auth_failures_are_logged_at_info_a_line_a_second() {
    let gw = Gateway::builder()
        .process()
        .env("APP_MODE", "production")
        .start()
        .await;
    let forged = sign_with(
        Algorithm::HS256,
        &json!({"iss": "shop", "sub": "alice", "exp": now() + 60}),
        "another-secret",
    );
    next_second().await;
    for _ in 0..5 {
        let r = http()
            .get(gw.url("/connections/shop/alice"))
            .bearer_auth(&forged)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 401);
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["error"], "bad_signature");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("another secret")),
            "{body}"
        );
    }
    next_second().await;
    let r = http().get(gw.url("/sse")).send().await.expect("request");
    assert_eq!(r.status(), 401);

    let mut lines = Vec::new();
    for _ in 0..50 {
        lines = json_lines(&gw.logs(), "authentication failed");
        if lines.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lines.len(), 2, "one line per second:\n{}", gw.logs());
    assert_eq!(
        (
            &lines[0]["level"],
            &lines[0]["reason"],
            &lines[0]["left_out"]
        ),
        (&json!("INFO"), &json!("bad_signature"), &json!(0))
    );
    assert!(
        lines[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("another secret")),
        "{}",
        lines[0]
    );
    assert_eq!(
        (
            &lines[1]["reason"],
            &lines[1]["path"],
            &lines[1]["left_out"]
        ),
        (&json!("missing_token"), &json!("/sse"), &json!(4)),
        "the second line counts the four left out"
    );
    assert_eq!(
        gw.metric("sse_auth_failures_total{reason=\"bad_signature\"}")
            .await,
        Some(5.0),
        "every failure is counted"
    );
}

// ---------------------------------------------------------------------------------------------
// The Makefile, in a copy of the files it needs (never the developer's own .env).

fn make_dir() -> TempDir {
    let dir = TempDir::new();
    for f in ["Makefile", ".env.example"] {
        std::fs::copy(repo().join(f), dir.path.join(f)).expect("copy");
    }
    dir
}

/// `make` in `dir`, with a `docker` on PATH that answers `compose version` with `compose_status`.
fn make(dir: &Path, args: &[&str], compose_status: u8) -> Output {
    let bin = dir.join("fake-bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    let docker = bin.join("docker");
    std::fs::write(&docker, format!("#!/bin/sh\nexit {compose_status}\n")).expect("write");
    Command::new("chmod")
        .args(["+x"])
        .arg(&docker)
        .status()
        .expect("chmod");
    Command::new("make")
        .args(args)
        .current_dir(dir)
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .output()
        .expect("run make")
}

#[test]
fn make_creates_env_with_a_random_secret_and_up_refuses_the_example_one() {
    let dir = make_dir();
    let out = make(&dir.path, &["-s", "env"], 0);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("random JWT_SECRET"), "says so: {stderr}");
    let env = std::fs::read_to_string(dir.path.join(".env")).expect(".env");
    let secret = env
        .lines()
        .find_map(|l| l.strip_prefix("JWT_SECRET="))
        .expect("JWT_SECRET");
    assert_eq!(secret.len(), 64, "{secret}");
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()), "{secret}");
    // Everything else as in the example.
    let example = std::fs::read_to_string(dir.path.join(".env.example")).expect("example");
    assert_eq!(env.lines().count(), example.lines().count());

    // A second directory gets another secret.
    let other = make_dir();
    assert!(make(&other.path, &["-s", "env"], 0).status.success());
    let other_env = std::fs::read_to_string(other.path.join(".env")).expect(".env");
    assert!(!other_env.contains(secret));

    // An .env with the example's placeholder: the stack does not start.
    std::fs::copy(dir.path.join(".env.example"), dir.path.join(".env")).expect("copy");
    for target in ["up", "build"] {
        let out = make(&dir.path, &["-s", target], 0);
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "{target}");
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("JWT_SECRET"))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{target}: one line naming the secret: {stderr}"
        );
    }
}

#[test]
fn docker_targets_name_compose_v2_when_it_is_missing() {
    let dir = make_dir();
    for target in ["build", "up", "down", "logs"] {
        let out = make(&dir.path, &["-s", target], 1);
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{target}");
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.contains("Docker Compose v2") && first.contains("docker compose"),
            "{target}: {stderr}"
        );
        assert_eq!(stdout, "", "{target}: nothing ran");
    }
    assert!(
        !dir.path.join(".env").exists(),
        "checked before creating .env"
    );
}

#[test]
fn make_token_passes_ttl() {
    let out = Command::new("make")
        .args(["-n", "-s", "token", "APP=shop", "USER_ID=alice", "TTL=60"])
        .current_dir(make_dir().path.clone())
        .output()
        .expect("make -n");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("--bin sse-token -- shop alice") && stdout.contains("--ttl 60"),
        "{stdout}"
    );
}
