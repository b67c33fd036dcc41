//! docker/nginx.conf, checked without a Docker engine: it passes `nginx -t`, and a real nginx
//! running it in front of a real gateway streams events without delay, passes pings and headers,
//! keeps upstream connections alive, forwards the query string and the client's address, and keeps
//! tokens out of its logs. nginx comes from `.ci/tools/deploy.sh` (run by `make test`).

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::deployment::*;
use common::external::tool;
use common::external::{output_text, read, seconds};
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

// ---------------------------------------------------------------------------------------------
// nginx.conf: a small parser for the static checks, and a real nginx for the live ones.

/// Replaces `from` by `to`, which must occur exactly once.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "docker/nginx.conf must contain `{from}` exactly once (tests/nginx.rs rewrites it)"
    );
    text.replacen(from, to, 1)
}

/// docker/nginx.conf as shipped, changed only where it cannot work outside compose. Each rewrite
/// must match exactly once, so a reshaped file fails here rather than being half tested:
///
/// 1. the upstream `gateway:8080` (a compose DNS name) becomes `127.0.0.1:<upstream>`;
/// 2. the server's `listen 80;` becomes a free port on 127.0.0.1 (no root needed, no clash);
/// 3. the temp paths (the package's defaults are root-owned) go to `dir`, added at the top of `http`.
///
/// The pid file and the start-up error log are set on the command line (`-g`, `-e`); the shipped
/// logs already go to stdout and stderr, which [`Nginx`] captures.
///
/// Test-only additions, off unless asked for:
/// - `ignore_accel_buffering` adds `proxy_ignore_headers X-Accel-Buffering;` to the `/sse`
///   location: the gateway sends `X-Accel-Buffering: no`, which alone switches nginx's buffering
///   off, so without it the live tests could not tell whether nginx.conf itself does;
/// - `listen_params` are appended to the `listen` line (a small `sndbuf=` makes a slow client's
///   socket fill after kilobytes rather than megabytes).
fn runnable_nginx_conf(
    dir: &Path,
    upstream: u16,
    listen: u16,
    ignore_accel_buffering: bool,
    listen_params: &str,
) -> String {
    let d = dir.display();
    let mut conf = read("docker/nginx.conf");
    conf = replace_once(
        &conf,
        "server gateway:8080 ",
        &format!("server 127.0.0.1:{upstream} "),
    );
    conf = replace_once(
        &conf,
        "\n        listen 80;\n",
        &format!("\n        listen 127.0.0.1:{listen} {listen_params};\n"),
    );
    conf = replace_once(
        &conf,
        "\nhttp {\n",
        &format!(
            "\nhttp {{\n    client_body_temp_path {d}/client_body;\n    proxy_temp_path {d}/proxy;\n    \
             fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n"
        ),
    );
    if ignore_accel_buffering {
        conf = replace_once(
            &conf,
            "location = /sse {\n",
            "location = /sse {\n            proxy_ignore_headers X-Accel-Buffering;\n",
        );
    }
    conf
}

fn nginx_bin() -> PathBuf {
    // Root's PATH has /usr/sbin, a developer's may not.
    let sbin = PathBuf::from("/usr/sbin/nginx");
    if sbin.is_file() { sbin } else { tool("nginx") }
}

/// nginx options that keep everything (prefix, pid, start-up error log) in `dir`.
fn nginx_args(dir: &Path, conf: &Path, extra_global: &str) -> Vec<String> {
    vec![
        "-p".into(),
        format!("{}/", dir.display()),
        "-c".into(),
        conf.display().to_string(),
        "-e".into(),
        dir.join("startup-error.log").display().to_string(),
        "-g".into(),
        format!("pid {}/nginx.pid; {extra_global}", dir.display()),
    ]
}

/// A real nginx running the rewritten docker/nginx.conf on a free port, in the foreground, in a
/// process group of its own: dropping it stops the master and its workers.
struct Nginx {
    port: u16,
    child: Option<Child>,
    dir: TempDir,
}

impl Nginx {
    fn start(upstream: u16, ignore_accel_buffering: bool) -> Nginx {
        Nginx::start_with(upstream, ignore_accel_buffering, "")
    }

    fn start_with(upstream: u16, ignore_accel_buffering: bool, listen_params: &str) -> Nginx {
        let dir = TempDir::new();
        let port = free_port();
        let conf = dir.path.join("nginx.conf");
        std::fs::write(
            &conf,
            runnable_nginx_conf(
                &dir.path,
                upstream,
                port,
                ignore_accel_buffering,
                listen_params,
            ),
        )
        .expect("write nginx.conf");
        let stdout = File::create(dir.path.join("access.log")).expect("log file");
        let stderr = File::create(dir.path.join("error.log")).expect("log file");
        let child = Command::new(nginx_bin())
            .args(nginx_args(&dir.path, &conf, "daemon off;"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .spawn()
            .expect("spawn nginx");
        let mut nginx = Nginx {
            port,
            child: Some(child),
            dir,
        };
        wait_for_start(
            nginx.child.as_mut().expect("spawned"),
            "nginx",
            Duration::from_secs(10),
            || TcpStream::connect(("127.0.0.1", port)).is_ok(),
            || nginx_error_log(&nginx.dir.path),
        );
        nginx
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path.join("access.log")).unwrap_or_default()
    }

    fn error_log(&self) -> String {
        nginx_error_log(&self.dir.path)
    }

    fn signal_group(pgid: u32, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), "--", &format!("-{pgid}")])
            .stderr(Stdio::null())
            .status();
    }
}

/// What nginx running in `dir` wrote to its start-up and error logs.
fn nginx_error_log(dir: &Path) -> String {
    let mut s = std::fs::read_to_string(dir.join("startup-error.log")).unwrap_or_default();
    s.push_str(&std::fs::read_to_string(dir.join("error.log")).unwrap_or_default());
    s
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // TERM: fast shutdown of master and workers; KILL the group if that takes too long.
        let pgid = child.id();
        Nginx::signal_group(pgid, "TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx::signal_group(pgid, "KILL");
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn nginx_conf_passes_nginx_t() {
    let dir = TempDir::new();
    let conf = dir.path.join("nginx.conf");
    std::fs::write(
        &conf,
        runnable_nginx_conf(&dir.path, free_port(), free_port(), false, ""),
    )
    .expect("write nginx.conf");
    let out = Command::new(nginx_bin())
        .arg("-t")
        .args(nginx_args(&dir.path, &conf, ""))
        .output()
        .expect("run nginx -t");
    let text = output_text(&out);
    assert!(out.status.success(), "nginx -t failed:\n{text}");
    assert!(text.contains("test is successful"), "{text}");
    // Warnings (a deprecated directive, a limit over the file descriptor limit...) count as failures.
    for level in ["[warn]", "[emerg]", "[crit]", "[error]"] {
        assert!(!text.contains(level), "nginx -t reported {level}:\n{text}");
    }
}

#[test]
fn nginx_conf_is_tuned_for_sse() {
    let main = shipped_nginx();
    let http = main.one("http");
    let server = http.one("server");

    // Keepalive to the gateways: HTTP/1.1, no `Connection: close`, a pool in the upstream.
    let upstream = http
        .all("upstream")
        .find(|u| u.args == ["sse_gateway"])
        .expect("upstream sse_gateway");
    assert_eq!(upstream.one("server").args[0], "gateway:8080");
    let pool: u32 = upstream.value("keepalive").parse().expect("keepalive n");
    assert!(pool > 0);
    assert_eq!(server.value("proxy_http_version"), "1.1");
    let headers: HashMap<String, String> = server
        .all("proxy_set_header")
        .map(|d| (d.args[0].to_ascii_lowercase(), d.args[1..].join(" ")))
        .collect();
    assert_eq!(headers["connection"], "", "Connection must be emptied");
    assert_eq!(headers["x-forwarded-for"], "$proxy_add_x_forwarded_for");
    assert_eq!(headers["x-forwarded-proto"], "$scheme");
    // nginx inheritance: a location with any proxy_set_header of its own would silently drop every
    // server-level one, Connection "" included.
    for location in server.all("location") {
        assert!(
            location.all("proxy_set_header").next().is_none(),
            "location {:?} sets proxy_set_header: repeat them all or move it to the server",
            location.args
        );
    }

    // The stream: no buffering, cache or compression; a read timeout far above the ping interval.
    let sse = server.location(&["=", "/sse"]);
    assert_eq!(sse.value("proxy_pass"), "http://sse_gateway");
    assert_eq!(sse.value("proxy_buffering"), "off");
    assert_eq!(sse.value("proxy_cache"), "off");
    assert_eq!(sse.value("gzip"), "off");
    let read_timeout = seconds(&sse.value("proxy_read_timeout"));
    assert!(
        read_timeout >= 600.0,
        "proxy_read_timeout {read_timeout}s: streams idle between 30 s pings (or longer ones) \
         would be cut"
    );
    // The other routes go to the gateway too.
    assert_eq!(
        server.location(&["/"]).value("proxy_pass"),
        "http://sse_gateway"
    );
    // Only ever to the gateways' public port: the operator listener (/metrics, 9180) is not for
    // the outside, and no location singles /metrics out.
    for d in main.walk() {
        assert!(
            d.name != "proxy_pass" || d.args == ["http://sse_gateway"],
            "proxy_pass {:?}: only the upstream of public ports",
            d.args
        );
        assert!(
            !d.args
                .iter()
                .any(|a| a.contains("9180") || a.contains("metrics")),
            "{} {:?}: the operator listener must not be reachable through nginx",
            d.name,
            d.args
        );
    }

    // Tokens ride in `?access_token=`: no log format may contain the query string or the Referer,
    // and every access log uses such a format (nginx's default `combined` logs $request).
    let formats: HashMap<String, String> = main
        .walk()
        .into_iter()
        .filter(|d| d.name == "log_format")
        .map(|d| (d.args[0].clone(), d.args[1..].join("")))
        .collect();
    for (name, format) in &formats {
        // Of the request headers only User-Agent: Authorization, Cookie, Referer (the page's URL)
        // and the rest may carry credentials.
        for var in nginx_variables(format) {
            assert!(
                !["request", "request_uri", "args", "query_string", "is_args"]
                    .contains(&var.as_str())
                    && !var.starts_with("arg_")
                    && !var.starts_with("http_")
                    || var == "http_user_agent",
                "log_format {name} logs ${var}: {format}"
            );
        }
        assert!(format.contains("$uri"), "log_format {name}: {format}");
    }
    let access_logs: Vec<_> = main
        .walk()
        .into_iter()
        .filter(|d| d.name == "access_log")
        .collect();
    assert!(!access_logs.is_empty());
    for log in access_logs {
        assert!(
            log.args == ["off"] || log.args.get(1).is_some_and(|f| formats.contains_key(f)),
            "access_log {:?} uses nginx's default format, which logs the query string",
            log.args
        );
    }
}

/// The variables a log format uses, `$name` and `${name}` alike.
fn nginx_variables(format: &str) -> Vec<String> {
    format
        .split('$')
        .skip(1)
        .map(|rest| {
            rest.trim_start_matches('{')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// Reads from `client` until a ping arrives; panics after `within`.
async fn next_ping(client: &mut SseClient, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_within(left).await {
            Some(ev) if ev.event == "ping" => return,
            Some(_) => {}
            None => panic!("no ping through nginx within {within:?}: {:?}", client.raw),
        }
    }
}

#[tokio::test]
async fn events_stream_through_nginx_without_delay() {
    let gw = Gateway::builder()
        .env("PING_INTERVAL", "300ms")
        .start()
        .await;
    let nginx = Nginx::start(gw.port, true);
    let c = http();

    // Short routes go through the generic location; nginx answers its own health check.
    let r = c.get(nginx.url("/health")).send().await.expect("health");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.expect("json"),
        json!({"status": "ok"})
    );
    let r = c
        .get(nginx.url("/nginx-health"))
        .send()
        .await
        .expect("nginx-health");
    assert_eq!(r.status(), 200);

    // The metrics name every application: never through the public entry point.
    let r = c.get(nginx.url("/metrics")).send().await.expect("metrics");
    assert_eq!(r.status(), 404, "/metrics through nginx");

    // A browser's way in: the token in the query string. Ask for gzip: the stream must not get it.
    let token = user_token("shop", "alice");
    let mut client = SseClient::open(
        c.get(nginx.url(&format!("/sse?access_token={token}")))
            .header("accept-encoding", "gzip"),
    )
    .await;
    assert_eq!(client.status, 200, "{}", nginx.error_log());
    let header = |name: &str| {
        client
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    assert!(
        header("content-type").is_some_and(|t| t.starts_with("text/event-stream")),
        "{:?}",
        client.headers
    );
    assert!(!client.connection_id().is_empty());
    assert_eq!(header("cache-control").as_deref(), Some("no-cache"));
    assert_eq!(
        header("content-encoding"),
        None,
        "the stream was compressed"
    );
    assert_eq!(header("x-accel-buffering"), None, "nginx passed X-Accel-*");

    // Pings keep arriving (the stream is not held back between events).
    next_ping(&mut client, Duration::from_secs(3)).await;
    next_ping(&mut client, Duration::from_secs(3)).await;
    assert!(
        client.raw.starts_with("retry: 3000\n\n"),
        "first bytes: {:?}",
        client.raw
    );

    // Each event, published through nginx as well, arrives at once: a buffering proxy would hold
    // these few bytes back until its buffer filled.
    for i in 0..3 {
        let sent = Instant::now();
        let r = http()
            .post(nginx.url("/publish"))
            .bearer_auth(publisher_token("shop"))
            .json(&json!({"user": "alice", "type": "order", "data": {"n": i}}))
            .send()
            .await
            .expect("publish");
        assert_eq!(r.status(), 200);
        let ev = client.next().await;
        let delay = sent.elapsed();
        assert_eq!(ev.event, "order");
        assert_eq!(ev.json(), json!({"n": i}));
        assert!(
            delay < Duration::from_millis(500),
            "event {i} took {delay:?} from publish to client through nginx"
        );
    }

    // The stream's log line appears once the client is gone: path only, the token nowhere.
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !nginx.access_log().contains("\"GET /sse HTTP/1.1\"") {
        assert!(
            Instant::now() < deadline,
            "no access log line for /sse:\n{}",
            nginx.access_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = format!("{}\n{}", nginx.access_log(), nginx.error_log());
    assert!(
        !logs.contains("access_token") && !logs.contains(&token),
        "a token reached nginx's logs:\n{logs}"
    );
    assert!(logs.contains("\"POST /publish HTTP/1.1\" 200"), "{logs}");
}

/// nginx 1.22 passes small events of a chunked response on promptly even with proxy_buffering on,
/// so the latency check above cannot tell. What buffering changes is a slow client: buffered, nginx
/// drains the gateway into memory and then a temporary file (up to 1 GiB by default), the
/// gateway's slow-stream cut-off never fires, and nginx logs the spill with the request line (the
/// token included). Unbuffered, nginx reads only as fast as the client does.
#[tokio::test]
async fn a_slow_client_is_not_buffered_by_nginx() {
    let gw = Gateway::embedded().await;
    // A 64 KiB send buffer towards the client (fixed: no autotuning up to 4 MiB) and a client that
    // reads the headers, never the body: a few hundred KiB fill the way to the client, then nginx
    // stops reading the gateway, or spills to disk if it buffers.
    let nginx = Nginx::start_with(gw.port, true, "sndbuf=64k");
    let token = user_token("shop", "slow");
    let client =
        SseClient::open(http().get(nginx.url(&format!("/sse?access_token={token}")))).await;
    assert_eq!(client.status, 200);
    let chunk = "x".repeat(256 * 1024);
    for i in 0..12 {
        let r = gw
            .publish(
                "shop",
                json!({"user": "slow", "type": "bulk", "data": {"i": i, "pad": chunk}}),
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let errors = nginx.error_log();
    assert!(
        !errors.contains("temporary file"),
        "nginx buffered the stream of a slow client to disk:\n{errors}"
    );
    drop(client);
}

/// One request as the upstream saw it: which TCP connection, request line, lower-cased headers.
#[derive(Debug, Clone)]
struct Seen {
    conn: usize,
    line: String,
    headers: HashMap<String, String>,
}

/// A stand-in upstream that records the requests nginx sends and answers each `200 ok`, keeping
/// the connection open (HTTP/1.1 keep-alive) until nginx closes it.
async fn recording_upstream() -> (u16, Arc<Mutex<Vec<Seen>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        let mut conn = 0;
        while let Ok((stream, _)) = listener.accept().await {
            conn += 1;
            let record = record.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut headers = HashMap::new();
                    loop {
                        let mut h = String::new();
                        if stream.read_line(&mut h).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                        }
                    }
                    let len: usize = headers
                        .get("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    let mut body = vec![0; len];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    record.lock().expect("lock").push(Seen {
                        conn,
                        line: line.trim_end().to_string(),
                        headers,
                    });
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
                    if stream.get_mut().write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

#[tokio::test]
async fn nginx_keeps_upstream_connections_alive_and_forwards_the_request() {
    let (upstream, seen) = recording_upstream().await;
    let nginx = Nginx::start(upstream, false);
    let c = http();

    for path in ["/health", "/ready", "/sse?access_token=t0k", "/health"] {
        let r = c.get(nginx.url(path)).send().await.expect("request");
        assert_eq!(r.status(), 200, "{path}: {}", nginx.error_log());
        assert_eq!(r.text().await.expect("body"), "ok");
    }
    let r = c
        .post(nginx.url("/publish"))
        .json(&json!({"user": "u", "type": "t", "data": 1}))
        .send()
        .await
        .expect("publish");
    assert_eq!(r.status(), 200);

    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 5, "{seen:?}");
    let lines: Vec<&str> = seen.iter().map(|s| s.line.as_str()).collect();
    assert_eq!(
        lines,
        [
            "GET /health HTTP/1.1",
            "GET /ready HTTP/1.1",
            // The gateway needs the token: the query string reaches it (only the logs drop it).
            "GET /sse?access_token=t0k HTTP/1.1",
            "GET /health HTTP/1.1",
            "POST /publish HTTP/1.1",
        ]
    );
    for s in &seen {
        let h = |k: &str| s.headers.get(k).map(String::as_str);
        assert_eq!(h("connection"), None, "{s:?}");
        assert_eq!(h("x-forwarded-for"), Some("127.0.0.1"), "{s:?}");
        assert_eq!(h("x-real-ip"), Some("127.0.0.1"), "{s:?}");
        assert_eq!(h("x-forwarded-proto"), Some("http"), "{s:?}");
        assert_eq!(h("host"), Some("127.0.0.1"), "{s:?}");
    }
    // Five requests over one client connection: one worker, one pooled upstream connection.
    let conns: std::collections::BTreeSet<usize> = seen.iter().map(|s| s.conn).collect();
    assert_eq!(conns.len(), 1, "upstream connections not reused: {seen:?}");
}
