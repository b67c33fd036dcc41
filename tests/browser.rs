//! A real browser against real gateways: headless Chromium, driven by Playwright
//! (tests/node/browser.mjs), runs the example page docs/examples/browser/index.html, served from
//! another origin so that its native EventSource goes through CORS, and the test checks what the
//! page shows.
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use common::external::{repo, spawn_lines, tool};
use common::{Gateway, RedisServer, TempDir, now, sign, user_token};

/// A whole flow, browser start-up included.
const FLOW_LIMIT: Duration = Duration::from_secs(50);

/// One browser at a time: two Chromiums starting at once on a small machine make each flow slow.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The page shows a published event; the gateway stops gracefully (`shutdown` event); while nothing
/// listens on its port an event is published through another instance on the same Redis; a new
/// process starts on the same port; the page's EventSource reconnects by itself, gets the missed
/// event replayed for its `Last-Event-ID`, then shows a live one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_page_reconnects_by_itself_across_a_restart() {
    let _one = ONE_BROWSER.lock().await;
    let redis = RedisServer::start();
    let site = StaticSite::serve(repo().join("docs/examples/browser")).await;
    let gateway = |port: Option<u16>| {
        let b = Gateway::builder()
            .process()
            .redis(&redis)
            .env("RETRY_MS", "500")
            // The page's origin, listed: the gateway must echo it for Chromium to read the stream.
            .env("CORS_ALLOWED_ORIGINS", &site.origin());
        match port {
            Some(p) => b.port(p),
            None => b,
        }
    };
    let mut first = gateway(None).start().await;
    let port = first.port;
    let mut browser = Driver::start();

    let flow = tokio::time::timeout(FLOW_LIMIT, async {
        browser
            .goto(&site.page(port, &user_token("shop", "alice"), ""))
            .await;
        browser.text("#opens", "1").await;
        let before = greet(&first, "before restart").await;
        browser.entries("greeting", 1).await;

        first.signal("TERM");
        let exit = tokio::task::block_in_place(|| first.wait_exit(Duration::from_secs(15)));
        assert_eq!(exit, Some(0), "graceful shutdown");
        browser.entries("shutdown", 1).await;
        // The page keeps trying its gateway's port, where nothing listens now.
        let away = greet(&gateway(None).start().await, "while away").await;
        let second = gateway(Some(port)).start().await;
        browser.text("#opens", "2").await;
        let after = greet(&second, "after restart").await;
        browser.entries("greeting", 3).await;
        (browser.finish().await, [before, away, after], second)
    })
    .await;
    let (shown, [before, away, after], _second) = flow.unwrap_or_else(|_| {
        panic!(
            "browser flow not done within {FLOW_LIMIT:?}{}",
            browser.stderr()
        )
    });
    assert_eq!(browser.wait(), Some(0), "{}", browser.stderr());
    assert_eq!(
        (&shown["state"], &shown["opens"]),
        (&json!("open"), &json!("2"))
    );
    // The page took the token out of its address bar.
    assert!(
        !shown["url"].as_str().unwrap().contains("token="),
        "{shown}"
    );
    assert_eq!(
        log(&shown),
        [
            ("greeting", before.as_str(), r#"{"text":"before restart"}"#),
            // No id of its own: the page shows the stream's last one.
            ("shutdown", before.as_str(), r#"{"reconnect":true}"#),
            // Replayed on reconnect, for the Last-Event-ID the browser sent.
            ("greeting", away.as_str(), r#"{"text":"while away"}"#),
            ("greeting", after.as_str(), r#"{"text":"after restart"}"#),
        ],
        "{shown}"
    );
    browser.check_screenshot();
}

/// The page's token runs out: the gateway ends the stream with `token_expired`; the page fetches a
/// fresh token from its backend (`token_url`), opens a new EventSource resuming after the last id
/// it saw, and misses nothing published meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_page_renews_an_expired_token_and_resumes() {
    let _one = ONE_BROWSER.lock().await;
    let site = StaticSite::serve(repo().join("docs/examples/browser")).await;
    let gw = Gateway::builder()
        .process()
        .env("JWT_LEEWAY", "0")
        .env("CORS_ALLOWED_ORIGINS", &site.origin())
        .start()
        .await;
    let mut browser = Driver::start();
    let token_url = format!("&token_url={}/token", site.origin());
    let mut exp = 0;

    let flow = tokio::time::timeout(FLOW_LIMIT, async {
        // Minted once the browser is up: long enough to open the page, short enough for a test.
        browser.ready().await;
        exp = now() + 4;
        let token = sign(&json!({"iss": "shop", "sub": "alice", "exp": exp}));
        browser.goto(&site.page(gw.port, &token, &token_url)).await;
        browser.text("#opens", "1").await;
        let before = greet(&gw, "before expiry").await;
        browser.entries("greeting", 1).await;
        browser.entries("token_expired", 1).await;
        // Delivered live or replayed, depending on whether the page has reconnected yet: once.
        let during = greet(&gw, "during renewal").await;
        browser.text("#opens", "2").await;
        let after = greet(&gw, "after renewal").await;
        browser.entries("greeting", 3).await;
        (browser.finish().await, [before, during, after])
    })
    .await;
    let (shown, [before, during, after]) = flow.unwrap_or_else(|_| {
        panic!(
            "browser flow not done within {FLOW_LIMIT:?}{}",
            browser.stderr()
        )
    });
    assert_eq!(browser.wait(), Some(0), "{}", browser.stderr());
    assert_eq!(shown["state"], "open", "{shown}");
    let expired = format!(r#"{{"exp":{exp}}}"#);
    assert_eq!(
        log(&shown),
        [
            ("greeting", before.as_str(), r#"{"text":"before expiry"}"#),
            ("token_expired", before.as_str(), expired.as_str()),
            ("greeting", during.as_str(), r#"{"text":"during renewal"}"#),
            ("greeting", after.as_str(), r#"{"text":"after renewal"}"#),
        ],
        "{shown}"
    );
    browser.check_screenshot();
}

/// Publishes a `greeting` to alice of shop; returns the event id the gateway gave it.
async fn greet(gw: &Gateway, text: &str) -> String {
    let sent = gw
        .publish(
            "shop",
            json!({"user": "alice", "type": "greeting", "data": {"text": text}}),
        )
        .await;
    assert_eq!(sent.status(), 200);
    let body: Value = sent.json().await.expect("publish answer");
    body["ids"][0].as_str().expect("an event id").to_string()
}

/// The page's event log as (type, lastEventId, data).
fn log(shown: &Value) -> Vec<(&str, &str, &str)> {
    let entries = shown["log"].as_array().expect("log");
    entries
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default();
            (s("type"), s("lastEventId"), s("data"))
        })
        .collect()
}

/// Serves the files of one directory with `Connection: close`, on a loopback port of its own (so
/// the page's origin differs from the gateway's), and `/token`: a fresh token for alice of shop, as
/// an application's backend would hand out.
struct StaticSite {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl StaticSite {
    async fn serve(dir: PathBuf) -> StaticSite {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_file(stream, dir.clone()));
            }
        });
        StaticSite { port, task }
    }

    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The example page, connecting at once to the gateway on `gateway_port` with `token`.
    fn page(&self, gateway_port: u16, token: &str, more_query: &str) -> String {
        format!(
            "{}/index.html?gateway=http://127.0.0.1:{gateway_port}&token={token}&events=greeting{more_query}",
            self.origin()
        )
    }
}

impl Drop for StaticSite {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_file(mut stream: TcpStream, dir: PathBuf) {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head);
    let target = head.split_whitespace().nth(1).unwrap_or("/");
    let path = target.split(['?', '#']).next().unwrap_or_default();
    let name = match path.trim_start_matches('/') {
        "" => "index.html",
        name => name,
    };
    // Plain file names only: nothing outside the directory.
    let safe = !name.starts_with('.') && !name.contains(['/', '\\']);
    let file = safe.then(|| std::fs::read(dir.join(name)).ok()).flatten();
    let (status, content_type, body) = match file {
        _ if name == "token" => {
            let token = json!({"token": user_token("shop", "alice")});
            ("200 OK", "application/json", token.to_string().into_bytes())
        }
        Some(body) => ("200 OK", content_type(name), body),
        None => ("404 Not Found", "text/plain", b"not found".to_vec()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
}

fn content_type(name: &str) -> &'static str {
    match Path::new(name).extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// `node browser.mjs`, one command and one answer at a time. Dropping it ends Node and any
/// Chromium it left behind.
struct Driver {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<String>,
    profile: PathBuf,
    screenshot: PathBuf,
    stderr: PathBuf,
    /// Whether the script's first answer (the browser is up) was read.
    ready: bool,
    _dir: TempDir,
}

impl Driver {
    /// Starts Chromium with a fresh profile. The screenshot goes to `$BROWSER_SCREENSHOT` when set
    /// (to look at it), else to a temporary directory.
    fn start() -> Driver {
        let node_dir = repo().join("tests/node");
        assert!(
            node_dir.join("node_modules/playwright-core").is_dir(),
            "playwright-core is not installed in tests/node: run `make tools` (or .ci/install-tools)"
        );
        let dir = TempDir::new();
        let profile = dir.path.join("chromium-profile");
        let stderr = dir.path.join("browser.stderr.log");
        let screenshot = match std::env::var_os("BROWSER_SCREENSHOT") {
            Some(p) => PathBuf::from(p),
            None => dir.path.join("page.png"),
        };
        let mut cmd = Command::new(tool("node"));
        cmd.arg(node_dir.join("browser.mjs"))
            .args([profile.as_os_str(), screenshot.as_os_str()])
            .env("CHROMIUM", tool("chromium"))
            .current_dir(&node_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&stderr).expect("log")));
        let (mut child, lines) = spawn_lines(cmd);
        let stdin = child.stdin.take().expect("stdin");
        Driver {
            child,
            stdin,
            lines,
            profile,
            screenshot,
            stderr,
            ready: false,
            _dir: dir,
        }
    }

    async fn goto(&mut self, url: &str) {
        self.ask(json!({ "goto": url })).await;
    }

    /// Waits until the page's log shows `count` events of `event_type`.
    async fn entries(&mut self, event_type: &str, count: usize) {
        self.ask(json!({"entries": event_type, "count": count}))
            .await;
    }

    /// Waits until the text of the element `selector` is `text`.
    async fn text(&mut self, selector: &str, text: &str) {
        self.ask(json!({"text": selector, "is": text})).await;
    }

    /// Takes the screenshot and returns what the page shows; the script then closes the browser.
    async fn finish(&mut self) -> Value {
        self.ask(json!({"finish": true})).await["done"].take()
    }

    /// Waits until the browser is up (done by the first command otherwise).
    async fn ready(&mut self) {
        if !self.ready {
            self.answer(&json!("browser start")).await;
            self.ready = true;
        }
    }

    async fn ask(&mut self, command: Value) -> Value {
        self.ready().await;
        writeln!(self.stdin, "{command}")
            .and_then(|_| self.stdin.flush())
            .unwrap_or_else(|e| panic!("browser script gone ({e}){}", self.stderr()));
        self.answer(&command).await
    }

    /// The script's answer to `command`; panics if it failed or ended.
    async fn answer(&mut self, command: &Value) -> Value {
        let Some(line) = self.lines.recv().await else {
            panic!("browser script ended while on {command}{}", self.stderr());
        };
        let answer: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("browser script said {line:?}{}", self.stderr()));
        if let Some(why) = answer.get("failed") {
            panic!("browser script failed on {command}: {why}{}", self.stderr());
        }
        answer
    }

    fn check_screenshot(&self) {
        assert!(
            std::fs::metadata(&self.screenshot).is_ok_and(|m| m.len() > 0),
            "no screenshot at {}",
            self.screenshot.display()
        );
    }

    fn stderr(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("\n--- browser.mjs stderr ---\n{text}")
    }

    /// The script's exit code, waiting at most five seconds for it to close the browser.
    fn wait(&mut self) -> Option<i32> {
        for _ in 0..100 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SIGTERM first: Playwright then closes the browser itself.
            let _ = Command::new("kill")
                .arg(self.child.id().to_string())
                .status();
            if self.wait().is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        // Whatever Chromium process still uses this test's own profile directory.
        for pid in pids_with_arg(&self.profile) {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
    }
}

/// Processes whose command line mentions `needle`.
fn pids_with_arg(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy().into_owned();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(Result::ok)
        .filter_map(|p| {
            let pid = p.file_name().to_string_lossy().into_owned();
            let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
            let found = pid.bytes().all(|b| b.is_ascii_digit())
                && String::from_utf8_lossy(&cmdline).contains(&needle);
            found.then_some(pid)
        })
        .collect()
}
