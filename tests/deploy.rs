//! The deployment files (docker/Dockerfile, docker/docker-compose.yml, docker/nginx.conf,
//! .dockerignore), checked without a Docker engine:
//!
//! - the compose file goes through Compose's own `config` (parsing, interpolation, env file), and
//!   the resolved model is checked against what the other files expect;
//! - nginx.conf passes `nginx -t`, and a real nginx running it in front of a real gateway streams
//!   events without delay, passes pings and headers, keeps upstream connections alive, forwards the
//!   query string and the client's address, and keeps tokens out of its logs;
//! - the Dockerfile passes hadolint, its HEALTHCHECK command is run against a live gateway, and the
//!   build context (.dockerignore) keeps secrets out but everything the build copies in.
//!
//! nginx, Compose v2 and hadolint come from `.ci/tools/deploy.sh` (run by `make test`).

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::external::{repo, tool};
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn output_text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// "10s", "1h", "500ms", "20s" (nginx and Compose durations) in seconds.
fn seconds(v: &str) -> f64 {
    let i = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let n: f64 = v[..i].parse().unwrap_or_else(|_| panic!("duration {v:?}"));
    n * match &v[i..] {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        u => panic!("duration unit {u:?} in {v:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// nginx.conf: a small parser for the static checks, and a real nginx for the live ones.

/// One nginx directive: `name args...;` or `name args... { block }`.
#[derive(Debug)]
struct Directive {
    name: String,
    args: Vec<String>,
    block: Vec<Directive>,
}

impl Directive {
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Directive> + 'a {
        self.block.iter().filter(move |d| d.name == name)
    }

    fn one(&self, name: &str) -> &Directive {
        let found: Vec<&Directive> = self.block.iter().filter(|d| d.name == name).collect();
        assert_eq!(found.len(), 1, "exactly one `{name}` in `{}`", self.name);
        found[0]
    }

    /// The arguments of the one `name` directive, joined by spaces.
    fn value(&self, name: &str) -> String {
        self.one(name).args.join(" ")
    }

    fn location(&self, args: &[&str]) -> &Directive {
        self.all("location")
            .find(|l| l.args == args)
            .unwrap_or_else(|| panic!("no `location {}`", args.join(" ")))
    }

    /// This directive and every one nested in it.
    fn walk(&self) -> Vec<&Directive> {
        let mut out = vec![self];
        for d in &self.block {
            out.extend(d.walk());
        }
        out
    }
}

/// Parses nginx configuration syntax: words, quoted strings, `;`, `{`, `}` and `#` comments.
fn parse_nginx(text: &str) -> Directive {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            ';' | '{' | '}' => {
                tokens.push(c.to_string());
                chars.next();
            }
            '"' | '\'' => {
                chars.next();
                let mut s = String::from("\u{0}");
                while let Some(x) = chars.next() {
                    match x {
                        '\\' => s.push(chars.next().expect("escape")),
                        x if x == c => break,
                        x => s.push(x),
                    }
                }
                tokens.push(s);
            }
            _ => {
                let mut s = String::new();
                while let Some(&x) = chars.peek() {
                    if x.is_whitespace() || matches!(x, ';' | '{' | '}') {
                        break;
                    }
                    s.push(x);
                    chars.next();
                }
                tokens.push(s);
            }
        }
    }
    fn block(tokens: &[String], i: &mut usize) -> Vec<Directive> {
        let mut out = Vec::new();
        let mut words: Vec<String> = Vec::new();
        while *i < tokens.len() {
            let t = &tokens[*i];
            *i += 1;
            match t.as_str() {
                ";" | "{" => {
                    assert!(!words.is_empty(), "empty directive in nginx.conf");
                    let name = words.remove(0);
                    let inner = if t == "{" {
                        block(tokens, i)
                    } else {
                        Vec::new()
                    };
                    // Quoted words were marked with a leading NUL: drop the mark.
                    let args = words
                        .drain(..)
                        .map(|w| w.trim_start_matches('\u{0}').to_string())
                        .collect();
                    out.push(Directive {
                        name,
                        args,
                        block: inner,
                    });
                }
                "}" => return out,
                _ => words.push(t.clone()),
            }
        }
        assert!(words.is_empty(), "unterminated directive {words:?}");
        out
    }
    let mut i = 0;
    let root = block(&tokens, &mut i);
    Directive {
        name: "main".into(),
        args: Vec::new(),
        block: root,
    }
}

fn shipped_nginx() -> Directive {
    parse_nginx(&read("docker/nginx.conf"))
}

/// Replaces `from` by `to`, which must occur exactly once.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "docker/nginx.conf must contain `{from}` exactly once (tests/deploy.rs rewrites it)"
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

// ---------------------------------------------------------------------------------------------
// docker-compose.yml, through Compose itself.

/// `docker compose`, or a standalone `docker-compose` (v2) when the docker client has no plugin.
fn compose() -> Command {
    let plugin = Command::new("docker")
        .args(["compose", "version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut cmd = if plugin {
        let mut c = Command::new("docker");
        c.arg("compose");
        c
    } else {
        Command::new(tool("docker-compose"))
    };
    // The file's own settings, not the caller's environment, decide the project name and port.
    for var in [
        "COMPOSE_PROJECT_NAME",
        "COMPOSE_FILE",
        "COMPOSE_PROFILES",
        "COMPOSE_ENV_FILES",
        "HTTP_PORT",
        "HTTP_HOST",
        "NOFILE_LIMIT",
        "RUST_IMAGE",
        "RUNTIME_IMAGE",
        "REDIS_IMAGE",
        "NGINX_IMAGE",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// The resolved compose model, as `make up` would see it: the repository's docker/ directory in a
/// temp root with `.env` copied from .env.example (never the developer's own .env).
fn compose_model(root: &Path) -> Value {
    compose_model_with(root, &[])
}

/// [`compose_model`] with variables set in Compose's environment.
fn compose_model_with(root: &Path, vars: &[(&str, &str)]) -> Value {
    let docker = root.join("docker");
    std::fs::create_dir_all(&docker).expect("mkdir");
    for f in ["Dockerfile", "docker-compose.yml", "nginx.conf"] {
        std::fs::copy(repo().join("docker").join(f), docker.join(f)).expect("copy docker/");
    }
    std::fs::copy(repo().join(".env.example"), root.join(".env")).expect("copy .env.example");
    // The Makefile's invocation, from the repository root.
    let makefile = read("Makefile");
    assert!(
        makefile.contains("-f docker/docker-compose.yml --env-file .env"),
        "the Makefile's COMPOSE no longer matches what this test runs"
    );
    let out = compose()
        .current_dir(root)
        .envs(vars.iter().copied())
        .args(["-f", "docker/docker-compose.yml", "--env-file", ".env"])
        .args(["config", "--format", "json"])
        .output()
        .expect("run compose");
    assert!(
        out.status.success(),
        "compose config failed:\n{}",
        output_text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}:\n{}", output_text(&out)))
}

/// `KEY=value` lines of .env.example.
fn env_example() -> HashMap<String, String> {
    read(".env.example")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn compose_file_resolves_to_the_intended_stack() {
    let root = TempDir::new();
    let model = compose_model(&root.path);
    let root_dir = root.path.canonicalize().expect("canonical");
    let services = &model["services"];
    assert_eq!(model["name"], "sse-gateway");
    let mut names: Vec<&String> = services.as_object().expect("services").keys().collect();
    names.sort();
    assert_eq!(names, ["gateway", "nginx", "redis"]);
    for name in ["gateway", "nginx", "redis"] {
        assert_eq!(services[name]["restart"], "unless-stopped", "{name}");
    }

    // The gateway: built from the repository root with docker/Dockerfile, configured by .env plus
    // the stack's own Redis, checked by the image's HEALTHCHECK, reachable only inside the stack.
    let gw = &services["gateway"];
    let context = PathBuf::from(gw["build"]["context"].as_str().expect("context"));
    assert_eq!(context.canonicalize().expect("context exists"), root_dir);
    assert_eq!(gw["build"]["dockerfile"], "docker/Dockerfile");
    let env = &gw["environment"];
    let example = env_example();
    assert_eq!(
        env["JWT_SECRET"],
        example["JWT_SECRET"].as_str(),
        "env_file"
    );
    assert_eq!(env["REDIS_URL"], "redis://redis:6379");
    assert_eq!(env["APP_PORT"], "8080");
    // The operator listener on the container's interfaces, reachable from the operator network
    // only (no published port, nginx not on that network).
    assert_eq!(env["OPERATOR_ADDR"], "0.0.0.0:9180");
    let operator_net = "operator";
    assert!(
        gw["networks"].get(operator_net).is_some(),
        "{}",
        gw["networks"]
    );
    assert_eq!(model["networks"][operator_net]["internal"], true);
    assert_eq!(
        example["APP_MODE"], "debug",
        "the example is for `make run`"
    );
    assert_eq!(
        env["APP_MODE"], "production",
        "the stack runs in production mode"
    );
    assert_eq!(
        gw["build"].get("args"),
        None,
        "no base image set: the Dockerfile's official defaults"
    );
    assert_eq!(
        gw["healthcheck"].get("test"),
        None,
        "the gateway inherits the image's HEALTHCHECK (tested below); a test here would shadow it"
    );
    assert!(dockerfile().iter().any(|(k, _)| k == "HEALTHCHECK"));
    assert_eq!(gw["depends_on"]["redis"]["condition"], "service_healthy");
    assert_eq!(gw.get("ports"), None);
    let grace = seconds(gw["stop_grace_period"].as_str().expect("stop_grace_period"));
    assert!(
        grace > 10.0,
        "stop_grace_period {grace}s must outlast SHUTDOWN_TIMEOUT (10 s)"
    );

    // The port agrees across the files: compose's APP_PORT, nginx's upstream, the image's EXPOSE
    // (only that one: `docker run -P` publishes every EXPOSEd port, the operator's would be too).
    let expose: Vec<String> = dockerfile()
        .into_iter()
        .filter(|(k, _)| k == "EXPOSE")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(expose, ["8080"]);
    let upstream = shipped_nginx()
        .one("http")
        .all("upstream")
        .flat_map(|u| u.all("server"))
        .map(|s| s.args[0].clone())
        .collect::<Vec<_>>();
    assert_eq!(upstream, ["gateway:8080"]);

    // Redis: pinned 7.x, health-checked, not published, on the internal network only.
    let redis = &services["redis"];
    let image = redis["image"].as_str().expect("image");
    assert!(image.starts_with("redis:7."), "{image}");
    assert_eq!(
        redis["healthcheck"]["test"],
        json!(["CMD", "redis-cli", "ping"])
    );
    assert_eq!(redis.get("ports"), None);
    assert_eq!(redis["networks"].as_object().map(|n| n.len()), Some(1));
    let backend = redis["networks"]
        .as_object()
        .and_then(|n| n.keys().next())
        .expect("network");
    assert_eq!(model["networks"][backend]["internal"], true);

    // nginx: pinned, the shipped nginx.conf mounted read-only, the one published port, started
    // after a healthy gateway, health-checked on a path nginx.conf serves.
    let nginx = &services["nginx"];
    let image = nginx["image"].as_str().expect("image");
    assert!(
        image.starts_with("nginx:1.") && image != "nginx:latest",
        "{image}"
    );
    let volumes = nginx["volumes"].as_array().expect("volumes");
    assert!(
        volumes.iter().any(|v| {
            v["source"] == json!(root_dir.join("docker/nginx.conf").display().to_string())
                && v["target"] == "/etc/nginx/nginx.conf"
                && v["read_only"] == true
        }),
        "{volumes:?}"
    );
    let ports = nginx["ports"].as_array().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["target"], 80);
    assert_eq!(ports[0]["published"], "80");
    assert_eq!(
        ports[0].get("host_ip"),
        None,
        "every address, IPv4 and IPv6, unless HTTP_HOST says otherwise"
    );
    assert_eq!(
        nginx["depends_on"]["gateway"]["condition"],
        "service_healthy"
    );
    let check = nginx["healthcheck"]["test"].to_string();
    assert!(check.contains("/nginx-health"), "{check}");
    shipped_nginx()
        .one("http")
        .one("server")
        .location(&["=", "/nginx-health"]);
    assert!(
        nginx["networks"].get(backend.as_str()).is_none(),
        "nginx must not reach Redis"
    );
    assert!(
        nginx["networks"].get(operator_net).is_none()
            && redis["networks"].get(operator_net).is_none(),
        "only scrapers join the operator network"
    );
    for (name, service) in services.as_object().expect("services") {
        for port in service["ports"].as_array().into_iter().flatten() {
            assert_ne!(port["target"], 9180, "{name} publishes the operator port");
        }
    }
}

/// Without an image registry (or with a private mirror), the base images, the published address and
/// the open-file limit come from the environment (docs/deployment.md).
#[test]
fn compose_takes_images_port_and_limits_from_the_environment() {
    let root = TempDir::new();
    let model = compose_model_with(
        &root.path,
        &[
            ("RUST_IMAGE", "mirror.example/rust:1.90.0-slim-bookworm"),
            ("RUNTIME_IMAGE", "mirror.example/debian:bookworm-slim"),
            ("REDIS_IMAGE", "mirror.example/redis:7.4-alpine"),
            ("NGINX_IMAGE", "mirror.example/nginx:1.28-alpine"),
            ("HTTP_HOST", "127.0.0.1"),
            ("HTTP_PORT", "8081"),
            ("NOFILE_LIMIT", "20000"),
        ],
    );
    let services = &model["services"];
    assert_eq!(
        services["gateway"]["build"]["args"],
        json!({
            "RUST_IMAGE": "mirror.example/rust:1.90.0-slim-bookworm",
            "RUNTIME_IMAGE": "mirror.example/debian:bookworm-slim"
        })
    );
    assert_eq!(
        services["redis"]["image"],
        "mirror.example/redis:7.4-alpine"
    );
    assert_eq!(
        services["nginx"]["image"],
        "mirror.example/nginx:1.28-alpine"
    );
    let port = &services["nginx"]["ports"][0];
    assert_eq!(
        (&port["host_ip"], &port["published"], &port["target"]),
        (&json!("127.0.0.1"), &json!("8081"), &json!(80))
    );
    for name in ["gateway", "nginx"] {
        assert_eq!(
            services[name]["ulimits"]["nofile"],
            json!({"soft": 20000, "hard": 20000}),
            "{name}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Dockerfile and .dockerignore.

/// The Dockerfile's instructions, continuation lines joined and comments dropped: (KEYWORD, rest).
fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("docker/Dockerfile").lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                let (k, v) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((k.to_ascii_uppercase(), v.trim().to_string()));
                current.clear();
            }
        }
    }
    assert!(current.is_empty(), "Dockerfile ends in a continuation");
    out
}

/// The instructions of the last stage.
fn final_stage() -> Vec<(String, String)> {
    let all = dockerfile();
    let start = all.iter().rposition(|(k, _)| k == "FROM").expect("FROM");
    all[start..].to_vec()
}

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
