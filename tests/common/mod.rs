//! Shared test helpers: a `redis-server` per test on a free port, the real gateway binary, tokens,
//! and a small SSE client that keeps the raw bytes it read.
#![allow(dead_code)]

pub mod chaos;
pub mod deployment;
pub mod external;

use std::collections::HashMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::interfaces::ClientLike;
use futures_util::{Stream, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// 32 bytes or more: production mode refuses shorter secrets.
pub const SECRET: &str = "integration-test-secret-5c1f-8d2e4a7b";

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

pub fn sign(claims: &Value) -> String {
    sign_with(Algorithm::HS256, claims, SECRET)
}

pub fn sign_with(alg: Algorithm, claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

/// A browser token for `user` of `app`, valid for an hour.
pub fn user_token(app: &str, user: &str) -> String {
    sign(&json!({"iss": app, "sub": user, "exp": now() + 3600}))
}

pub fn publisher_token(app: &str) -> String {
    sign(&json!({"iss": app, "sub": "backend", "exp": now() + 3600, "sse_role": "publisher"}))
}

pub fn operator_token(app: &str) -> String {
    sign(&json!({"iss": app, "sub": "ops", "exp": now() + 3600, "sse_role": "operator"}))
}

/// A throwaway `redis-server`, killed when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// Extra arguments (authentication, TLS); with TLS, `port` is the TLS port.
    args: Vec<String>,
    /// The server's own directory, kept across restarts: files a server writes (a replica's
    /// synced snapshot, say) must never be loaded by another test's server.
    _dir: Option<TempDir>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Starts a server with extra arguments. `{port}` in them is replaced by the server's port;
    /// with `--tls-port {port}`, plain TCP is switched off.
    pub fn start_with(args: &[&str]) -> RedisServer {
        let port = free_port();
        let dir = TempDir::new();
        let mut args: Vec<String> = args
            .iter()
            .map(|a| a.replace("{port}", &port.to_string()))
            .collect();
        args.extend(["--dir".into(), dir.path.to_string_lossy().into_owned()]);
        let mut r = RedisServer {
            port,
            child: None,
            args,
            _dir: Some(dir),
        };
        r.spawn();
        r
    }

    /// A server that writes every command to an append-only file (fsync on each) in a directory of
    /// its own, so a kill -9 and `restart` bring back everything it acknowledged.
    pub fn start_persistent() -> RedisServer {
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
    }

    fn spawn(&mut self) {
        let tls = self.args.iter().any(|a| a == "--tls-port");
        let plain_port = if tls { 0 } else { self.port };
        let child = Command::new("redis-server")
            .args(["--port", &plain_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        self.child = Some(child);
        wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    /// A handle on a server this test did not start (one of a set's nodes, found by port): it is
    /// not stopped when dropped.
    pub fn attach(port: u16) -> RedisServer {
        RedisServer {
            port,
            child: None,
            args: Vec::new(),
            _dir: None,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server outright (SIGKILL). Its data is gone unless it is persistent.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server on the same port again (killing it first if it still runs): empty, or
    /// from the files it wrote (an append-only file, a snapshot).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts the server again as a replica of `primary`, as a node without persistence must
    /// come back under Sentinel: restarted as a primary, it is empty, and a second failover may
    /// promote it and wipe the node that holds the data.
    pub fn restart_as_replica_of(&mut self, primary: u16) {
        self.args.extend([
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.to_string(),
        ]);
        self.restart();
    }

    pub async fn client(&self) -> fred::clients::Client {
        let config = fred::types::config::Config::from_url(&self.url()).expect("url");
        let client = fred::types::Builder::from_config(config)
            .build()
            .expect("client");
        client.init().await.expect("connect to test redis");
        client
    }
}

/// A primary, a replica and three Sentinels watching them as `mymaster`, all on free ports.
pub struct SentinelSet {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinel_ports: Vec<u16>,
    sentinels: Vec<Child>,
    _dir: TempDir,
}

impl SentinelSet {
    /// Starts the five processes and waits until every Sentinel knows the replica and the other
    /// Sentinels (a failover needs both).
    pub async fn start() -> SentinelSet {
        // Without the diskless sync's default 5 s delay, the replica is in sync at once (either
        // node may be primary after a failover).
        let fast_sync = ["--repl-diskless-sync-delay", "0"];
        let primary = RedisServer::start_with(&fast_sync);
        let primary_port = primary.port.to_string();
        let mut replica_args = vec!["--replicaof", "127.0.0.1", primary_port.as_str()];
        replica_args.extend(fast_sync);
        let replica = RedisServer::start_with(&replica_args);
        let replica_ref = &replica;
        eventually(
            Duration::from_secs(20),
            "the replica is in sync",
            || async move {
                let info: String = replica_ref
                    .client()
                    .await
                    .custom(fred::cmd!("INFO"), vec!["replication"])
                    .await
                    .unwrap_or_default();
                info.contains("master_link_status:up")
            },
        )
        .await;
        let dir = TempDir::new();
        let mut sentinels = Vec::new();
        let mut sentinel_ports = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.path.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                     sentinel monitor mymaster 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds mymaster 1000\n\
                     sentinel failover-timeout mymaster 4000\n\
                     sentinel parallel-syncs mymaster 1\n",
                    dir = dir.path.display(),
                    primary = primary.port,
                ),
            )
            .expect("sentinel config");
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed");
            sentinels.push(child);
            sentinel_ports.push(port);
        }
        let set = SentinelSet {
            primary,
            replica,
            sentinel_ports,
            sentinels,
            _dir: dir,
        };
        for port in set.sentinel_ports.clone() {
            eventually(
                Duration::from_secs(20),
                "sentinels know each other and the replica",
                || async move {
                    let Some(c) = sentinel_client(port).await else {
                        return false;
                    };
                    let replicas: Vec<fred::types::Value> = c
                        .custom(fred::cmd!("SENTINEL"), vec!["REPLICAS", "mymaster"])
                        .await
                        .unwrap_or_default();
                    let others: Vec<fred::types::Value> = c
                        .custom(fred::cmd!("SENTINEL"), vec!["SENTINELS", "mymaster"])
                        .await
                        .unwrap_or_default();
                    let _ = c.quit().await;
                    replicas.len() == 1 && others.len() == 2
                },
            )
            .await;
        }
        set
    }

    /// The gateway's `REDIS_URL` for this set.
    pub fn url(&self) -> String {
        let p = &self.sentinel_ports;
        format!(
            "redis-sentinel://127.0.0.1:{}/0?sentinelServiceName=mymaster&node=127.0.0.1:{}&node=127.0.0.1:{}",
            p[0], p[1], p[2]
        )
    }

    /// The port of the node the Sentinels call primary now.
    pub async fn primary_port(&self) -> u16 {
        let c = sentinel_client(self.sentinel_ports[0])
            .await
            .expect("sentinel up");
        let addr: Vec<String> = c
            .custom(
                fred::cmd!("SENTINEL"),
                vec!["GET-MASTER-ADDR-BY-NAME", "mymaster"],
            )
            .await
            .expect("master address");
        let _ = c.quit().await;
        addr[1].parse().expect("port")
    }

    /// `SENTINEL FAILOVER`: the replica is promoted, the primary demoted.
    pub async fn failover(&self) {
        let c = sentinel_client(self.sentinel_ports[0])
            .await
            .expect("sentinel up");
        let _: fred::types::Value = c
            .custom(fred::cmd!("SENTINEL"), vec!["FAILOVER", "mymaster"])
            .await
            .expect("SENTINEL FAILOVER");
        let _ = c.quit().await;
    }

    /// Waits until the Sentinels name a primary other than `old`; returns its port.
    pub async fn wait_new_primary(&self, old: u16) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = self.primary_port().await;
            if now != old {
                return now;
            }
            assert!(Instant::now() < deadline, "no failover within 20 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for c in &mut self.sentinels {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A Redis Cluster of three primaries, each with one replica, on free ports (the cluster bus on
/// ports of its own), with a node timeout of one second so that a failover takes a few seconds.
pub struct ClusterSet {
    pub nodes: Vec<RedisServer>,
}

impl ClusterSet {
    pub async fn start() -> ClusterSet {
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let bus = free_port().to_string();
            nodes.push(RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                "--cluster-port",
                &bus,
                "--repl-diskless-sync-delay",
                "0",
            ]));
        }
        let mut create = vec!["--cluster".to_string(), "create".to_string()];
        create.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        create.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let out = Command::new("redis-cli")
            .args(&create)
            .output()
            .expect("redis-cli must be installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let set = ClusterSet { nodes };
        set.wait_healthy().await;
        set
    }

    /// Waits until every node says the cluster is ok and every primary has a replica in sync.
    pub async fn wait_healthy(&self) {
        let ports: Vec<u16> = self.nodes.iter().map(|n| n.port).collect();
        eventually(
            Duration::from_secs(30),
            "the cluster is ok, every primary with a replica in sync",
            || {
                let ports = ports.clone();
                async move {
                    let mut primaries_with_replica = 0;
                    for port in ports {
                        let Some(c) = sentinel_client(port).await else {
                            return false;
                        };
                        let info: String = c
                            .custom(fred::cmd!("CLUSTER"), vec!["INFO"])
                            .await
                            .unwrap_or_default();
                        let repl: String = c
                            .custom(fred::cmd!("INFO"), vec!["replication"])
                            .await
                            .unwrap_or_default();
                        let _ = c.quit().await;
                        if !info.contains("cluster_state:ok") {
                            return false;
                        }
                        if repl.contains("role:master") && repl.contains("state=online") {
                            primaries_with_replica += 1;
                        }
                    }
                    primaries_with_replica == 3
                }
            },
        )
        .await;
    }

    /// A gateway's `REDIS_URL` that names only node `i` (the rest is discovered).
    pub fn url(&self, i: usize) -> String {
        format!("redis-cluster://127.0.0.1:{}", self.nodes[i].port)
    }

    /// A cluster client that follows the topology.
    pub async fn client(&self) -> fred::clients::Client {
        let config = fred::types::config::Config::from_url(&self.url(0)).expect("url");
        let client = fred::types::Builder::from_config(config)
            .build()
            .expect("client");
        client.init().await.expect("connect to test cluster");
        client
    }

    /// The index of a replica of node `i` (a primary), from its `INFO replication`.
    pub async fn replica_of(&self, i: usize) -> usize {
        let c = sentinel_client(self.nodes[i].port).await.expect("node up");
        let info: String = c
            .custom(fred::cmd!("INFO"), vec!["replication"])
            .await
            .expect("INFO replication");
        let _ = c.quit().await;
        let port: u16 = info
            .lines()
            .find(|l| l.starts_with("slave0:"))
            .and_then(|l| l.split(',').find_map(|f| f.strip_prefix("port=")))
            .and_then(|p| p.parse().ok())
            .expect("a replica");
        self.nodes
            .iter()
            .position(|n| n.port == port)
            .expect("the replica is one of the set")
    }

    /// `CLUSTER FAILOVER` on node `i` (a replica): it takes its primary's slots over, and the
    /// primary, still running, becomes its replica.
    pub async fn failover_to(&self, i: usize) {
        let c = sentinel_client(self.nodes[i].port).await.expect("node up");
        let _: fred::types::Value = c
            .custom(fred::cmd!("CLUSTER"), vec!["FAILOVER"])
            .await
            .expect("CLUSTER FAILOVER");
        let _ = c.quit().await;
    }

    /// The index of the node that is primary for `key`'s slot now.
    pub async fn primary_of(&self, key: &str) -> usize {
        let slot = fred::util::redis_keyslot(key.as_bytes());
        for (i, node) in self.nodes.iter().enumerate() {
            let Some(c) = sentinel_client(node.port).await else {
                continue;
            };
            let slots: Vec<fred::types::Value> = c
                .custom(fred::cmd!("CLUSTER"), vec!["SLOTS"])
                .await
                .unwrap_or_default();
            let _ = c.quit().await;
            for range in slots {
                let fred::types::Value::Array(r) = range else {
                    continue;
                };
                let (Some(lo), Some(hi)) = (
                    r.first().and_then(|v| v.as_u64()),
                    r.get(1).and_then(|v| v.as_u64()),
                ) else {
                    continue;
                };
                let primary_port = r
                    .get(2)
                    .and_then(|n| match n {
                        fred::types::Value::Array(n) => n.get(1).and_then(|p| p.as_u64()),
                        _ => None,
                    })
                    .unwrap_or_default();
                if (lo..=hi).contains(&u64::from(slot)) {
                    return self
                        .nodes
                        .iter()
                        .position(|n| u64::from(n.port) == primary_port)
                        .unwrap_or(i);
                }
            }
        }
        panic!("no node serves slot {slot}");
    }
}

/// A client of the Sentinel on `port`, or `None` while it does not answer.
async fn sentinel_client(port: u16) -> Option<fred::clients::Client> {
    let config =
        fred::types::config::Config::from_url(&format!("redis://127.0.0.1:{port}")).ok()?;
    let client = fred::types::Builder::from_config(config).build().ok()?;
    tokio::time::timeout(Duration::from_secs(2), client.init())
        .await
        .ok()?
        .ok()?;
    Some(client)
}

/// The registry's keys in Redis, sorted: every key but the durable history's.
pub async fn registry_keys(r: &fred::clients::Client) -> Vec<String> {
    let mut k: Vec<String> = r.custom(fred::cmd!("KEYS"), vec!["*"]).await.unwrap();
    k.retain(|key| !key.contains(":history:"));
    k.sort();
    k
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A gateway on a free port (and its operator listener on another), stopped outright when dropped.
///
/// Two tiers: by default `sse_gateway::run` on a runtime of its own inside the test process (over
/// real sockets, against real Redis); with [`GatewayBuilder::process`], the real binary, for what
/// needs a process: signals, exit codes, logs, CPU time, open-file limits.
pub struct Gateway {
    pub port: u16,
    /// The operator listener's port (`/metrics`, `/health`, `/ready`), on 127.0.0.1.
    pub operator_port: u16,
    pub instance: String,
    child: Option<Child>,
    task: Option<InProcess>,
    log: PathBuf,
    _dir: TempDir,
}

/// A gateway run in this process: its runtime, and the signal that starts its graceful shutdown.
struct InProcess {
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: std::sync::mpsc::Receiver<()>,
}

pub struct GatewayBuilder {
    env: HashMap<String, String>,
    port: Option<u16>,
    open_files: Option<u64>,
    process: bool,
}

impl GatewayBuilder {
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.insert(k.into(), v.into());
        self
    }

    pub fn redis(self, r: &RedisServer) -> Self {
        self.env("REDIS_URL", &r.url())
    }

    /// Runs the process with this open-file limit (soft and hard).
    pub fn open_files(mut self, n: u64) -> Self {
        self.open_files = Some(n);
        self.process()
    }

    /// Runs the real binary rather than in this process.
    pub fn process(mut self) -> Self {
        self.process = true;
        self
    }

    /// Listens on `port` rather than a free one: to start a process where a stopped one listened.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    pub async fn start(self) -> Gateway {
        let g = if self.process {
            self.spawn()
        } else {
            self.run_here()
        };
        g.wait_healthy().await;
        g
    }

    /// The settings every test gateway gets, then the test's own.
    fn settings(&self, port: u16, operator_addr: &str, instance: &str) -> HashMap<String, String> {
        let mut vars: HashMap<String, String> = [
            ("APP_HOST", "127.0.0.1".to_string()),
            ("APP_PORT", port.to_string()),
            ("OPERATOR_ADDR", operator_addr.to_string()),
            ("JWT_SECRET", SECRET.to_string()),
            ("APP_MODE", "debug".to_string()),
            ("INSTANCE_ID", instance.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        vars.extend(self.env.clone());
        vars
    }

    /// The operator address (a free port unless the test set one) and its port.
    fn operator_addr(&self) -> (String, u16) {
        // The default operator address is one fixed port: parallel gateways need one each.
        let addr = self
            .env
            .get("OPERATOR_ADDR")
            .cloned()
            .unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        let port = addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(0);
        (addr, port)
    }

    /// Runs `sse_gateway::run` on a runtime of its own (two workers, as on the CI machine).
    fn run_here(self) -> Gateway {
        let port = self.port.unwrap_or_else(free_port);
        let (operator_addr, operator_port) = self.operator_addr();
        let instance = format!("gw-{port}");
        let vars = self.settings(port, &operator_addr, &instance);
        let config = sse_gateway::config::Config::from_lookup(|k| vars.get(k).cloned())
            .unwrap_or_else(|e| panic!("test gateway settings: {e}"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the gateway");
        let (public, operator) = {
            let _in = runtime.enter();
            let public = sse_gateway::http::server::listen(config.listen).expect("listen");
            let operator = config.operator_listen.map(|addr| {
                let l = std::net::TcpListener::bind(addr).expect("operator listen");
                l.set_nonblocking(true).expect("nonblocking");
                tokio::net::TcpListener::from_std(l).expect("operator listener")
            });
            (public, operator)
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            let listeners = sse_gateway::Listeners { public, operator };
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = sse_gateway::run(config, listeners, shutdown).await {
                eprintln!("gateway: {e}");
            }
            let _ = done_tx.send(());
        });
        Gateway {
            port,
            operator_port,
            instance,
            child: None,
            task: Some(InProcess {
                runtime: Some(runtime),
                stop: Some(stop),
                done,
            }),
            log: PathBuf::new(),
            _dir: TempDir::new(),
        }
    }

    /// Starts the process without waiting for it to be healthy.
    pub fn spawn(self) -> Gateway {
        let port = self.port.unwrap_or_else(free_port);
        let (operator_addr, operator_port) = self.operator_addr();
        let dir = TempDir::new();
        let log = dir.path.join("gateway.log");
        let instance = format!("gw-{port}");
        let bin = env!("CARGO_BIN_EXE_sse-gateway");
        let mut cmd = match self.open_files {
            None => Command::new(bin),
            Some(n) => {
                let mut sh = Command::new("/bin/sh");
                sh.args(["-c", &format!("ulimit -n {n} && exec \"$0\""), bin]);
                sh
            }
        };
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .current_dir(&dir.path);
        for (k, v) in self.settings(port, &operator_addr, &instance) {
            cmd.env(k, v);
        }
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn gateway");
        Gateway {
            port,
            operator_port,
            instance,
            child: Some(child),
            task: None,
            log,
            _dir: dir,
        }
    }
}

impl Gateway {
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder {
            env: HashMap::new(),
            port: None,
            open_files: None,
            process: false,
        }
    }

    pub async fn embedded() -> Gateway {
        Gateway::builder().start().await
    }

    pub async fn with_redis(r: &RedisServer) -> Gateway {
        Gateway::builder().redis(r).start().await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// A URL on the operator listener: `/metrics` is only there.
    pub fn operator_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.operator_port, path)
    }

    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(r) = http().get(self.url("/health")).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not start:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the process logged; a gateway run in this process has no log of its own (a test that
    /// reads logs asks for [`GatewayBuilder::process`]).
    pub fn logs(&self) -> String {
        if self.task.is_some() {
            return "(run in the test process: no log; see GatewayBuilder::process)".into();
        }
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        assert!(
            self.task.is_none(),
            "signals need a process: GatewayBuilder::process"
        );
        if let Some(c) = &self.child {
            let status = Command::new("kill")
                .args([&format!("-{sig}"), &c.id().to_string()])
                .status()
                .expect("kill");
            assert!(status.success());
        }
    }

    /// Waits for the process to exit, returning its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        assert!(
            self.task.is_none(),
            "exit codes need a process: GatewayBuilder::process"
        );
        let mut child = self.child.take()?;
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("gateway did not exit within {within:?}:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the gateway outright: SIGKILL for a process; for one in this process, its runtime is
    /// dropped with every task (sockets close, nothing is drained or cleaned up).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut t) = self.task.take()
            && let Some(rt) = t.runtime.take()
        {
            rt.shutdown_background();
        }
    }

    /// Starts a graceful shutdown, as SIGTERM does, and waits (at most `within`) until it is done.
    pub fn shut_down(&mut self, within: Duration) {
        if self.child.is_some() {
            self.signal("TERM");
            let _ = self.wait_exit(within);
            return;
        }
        if let Some(t) = &mut self.task {
            if let Some(stop) = t.stop.take() {
                let _ = stop.send(());
            }
            t.done
                .recv_timeout(within)
                .expect("the gateway shut down in time");
        }
        self.kill();
    }

    /// CPU time (user + system, every thread) the process has used so far, from `/proc`.
    pub fn cpu_seconds(&self) -> f64 {
        assert!(
            self.task.is_none(),
            "CPU time needs a process: GatewayBuilder::process"
        );
        let pid = self.child.as_ref().expect("gateway running").id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        let ticks: f64 =
            fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
        // SAFETY: sysconf only reads a system constant.
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    /// Publishes over HTTP with a publisher token of `app`.
    pub async fn publish(&self, app: &str, body: Value) -> reqwest::Response {
        http()
            .post(self.url("/publish"))
            .bearer_auth(publisher_token(app))
            .json(&body)
            .send()
            .await
            .expect("publish request")
    }

    /// Publishes durably over HTTP (it must succeed) and returns the event's id.
    pub async fn publish_id(&self, app: &str, body: Value) -> String {
        let r = self.publish(app, body).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.expect("publish answer");
        v["ids"][0].as_str().expect("an event id").to_string()
    }

    /// A `GET /sse` request to this gateway, to be completed (token, headers) by the caller.
    pub fn sse(&self) -> reqwest::RequestBuilder {
        http().get(self.url("/sse"))
    }

    /// Opens `/sse` with `token` as the bearer, whatever the answer (see [`Gateway::connect`]).
    pub async fn open(&self, token: &str) -> SseClient {
        SseClient::open(self.sse().bearer_auth(token)).await
    }

    /// Opens `/sse` for a user with the token in the Authorization header.
    pub async fn connect(&self, app: &str, user: &str) -> SseClient {
        let c = self.open(&user_token(app, user)).await;
        assert_eq!(c.status, 200, "connect {app}/{user}");
        c
    }

    /// Opens `/sse` for a user resuming after `last` (sent as `Last-Event-ID`).
    pub async fn resume(&self, app: &str, user: &str, last: &str) -> SseClient {
        let c = SseClient::open(
            self.sse()
                .bearer_auth(user_token(app, user))
                .header("last-event-id", last),
        )
        .await;
        assert_eq!(c.status, 200, "resume {app}/{user} from {last}");
        c
    }

    /// `GET` of a listing (`/connections/...`) with `token`: its status and JSON body (`Null` when
    /// empty, as for a 204).
    pub async fn list(&self, path: &str, token: &str) -> (u16, serde_json::Value) {
        let r = http()
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let body = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        };
        (status, body)
    }

    /// Scrapes `/metrics` (on the operator listener) and returns the value of the first sample whose
    /// line starts with `prefix`.
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        let text = http()
            .get(self.operator_url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// [`Gateway::metric`], read again until it is `value` (for at most 5 s); returns what it
    /// read last.
    pub async fn metric_reaches(&self, prefix: &str, value: f64) -> Option<f64> {
        poll_until(|| self.metric(prefix), |m| *m == Some(value)).await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A raw `GET /sse` for `user` of `app`, request sent and nothing read: for clients that vanish,
/// stall or fall behind. `recv_buffer` shrinks the socket's receive buffer, so it fills sooner.
pub async fn raw_sse_request(
    port: u16,
    app: &str,
    user: &str,
    recv_buffer: Option<u32>,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let mut stream = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    let req = format!(
        "GET /sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        user_token(app, user)
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    stream
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// One dispatched SSE event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
    pub retry: Option<u64>,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("event data is JSON")
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A minimal EventSource: parses the stream as the WHATWG spec does and keeps every raw byte.
pub struct SseClient {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    stream: ByteStream,
    buf: String,
    /// Where to resume looking for the end of an event in `buf`.
    scanned: usize,
    pub raw: String,
    pub ended: bool,
    /// The WHATWG "last event ID string": set by every complete block with an `id:` field, with
    /// or without data (a browser sends it back as `Last-Event-ID`).
    pub last_event_id: Option<String>,
    /// The last `retry:` value, even from a block without data.
    pub retry: Option<u64>,
}

impl SseClient {
    pub async fn open(req: reqwest::RequestBuilder) -> SseClient {
        SseClient::try_open(req).await.expect("sse request")
    }

    /// Like `open`, but a connection error is returned rather than a panic.
    pub async fn try_open(req: reqwest::RequestBuilder) -> reqwest::Result<SseClient> {
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        Ok(SseClient {
            status,
            headers,
            stream: Box::pin(resp.bytes_stream()),
            buf: String::new(),
            scanned: 0,
            raw: String::new(),
            ended: false,
            last_event_id: None,
            retry: None,
        })
    }

    pub fn connection_id(&self) -> String {
        self.headers
            .get("x-connection-id")
            .and_then(|v| v.to_str().ok())
            .expect("x-connection-id")
            .to_string()
    }

    /// The next event with data (pings included), or `None` if the stream ended or `within` passed.
    pub async fn next_within(&mut self, within: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buf[self.scanned..].find("\n\n") {
                let end = self.scanned + end;
                let block: String = self.buf.drain(..end + 2).collect();
                self.scanned = 0;
                let (ev, dispatch) = parse_block(&block);
                if ev.id.is_some() {
                    self.last_event_id.clone_from(&ev.id);
                }
                if ev.retry.is_some() {
                    self.retry = ev.retry;
                }
                if dispatch {
                    return Some(ev);
                }
                continue;
            }
            self.scanned = self.buf.len().saturating_sub(1);
            if self.ended {
                return None;
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return None,
                Ok(None) | Ok(Some(Err(_))) => self.ended = true,
                Ok(Some(Ok(chunk))) => {
                    let text = String::from_utf8_lossy(&chunk).replace("\r\n", "\n");
                    self.raw.push_str(&text);
                    self.buf.push_str(&text);
                }
            }
        }
    }

    /// The next event that is not a ping; panics after 10 s.
    pub async fn next(&mut self) -> Event {
        loop {
            let ev = self
                .next_within(Duration::from_secs(10))
                .await
                .unwrap_or_else(|| {
                    let tail: String = self.raw.chars().rev().take(300).collect();
                    let tail: String = tail.chars().rev().collect();
                    panic!(
                        "no event within 10s (stream ended: {}); last bytes: {tail:?}",
                        self.ended
                    )
                });
            if ev.event != "ping" {
                return ev;
            }
        }
    }

    /// Asserts that no non-ping event arrives within `within`.
    pub async fn expect_silence(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while let Some(ev) = self
            .next_within(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            assert_eq!(ev.event, "ping", "unexpected event {ev:?}");
        }
    }

    /// Reads until the server ends the stream; returns the events seen on the way.
    pub async fn until_end(&mut self, within: Duration) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        while let Some(ev) = self
            .next_within(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            seen.push(ev);
        }
        assert!(self.ended, "stream still open after {within:?}: {seen:?}");
        seen
    }
}

/// One event block, as the WHATWG parser reads it; the flag says whether it is dispatched (no data
/// line, no event, though its `id:` and `retry:` still count).
fn parse_block(block: &str) -> (Event, bool) {
    let mut ev = Event::default();
    let mut data: Option<String> = None;
    for line in block.lines() {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (name, value) = match line.split_once(':') {
            Some((n, v)) => (n, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match name {
            "id" => ev.id = Some(value.to_string()),
            "event" => ev.event = value.to_string(),
            "retry" => ev.retry = value.parse().ok(),
            "data" => {
                let d = data.get_or_insert_with(String::new);
                d.push_str(value);
                d.push('\n');
            }
            _ => {}
        }
    }
    let Some(mut data) = data else {
        return (ev, false);
    };
    data.pop();
    if ev.event.is_empty() {
        ev.event = "message".into();
    }
    ev.data = data;
    (ev, true)
}

/// Waits until `up` holds for `child`, a server just spawned; panics with `log()` if it exits first
/// or `within` passes.
pub fn wait_for_start(
    child: &mut Child,
    what: &str,
    within: Duration,
    mut up: impl FnMut() -> bool,
    log: impl Fn() -> String,
) {
    let deadline = Instant::now() + within;
    while !up() {
        let exited = child.try_wait().ok().flatten();
        assert!(
            exited.is_none() && Instant::now() < deadline,
            "{what} did not start ({exited:?}):\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Probes every 50 ms, for at most 5 s, until `done` holds for the probed value, and returns the
/// last value (the caller asserts on it, with its own message).
pub async fn poll_until<T, F, Fut>(mut probe: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut value = probe().await;
    for _ in 0..100 {
        if done(&value) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        value = probe().await;
    }
    value
}

/// Polls an async condition every 50 ms until it holds; panics with `what` after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A temporary directory removed when dropped.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        let path = std::env::temp_dir().join(format!("sse-gw-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
