//! A Node.js client on the npm `eventsource` package (tests/node/client.mjs), which sends its token
//! in an `Authorization: Bearer` header, as a browser's native EventSource cannot.
mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use common::external::{repo, spawn_lines, tool};
use common::{Gateway, now, sign, user_token};

#[tokio::test]
async fn node_eventsource_client_receives_an_event_with_a_bearer_header() {
    let gw = Gateway::embedded().await;
    let mut client = NodeClient::start(&gw, &user_token("shop", "alice"), &["greeting"]);
    assert_eq!(client.line().await, json!({"kind": "open"}));

    let sent = gw
        .publish(
            "shop",
            json!({"user": "alice", "type": "greeting", "data": {"text": "hello from the gateway"}}),
        )
        .await;
    assert_eq!(sent.status(), 200);
    let id = sent.json::<Value>().await.expect("publish answer")["ids"][0].clone();
    assert!(id.is_string(), "{id}");
    assert_eq!(
        client.line().await,
        json!({"kind": "event", "type": "greeting", "lastEventId": id, "data": {"text": "hello from the gateway"}})
    );
    assert_eq!(client.exit_code(), Some(0), "{}", client.stderr());
}

#[tokio::test]
async fn node_eventsource_client_stops_for_good_on_401() {
    let gw = Gateway::embedded().await;
    let expired = sign(&json!({"iss": "shop", "sub": "alice", "exp": now() - 3600}));
    let mut client = NodeClient::start(&gw, &expired, &["greeting"]);
    let line = client.line().await;
    assert_eq!(line["kind"], "closed", "{line}");
    assert_eq!(line["code"], 401, "{line}");
    assert_eq!(client.exit_code(), Some(1), "{}", client.stderr());
}

/// `node client.mjs`, read line by line; killed when dropped.
struct NodeClient {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: std::path::PathBuf,
    _dir: common::TempDir,
}

impl NodeClient {
    fn start(gw: &Gateway, token: &str, args: &[&str]) -> NodeClient {
        let node_dir = repo().join("tests/node");
        assert!(
            node_dir.join("node_modules/eventsource").is_dir(),
            "eventsource is not installed in tests/node: run `make tools` (or .ci/install-tools)"
        );
        let dir = common::TempDir::new();
        let stderr = dir.path.join("client.stderr.log");
        let mut cmd = Command::new(tool("node"));
        cmd.arg(node_dir.join("client.mjs"))
            .arg(gw.url(""))
            .args(args)
            .env("SSE_TOKEN", token)
            .env("CLIENT_LIMIT_MS", "15000")
            .current_dir(&node_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&stderr).expect("log")));
        let (child, lines) = spawn_lines(cmd);
        NodeClient {
            child,
            lines,
            stderr,
            _dir: dir,
        }
    }

    /// The next line the client printed, as JSON; panics after 20 s or if the client ended.
    async fn line(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(20), self.lines.recv())
            .await
            .unwrap_or_else(|_| panic!("no line from client.mjs within 20s{}", self.stderr()))
            .unwrap_or_else(|| panic!("client.mjs ended{}", self.stderr()));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// The exit code, waiting at most 10 s.
    fn exit_code(&mut self) -> Option<i32> {
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("client.mjs still running{}", self.stderr());
    }

    fn stderr(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("\n--- client.mjs stderr ---\n{text}")
    }
}

impl Drop for NodeClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
