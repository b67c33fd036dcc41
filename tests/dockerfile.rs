//! docker/Dockerfile and .dockerignore, checked without a Docker engine: the Dockerfile passes
//! hadolint, its HEALTHCHECK command is run against a live gateway, and the build context keeps
//! secrets out but everything the build copies in. hadolint comes from `.ci/tools/deploy.sh`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::deployment::*;
use common::external::{output_text, read, seconds};
use common::external::{repo, tool};
use common::*;

// ---------------------------------------------------------------------------------------------
// Dockerfile and .dockerignore.

#[test]
fn dockerfile_passes_hadolint() {
    let out = Command::new(tool("hadolint"))
        .args(["--no-color", "--failure-threshold", "info"])
        .arg(repo().join("docker/Dockerfile"))
        .output()
        .expect("run hadolint");
    assert!(out.status.success(), "hadolint:\n{}", output_text(&out));
}

#[test]
fn dockerfile_builds_both_binaries_and_runs_unprivileged() {
    let all = dockerfile();
    let froms: Vec<&String> = all
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    // The base images are build arguments (a private mirror, local stand-ins) whose defaults are
    // the official images.
    let args: HashMap<String, String> = all
        .iter()
        .take_while(|(k, _)| k != "FROM")
        .filter(|(k, _)| k == "ARG")
        .filter_map(|(_, v)| v.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let image = |from: &str| {
        let word = from.split_whitespace().next().expect("image");
        let arg = word
            .strip_prefix("${")
            .and_then(|w| w.strip_suffix('}'))
            .unwrap_or_else(|| panic!("FROM {word}: a build argument, for registries and mirrors"));
        args.get(arg)
            .unwrap_or_else(|| panic!("ARG {arg}=<default> before the first FROM"))
            .clone()
    };
    assert_eq!(
        image(froms[0]),
        args["RUST_IMAGE"],
        "the builder is RUST_IMAGE"
    );
    let builder = image(froms[0]);
    assert!(
        builder.starts_with("rust:1.9") && builder.ends_with("-bookworm"),
        "builder image {builder}: a pinned 1.9x Rust on bookworm (the runtime's glibc)"
    );
    assert_eq!(image(froms[1]), "debian:bookworm-slim");
    assert_eq!(froms[1].split_whitespace().next(), Some("${RUNTIME_IMAGE}"));

    // Cache-friendly: the dependency build runs before the sources are copied in; every workspace
    // member's manifest is there for it (cargo loads the whole workspace).
    let first_build = all
        .iter()
        .position(|(k, v)| k == "RUN" && v.contains("cargo build --release --locked"))
        .expect("a release build");
    let copy_src = all
        .iter()
        .position(|(k, v)| k == "COPY" && v.starts_with("src "))
        .expect("COPY src");
    assert!(
        first_build < copy_src,
        "dependencies are built after the sources are copied"
    );
    let manifest = read("Cargo.toml");
    let members = manifest
        .split_once("members = [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| list)
        .expect("workspace members");
    let copies: Vec<&String> = all[..first_build]
        .iter()
        .filter(|(k, _)| k == "COPY")
        .map(|(_, v)| v)
        .collect();
    for member in members.split(',').map(|m| m.trim().trim_matches('"')) {
        let wanted = match member {
            "" => continue,
            "." => "Cargo.toml".to_string(),
            m => format!("{m}/Cargo.toml"),
        };
        assert!(
            copies
                .iter()
                .any(|c| c.split_whitespace().any(|w| w == wanted)),
            "workspace member {member:?}: COPY {wanted} before the dependency build"
        );
    }
    assert!(copies.iter().any(|c| c.contains("Cargo.lock")));

    // Both binaries are built and land on the runtime's PATH; the entry point is the gateway.
    let last_build = &all
        .iter()
        .rfind(|(k, v)| k == "RUN" && v.contains("cargo build"))
        .expect("build")
        .1;
    assert!(
        last_build.contains("--bins") && last_build.contains("--package sse-gateway"),
        "{last_build}"
    );
    let stage = final_stage();
    let copied = stage
        .iter()
        .find(|(k, v)| k == "COPY" && v.starts_with("--from=builder"))
        .map(|(_, v)| v.clone())
        .expect("COPY --from=builder");
    for bin in ["sse-gateway", "sse-token"] {
        assert!(copied.contains(bin), "{copied}");
    }
    assert!(copied.trim_end().ends_with("/usr/local/bin/"), "{copied}");
    let entry = stage
        .iter()
        .find(|(k, _)| k == "ENTRYPOINT")
        .map(|(_, v)| serde_json::from_str::<Vec<String>>(v).expect("exec-form ENTRYPOINT"))
        .expect("ENTRYPOINT");
    assert_eq!(entry, ["/usr/local/bin/sse-gateway"]);

    // Production defaults, and no secret baked in.
    let env: String = stage
        .iter()
        .filter(|(k, _)| k == "ENV")
        .map(|(_, v)| format!("{v} "))
        .collect();
    for setting in ["APP_MODE=production", "APP_PORT=8080"] {
        assert!(
            env.split_whitespace().any(|w| w == setting),
            "ENV {setting}: {env}"
        );
    }
    assert!(!env.contains("JWT_SECRET"), "no secret in the image: {env}");

    // Unprivileged from the USER line on, and nothing runs after it as root.
    let user_at = stage
        .iter()
        .rposition(|(k, _)| k == "USER")
        .expect("USER in the runtime stage");
    let user = stage[user_at].1.split(':').next().expect("user").trim();
    assert!(!["root", "0", ""].contains(&user), "USER {user}");
    assert!(
        stage[user_at..].iter().all(|(k, _)| k != "RUN"),
        "RUN after USER: the stage's last instructions run unprivileged"
    );
}

/// The HEALTHCHECK of the image: its options and its command (exec form).
fn healthcheck() -> (String, Vec<String>) {
    let (_, v) = final_stage()
        .into_iter()
        .find(|(k, _)| k == "HEALTHCHECK")
        .expect("HEALTHCHECK in the runtime stage");
    let (options, cmd) = v.split_once("CMD ").expect("HEALTHCHECK ... CMD [...]");
    let argv: Vec<String> = serde_json::from_str(cmd.trim()).expect("exec-form HEALTHCHECK CMD");
    (options.trim().to_string(), argv)
}

/// Runs the HEALTHCHECK command as Docker would (environment of the container: APP_PORT), with the
/// instruction's own timeout. True when it reports healthy.
fn run_healthcheck(argv: &[String], app_port: u16, timeout: Duration) -> bool {
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("APP_PORT", app_port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run the HEALTHCHECK command");
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.success();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A server that accepts and answers every request with `status_line`.
fn canned_server(status_line: &'static str) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        // Serves the few connections of the test, then the thread ends with the process.
        for stream in listener.incoming().take(4).flatten() {
            let mut stream = stream;
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 1024];
            let _ = std::io::Read::read(&mut stream, &mut buf);
            let reply = format!("{status_line}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = std::io::Write::write_all(&mut stream, reply.as_bytes());
        }
    });
    port
}

#[tokio::test]
async fn dockerfile_healthcheck_command_probes_the_gateway() {
    let (options, argv) = healthcheck();
    let timeout = options
        .split_whitespace()
        .find_map(|o| o.strip_prefix("--timeout="))
        .map(seconds)
        .expect("HEALTHCHECK --timeout");
    assert!(options.contains("--interval="), "{options}");
    // It may only use what debian:bookworm-slim has: bash (and its /dev/tcp), coreutils.
    assert_eq!(argv[0], "bash", "{argv:?}");
    let timeout = Duration::from_secs_f64(timeout);

    let gw = Gateway::embedded().await;
    let port = gw.port;
    let healthy = tokio::task::spawn_blocking(move || run_healthcheck(&argv, port, timeout));
    assert!(
        healthy.await.expect("join"),
        "healthy gateway reported unhealthy"
    );

    let (_, argv) = healthcheck();
    let closed = free_port();
    let failing = canned_server("HTTP/1.1 503 Service Unavailable");
    let results = tokio::task::spawn_blocking(move || {
        (
            run_healthcheck(&argv, closed, timeout),
            run_healthcheck(&argv, failing, timeout),
        )
    })
    .await
    .expect("join");
    assert_eq!(
        results,
        (false, false),
        "(nothing listening, a 503) reported healthy"
    );
}

/// The build context as Docker filters it with .dockerignore (moby's patternmatcher, for the
/// patterns this file uses): paths relative to the root; `*` and `?` within one segment, `**` any
/// number of segments (zero included); a match on a directory excludes all below it; `!`
/// re-includes; the last matching pattern wins.
fn docker_ignored(patterns: &[String], path: &str) -> bool {
    fn glob(p: &[char], s: &[char]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some(('*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
            Some(('?', rest)) => !s.is_empty() && glob(rest, &s[1..]),
            Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
        }
    }
    fn segments(p: &[&str], s: &[&str]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((&"**", rest)) => (0..=s.len()).any(|i| segments(rest, &s[i..])),
            Some((first, rest)) => {
                let pc: Vec<char> = first.chars().collect();
                !s.is_empty()
                    && glob(&pc, &s[0].chars().collect::<Vec<_>>())
                    && segments(rest, &s[1..])
            }
        }
    }
    let parts: Vec<&str> = path.split('/').collect();
    let mut ignored = false;
    for pattern in patterns {
        let (negate, pattern) = match pattern.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pattern.as_str()),
        };
        let pattern: Vec<&str> = pattern
            .trim_start_matches('/')
            .split('/')
            .filter(|s| !s.is_empty() && *s != ".")
            .collect();
        if (1..=parts.len()).any(|n| segments(&pattern, &parts[..n])) {
            ignored = !negate;
        }
    }
    ignored
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn dockerignore_keeps_secrets_out_and_the_build_inputs_in() {
    let patterns: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    for p in &patterns {
        assert!(
            !p.contains(['[', '\\']),
            "pattern {p:?}: extend docker_ignored() before using character classes or escapes"
        );
    }

    for path in [
        ".env",
        ".env.local",
        "docker/.env",
        "deploy/prod/.env.production",
        "tls/server.key",
        "tls/fullchain.pem",
        "target/release/sse-gateway",
        "bench/target/release/sse-bench",
        ".git/config",
        "tests/node/node_modules/eventsource/index.js",
    ] {
        assert!(
            docker_ignored(&patterns, path),
            "{path} would be sent to the builder"
        );
    }

    // Everything the Dockerfile copies from the context must be in it.
    let mut inputs = Vec::new();
    for (k, v) in dockerfile() {
        if k != "COPY" || v.starts_with("--from") {
            continue;
        }
        let words: Vec<&str> = v.split_whitespace().collect();
        for source in &words[..words.len() - 1] {
            let path = repo().join(source);
            assert!(path.exists(), "COPY source {source} does not exist");
            if path.is_dir() {
                files_under(&path, &mut inputs);
            } else {
                inputs.push(path);
            }
        }
    }
    assert!(inputs.len() > 3, "{inputs:?}");
    for input in inputs {
        let rel = input
            .strip_prefix(repo())
            .expect("in repo")
            .to_string_lossy()
            .into_owned();
        assert!(
            !docker_ignored(&patterns, &rel),
            "{rel} is copied by the Dockerfile but ignored"
        );
    }
}
