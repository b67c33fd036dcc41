//! The whole stack on a real Docker engine, from the repository's own files: `make build` builds
//! the gateway image with docker/Dockerfile (the project compiles inside the builder stage), `make
//! up` starts nginx, the gateway and Redis with docker/docker-compose.yml, and everything below goes
//! through nginx's published port on 127.0.0.1:
//!
//! - a stream gets an event published with `redis-cli` inside the Redis container, and one sent with
//!   `POST /publish`; `/connections` lists it; `/metrics` is not published (404 through nginx) but a
//!   container on the stack's operator network scrapes it from gateway:9180; `make logs` shows the
//!   gateway's JSON lines; every service reports `healthy`;
//! - scaled to three gateways, one publish reaches the user's streams on each replica;
//! - `make down` drains: every stream gets its `shutdown` event, and Redis keeps no registry entry.
//!
//! The engine is the one that answers (DOCKER_HOST), or a dockerd this test starts as root with a
//! data root of its own, and stops at the end. No image registry is reachable where the tests run,
//! so the base images are stand-ins built from Debian's packages by docker/local-images.sh (it says
//! so on stderr), passed as RUST_IMAGE, RUNTIME_IMAGE, REDIS_IMAGE and NGINX_IMAGE. They and the
//! build cache stay in the engine: the first run builds everything (11 minutes on two idle cores,
//! up to 20 on busy ones), later ones reuse it (80 seconds, plus 3 to 4 minutes after a change to
//! src/). Each command has its own time limit, so a hung build or engine fails the test.
//!
//! The test works on a copy of the repository (never the developer's own .env) under a Compose
//! project name of its own, so a stack started by hand is left alone.

mod common;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::external::{repo, run_bounded, spawn_lines};
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

/// The started engine's state: /var/lib/<STATE> (images, build cache) and /run/<STATE> (socket).
const STATE: &str = "sse-gateway-docker";
const PROJECT: &str = "sse-gateway-stack-test";
const COMPOSE_ARGS: [&str; 4] = ["-f", "docker/docker-compose.yml", "--env-file", ".env"];

/// Progress for whoever watches `make test`: straight to stderr, past the test harness's capture.
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "stack: {msg}");
}

fn quiet_success(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether an engine answers at `host` (None: the caller's DOCKER_HOST or Docker's default).
fn engine_answers(host: Option<&str>) -> bool {
    let mut cmd = Command::new("timeout");
    cmd.args(["20", "docker", "version", "--format", "{{.Server.Version}}"]);
    if let Some(host) = host {
        cmd.env("DOCKER_HOST", host);
    }
    quiet_success(&mut cmd)
}

/// The engine the stack runs on; stops dockerd on drop if this test started it.
struct Engine {
    /// DOCKER_HOST for every command, when not the caller's own.
    host: Option<String>,
    dockerd: Option<Child>,
    log: TempDir,
}

impl Engine {
    fn ensure() -> Engine {
        let mut engine = Engine {
            host: None,
            dockerd: None,
            log: TempDir::new(),
        };
        if engine_answers(None) {
            say("using the running Docker engine");
            return engine;
        }
        let run = format!("/run/{STATE}");
        let host = format!("unix://{run}/docker.sock");
        engine.host = Some(host.clone());
        if engine_answers(Some(&host)) {
            say(&format!("using the engine already listening at {host}"));
            return engine;
        }
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        assert!(
            root,
            "no Docker engine answers, and starting one (dockerd) needs root: run the tests as \
             root, or start an engine and set DOCKER_HOST"
        );
        let dockerd = ["/usr/sbin/dockerd", "/usr/bin/dockerd"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .expect("dockerd is not installed: `make tools` installs Debian's docker.io");
        std::fs::create_dir_all(&run).expect("mkdir /run/...");
        let out = std::fs::File::create(engine.log.path.join("dockerd.log")).expect("log");
        let err = out.try_clone().expect("log");
        say(&format!(
            "starting dockerd (data root /var/lib/{STATE}, socket {host})"
        ));
        // Niced, like every build it runs: the other tests on this machine keep their timing.
        let child = Command::new("nice")
            .args(["-n", "19", dockerd])
            .args(["--data-root", &format!("/var/lib/{STATE}")])
            .args(["--exec-root", &run])
            .args(["--pidfile", &format!("{run}/dockerd.pid")])
            .args(["-H", &host])
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .spawn()
            .expect("start dockerd");
        engine.dockerd = Some(child);
        let log = engine.log.path.join("dockerd.log");
        wait_for_start(
            engine.dockerd.as_mut().expect("spawned"),
            "dockerd",
            Duration::from_secs(90),
            || engine_answers(Some(&host)),
            || tail(&std::fs::read_to_string(&log).unwrap_or_default(), 40),
        );
        engine
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let Some(mut child) = self.dockerd.take() else {
            return;
        };
        // SIGTERM: dockerd stops its containers and its containerd; KILL the group if it hangs.
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                say("stopped the dockerd it started");
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status();
        let _ = child.wait();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Copies the repository into `to`, leaving out what .dockerignore keeps out of a build (and the
/// developer's .env): the stack is made from the committed files.
fn copy_repo(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read_dir").flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if [".git", "target", "node_modules", ".env", "results"].contains(&name.as_ref()) {
            continue;
        }
        let path = entry.path();
        let dest = to.join(&*name);
        let kind = entry.file_type().expect("file type");
        if kind.is_dir() {
            std::fs::create_dir_all(&dest).expect("mkdir");
            copy_repo(&path, &dest);
        } else if kind.is_file() {
            std::fs::copy(&path, &dest).unwrap_or_else(|e| panic!("copy {path:?}: {e}"));
        }
    }
}

/// The stack under test: a copy of the repository, the environment of every command in it, and
/// the published port. Dropping it removes the containers and volumes.
struct Stack {
    dir: TempDir,
    env: Vec<(String, String)>,
    port: u16,
}

impl Stack {
    fn new(engine: &Engine, images: &str) -> Stack {
        let dir = TempDir::new();
        copy_repo(&repo(), &dir.path);
        let port = free_port();
        // Containers cannot be given more open files than the engine has (a sandbox may hold
        // dockerd below the stack's default of 65536).
        let hard = Command::new("sh")
            .args(["-c", "ulimit -Hn"])
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(65536);
        let mut env: Vec<(String, String)> = vec![
            ("COMPOSE_PROJECT_NAME".into(), PROJECT.into()),
            ("HTTP_HOST".into(), "127.0.0.1".into()),
            ("HTTP_PORT".into(), port.to_string()),
            ("NOFILE_LIMIT".into(), hard.min(65536).to_string()),
        ];
        if let Some(host) = &engine.host {
            env.push(("DOCKER_HOST".into(), host.clone()));
        }
        // docker/local-images.sh prints `export NAME=value` lines.
        for line in images.lines() {
            if let Some((k, v)) = line
                .trim()
                .strip_prefix("export ")
                .and_then(|l| l.split_once('='))
            {
                env.push((k.into(), v.into()));
            }
        }
        Stack { dir, env, port }
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args).current_dir(&self.dir.path);
        for var in ["COMPOSE_FILE", "COMPOSE_PROFILES", "COMPOSE_ENV_FILES"] {
            cmd.env_remove(var);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// `docker compose` as the Makefile runs it.
    fn compose(&self, args: &[&str]) -> Command {
        let mut cmd = self.command("docker", &["compose"]);
        cmd.args(COMPOSE_ARGS).args(args);
        cmd
    }

    /// `make <target>` in the copy, niced (a build compiles the project). The first build compiles
    /// every dependency in the container (about 10 minutes niced on two busy cores); later ones
    /// reuse the engine's layer cache. Everything else takes seconds.
    async fn make(&self, target: &str) {
        let limit = Duration::from_secs(if target == "build" { 40 * 60 } else { 300 });
        let cmd = self.command("nice", &["-n", "19", "make", target]);
        self.run(&format!("make {target}"), cmd, limit).await;
    }

    /// Runs `cmd` within `limit`; panics with the end of its output when it fails.
    async fn run(&self, what: &str, cmd: Command, limit: Duration) -> String {
        let started = Instant::now();
        // In the copy of the repository (run_bounded leaves its output file there too).
        let (ok, output) = run_bounded(cmd, &self.dir.path, limit).await;
        assert!(ok, "{what} failed:\n{}", tail(&output, 60));
        say(&format!("{what}: {:.0?}", started.elapsed()));
        output
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `POST /publish` through nginx; asserts it is accepted.
    async fn publish(&self, token: &str, body: Value) {
        let r = http()
            .post(self.url("/publish"))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("publish");
        assert_eq!(r.status(), 200, "{body}");
    }

    /// JWT_SECRET of the stack's .env, as `make` created it.
    fn secret(&self) -> String {
        let env = std::fs::read_to_string(self.dir.path.join(".env")).expect(".env");
        env.lines()
            .find_map(|l| l.strip_prefix("JWT_SECRET="))
            .expect("JWT_SECRET in .env")
            .to_string()
    }

    /// (service, health) of every running container.
    async fn health(&self) -> Vec<(String, String)> {
        let ps = self.compose(&["ps", "--format", "json"]);
        let (ok, out) = run_bounded(ps, &self.dir.path, Duration::from_secs(60)).await;
        assert!(ok, "docker compose ps:\n{out}");
        out.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|c| {
                (
                    c["Service"].as_str().unwrap_or_default().to_string(),
                    c["Health"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// Waits until `services` containers run, all healthy.
    async fn wait_healthy(&self, services: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let health = self.health().await;
            if health.len() == services && health.iter().all(|(_, h)| h == "healthy") {
                say(&format!("healthy: {health:?}"));
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not every service became healthy: {health:?}"
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let mut cmd = self.command("timeout", &["120", "docker", "compose"]);
        cmd.args(COMPOSE_ARGS)
            .args(["down", "--volumes", "--timeout", "5"]);
        let _ = quiet_success(&mut cmd);
    }
}

/// Streams last as long as the stack: no overall request timeout, unlike `http()`.
fn stream_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// Which gateway instance holds each connection of `user`, from the cluster-wide registry.
async fn instances(stack: &Stack, operator: &str, user: &str) -> Vec<(String, String)> {
    let r = http()
        .get(stack.url(&format!("/connections/shop/{user}")))
        .bearer_auth(operator)
        .send()
        .await
        .expect("connections");
    if r.status() == 204 {
        return Vec::new();
    }
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    body.as_object()
        .expect("connection map")
        .iter()
        .map(|(id, c)| (id.clone(), c["instance"].as_str().unwrap_or("").to_string()))
        .collect()
}

/// Reads a stream to its end and asserts the drain's `shutdown` event was on it.
async fn assert_drained(client: &mut SseClient, who: &str) {
    let events = client.until_end(Duration::from_secs(30)).await;
    assert!(
        events
            .iter()
            .any(|e| e.event == "shutdown" && e.json()["reconnect"] == true),
        "{who}: no shutdown event before the stream ended: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_up_runs_the_stack_on_a_real_engine() {
    let started = Instant::now();
    let engine = Engine::ensure();

    // Base images: stand-ins from Debian's packages (their stderr tells, in the test's output).
    let mut images = Command::new(repo().join("docker/local-images.sh"));
    if let Some(host) = &engine.host {
        images.env("DOCKER_HOST", host);
    }
    let out = images
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("run docker/local-images.sh");
    let images = tokio::time::timeout(
        Duration::from_secs(20 * 60),
        tokio::task::spawn_blocking(move || out.wait_with_output()),
    )
    .await
    .expect("docker/local-images.sh took over 20 minutes")
    .expect("join")
    .expect("docker/local-images.sh");
    assert!(images.status.success(), "docker/local-images.sh failed");
    let images = String::from_utf8_lossy(&images.stdout).into_owned();
    say(&format!(
        "base images are stand-ins built from Debian packages, not the official ones:\n{images}"
    ));

    let stack = Stack::new(&engine, &images);
    stack.make("build").await;
    // `make` made .env with a random secret of its own, never the example's placeholder.
    let secret = stack.secret();
    assert_eq!(secret.len(), 64, "openssl rand -hex 32");
    assert!(
        !std::fs::read_to_string(repo().join(".env.example"))
            .expect(".env.example")
            .contains(&secret)
    );
    stack.make("up").await;
    stack.wait_healthy(3).await;

    let token = |sub: &str, role: Option<&str>| {
        let mut claims = json!({"iss": "shop", "sub": sub, "exp": now() + 3600});
        if let Some(role) = role {
            claims["sse_role"] = json!(role);
        }
        sign_with(Algorithm::HS256, &claims, &secret)
    };
    let publisher = token("backend", Some("publisher"));
    let operator = token("ops", Some("operator"));
    let open = |user: &str| {
        let url = stack.url(&format!("/sse?access_token={}", token(user, None)));
        SseClient::open(
            stream_client()
                .get(url)
                .header("accept", "text/event-stream"),
        )
    };

    // An EventSource's request, through nginx.
    let mut alice = open("alice").await;
    assert_eq!(alice.status, 200);
    let alice_id = alice.connection_id();

    // Published inside the Redis container, as a backend would with the original service.
    let subscribers = stack
        .run(
            "redis-cli PUBLISH",
            stack.compose(&[
                "exec",
                "-T",
                "redis",
                "redis-cli",
                "PUBLISH",
                "shop:channel:alice",
                r#"{"id":"100","type":"greeting","data":{"via":"redis-cli"}}"#,
            ]),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(
        subscribers.lines().last().map(str::trim),
        Some("1"),
        "one gateway subscribes to alice: {subscribers}"
    );
    let ev = alice.next().await;
    assert_eq!(
        (ev.event.as_str(), ev.id.as_deref()),
        ("greeting", Some("100"))
    );
    assert_eq!(ev.json(), json!({"via": "redis-cli"}));

    // And over HTTP.
    stack
        .publish(
            &publisher,
            json!({"user": "alice", "type": "order", "data": {"id": 42}}),
        )
        .await;
    let ev = alice.next().await;
    assert_eq!(ev.event, "order");
    assert_eq!(ev.json(), json!({"id": 42}));

    let listed = poll_until(|| instances(&stack, &operator, "alice"), |l| !l.is_empty()).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].0, alice_id);

    // No metrics through the published port: they name every application. A scraper on the
    // stack's operator network reaches the gateway's operator listener, per-application labels
    // and all (wget from the nginx image, in a container of its own on that network only).
    let r = http()
        .get(stack.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(r.status(), 404, "/metrics through nginx");
    let scraper_image = stack
        .env
        .iter()
        .find(|(k, _)| k == "NGINX_IMAGE")
        .map_or("nginx:1.28-alpine", |(_, v)| v.as_str());
    let network = format!("{PROJECT}_operator");
    let scraped = stack
        .run(
            "scrape gateway:9180 from the operator network",
            stack.command(
                "docker",
                &[
                    "run",
                    "--rm",
                    "--network",
                    &network,
                    "--entrypoint",
                    "wget",
                    scraper_image,
                    "-qO-",
                    "http://gateway:9180/metrics",
                ],
            ),
            Duration::from_secs(120),
        )
        .await;
    assert!(
        scraped.contains("sse_connections{app=\"shop\"} 1"),
        "{scraped}"
    );

    // `make logs` follows every service; the gateway's lines are JSON (production mode).
    let mut logs = stack.command("make", &["logs"]);
    logs.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
    let (logs_child, mut lines) = spawn_lines(logs);
    let mut json_lines = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while json_lines < 3 {
        let line = tokio::time::timeout_at(deadline, lines.recv())
            .await
            .expect("no JSON lines of the gateway in `make logs` within 60 s")
            .expect("`make logs` ended");
        // `gateway-1  | {"timestamp":...,"level":"INFO",...}`
        if let Some((service, text)) = line.split_once(" | ")
            && service.trim_start().starts_with("gateway")
            && serde_json::from_str::<Value>(text).is_ok_and(|v| v["level"].is_string())
        {
            json_lines += 1;
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", "--", &format!("-{}", logs_child.id())])
        .status();
    drop(logs_child);

    // Three gateways behind nginx, which resolves the replicas when it (re)starts.
    stack
        .run(
            "scale to 3 gateways",
            stack.compose(&["up", "-d", "--scale", "gateway=3"]),
            Duration::from_secs(300),
        )
        .await;
    stack
        .run(
            "restart nginx",
            stack.compose(&["restart", "nginx"]),
            Duration::from_secs(120),
        )
        .await;
    stack.wait_healthy(5).await;
    drop(alice); // cut by nginx's restart
    let mut alice = open("alice").await;
    assert_eq!(alice.status, 200);

    // bob's streams until each replica holds one (least_conn spreads them).
    let mut bobs = Vec::new();
    let mut held = std::collections::BTreeSet::new();
    while held.len() < 3 {
        assert!(
            bobs.len() < 12,
            "12 streams did not reach 3 replicas: {:?}",
            instances(&stack, &operator, "bob").await
        );
        let bob = open("bob").await;
        assert_eq!(bob.status, 200);
        let id = bob.connection_id();
        bobs.push(bob);
        // Registry writes are batched: wait for this stream's entry.
        let listed = poll_until(
            || instances(&stack, &operator, "bob"),
            |l| l.iter().any(|(c, _)| *c == id),
        )
        .await;
        assert!(
            listed.iter().any(|(c, _)| *c == id),
            "{id} not listed: {listed:?}"
        );
        held = listed.into_iter().map(|(_, instance)| instance).collect();
    }
    say(&format!("{} streams of bob on {held:?}", bobs.len()));
    stack
        .publish(
            &publisher,
            json!({"user": "bob", "type": "fanout", "data": {"n": 1}}),
        )
        .await;
    for bob in &mut bobs {
        let ev = bob.next().await;
        assert_eq!((ev.event.as_str(), ev.json()), ("fanout", json!({"n": 1})));
    }

    // The drain: `make down` stops the gateways first, so their `shutdown` events still pass nginx.
    stack.make("down").await;
    assert_drained(&mut alice, "alice").await;
    for bob in &mut bobs {
        assert_drained(bob, "bob").await;
    }
    // Redis's volume survives `down`: started alone again, it has no registry entry left.
    stack
        .run(
            "start redis alone",
            stack.compose(&["up", "-d", "--wait", "redis"]),
            Duration::from_secs(120),
        )
        .await;
    let keys = stack
        .run(
            "redis-cli --scan",
            stack.compose(&[
                "exec",
                "-T",
                "redis",
                "redis-cli",
                "--scan",
                "--pattern",
                "shop:*",
            ]),
            Duration::from_secs(60),
        )
        .await;
    assert!(
        keys.lines().any(|k| k.starts_with("shop:history:")),
        "Redis kept no history: is it the stack's data? {keys}"
    );
    let registry: Vec<&str> = keys
        .lines()
        .filter(|k| k.starts_with("shop:client:") || k.starts_with("shop:connections"))
        .collect();
    assert!(registry.is_empty(), "registry entries left: {registry:?}");
    say(&format!("passed in {:.0?}", started.elapsed()));
}
