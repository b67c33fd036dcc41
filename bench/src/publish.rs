//! Publishing: a pacer that emits numbered, timestamped messages at a set rate (or as one burst) to
//! random users' channels or to every app's broadcast channel, and the transports that carry them:
//! Redis `PUBLISH` over a pipelined RESP connection, and HTTP POST in the gateway, Nchan or Pushpin
//! style over a few keep-alive connections.
//!
//! Every message's data is `{"seq":S,"ts_ns":T}` (unicast) or `{"bseq":S,"ts_ns":T}` (broadcast):
//! `S` counts 1, 2, 3, ... per channel so each stream can tell lost from duplicated messages, and
//! `T` is the wall-clock time the message was handed to the transport, so any backlog inside the
//! publisher counts as latency instead of hiding it.
//!
//! The gateway's durable path (a Redis Function that writes history, then publishes) rides the
//! Redis transport as another [`RedisCommand`], or HTTP as the `gateway-durable` style. Another
//! transport is one more [`Transport`] variant: it gets the target, the message number and the data.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::cli::{HttpStyle, Pattern};
use crate::conn::{lock, unix_ns};
use crate::http::{BodyDecoder, BodyState, HeadReader};
use crate::report::{PublishSummary, round};
use crate::target::{Layout, Url, render};
use crate::token::Minter;

/// How many messages each channel received: `user[u]` for user channels, `app[a]` for broadcast.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SentCounts {
    pub user: Vec<u32>,
    pub app: Vec<u32>,
}

/// What to publish.
pub struct Plan {
    pub pattern: Pattern,
    pub messages: u64,
    /// Messages per second; 0 sends everything at once.
    pub rate: f64,
    pub max_duration: Duration,
    pub pad: usize,
    pub seed: u64,
}

/// Replies and errors, counted by the transports' reader tasks.
#[derive(Default)]
pub struct Acks {
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    pub reasons: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl Acks {
    fn error(&self, reason: impl Into<String>) {
        self.errors_n(reason, 1);
    }
    fn errors_n(&self, reason: impl Into<String>, n: u64) {
        self.errors.fetch_add(n, Relaxed);
        *lock(&self.reasons).entry(reason.into()).or_default() += n;
    }
    fn done(&self) -> u64 {
        self.ok.load(Relaxed) + self.errors.load(Relaxed)
    }
}

/// Where a message goes.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    User(u32),
    App(u32),
}

/// The transports. Each takes messages one by one and writes them out on `flush`.
pub enum Transport {
    /// Redis `PUBLISH`, or the gateway's durable `FCALL` (see [`RedisCommand`]).
    Redis(Redis),
    Http(Http),
}

impl Transport {
    fn push(&mut self, target: Target, n: u64, data: &str) {
        match self {
            Transport::Redis(r) => r.push(target, n, data),
            Transport::Http(h) => h.push(target, n, data),
        }
    }
    async fn flush(&mut self) -> Result<(), String> {
        match self {
            Transport::Redis(r) => r.flush().await,
            Transport::Http(h) => h.flush().await,
        }
    }
    fn acks(&self) -> &Arc<Acks> {
        match self {
            Transport::Redis(r) => &r.acks,
            Transport::Http(h) => &h.acks,
        }
    }
    /// Waits (bounded) for the replies to everything sent, then closes.
    async fn finish(self, sent: u64, within: Duration) {
        let acks = self.acks().clone();
        match self {
            Transport::Redis(r) => r.close().await,
            Transport::Http(h) => h.close(within).await,
        }
        let deadline = Instant::now() + within;
        while acks.done() < sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Runs the plan; returns the per-channel counts and the summary.
pub async fn run(
    plan: &Plan,
    mut transport: Transport,
    layout: &Layout,
    mode: &str,
) -> (SentCounts, PublishSummary, Vec<String>) {
    let mut warnings = Vec::new();
    let mut counts = SentCounts {
        user: vec![0; layout.users as usize],
        app: vec![0; layout.apps as usize],
    };
    let mut rng = XorShift::new(plan.seed);
    let pad = "x".repeat(plan.pad);
    let start = Instant::now();
    let start_unix = unix_ns();
    let deadline = start + plan.max_duration;
    let mut n: u64 = 0;
    let mut ops: u64 = 0;
    let mut data = String::with_capacity(64 + pad.len());
    // Batches bound the time between flushes when catching up or bursting.
    const BATCH: u64 = 512;
    while n < plan.messages {
        let now = Instant::now();
        if now >= deadline {
            warnings.push(format!(
                "publish: stopped at the {:.0} s limit after {n} of {} messages",
                plan.max_duration.as_secs_f64(),
                plan.messages
            ));
            break;
        }
        let due = if plan.rate > 0.0 {
            let by_now = ((now - start).as_secs_f64() * plan.rate) as u64 + 1;
            by_now.min(plan.messages)
        } else {
            plan.messages
        };
        let mut k = 0;
        while n < due && k < BATCH {
            n += 1;
            k += 1;
            match plan.pattern {
                Pattern::Unicast => {
                    let u = (rng.next() % layout.users as u64) as usize;
                    counts.user[u] += 1;
                    fill_data(&mut data, "seq", counts.user[u], &pad);
                    transport.push(Target::User(u as u32), n, &data);
                    ops += 1;
                }
                Pattern::Broadcast => {
                    for a in 0..layout.apps as usize {
                        counts.app[a] += 1;
                        fill_data(&mut data, "bseq", counts.app[a], &pad);
                        transport.push(Target::App(a as u32), n, &data);
                        ops += 1;
                    }
                }
            }
        }
        if let Err(e) = transport.flush().await {
            warnings.push(format!("publish: transport failed: {e}"));
            break;
        }
        if n < due {
            // Behind schedule: go on at once, but let the streams' tasks run.
            tokio::task::yield_now().await;
            continue;
        }
        if plan.rate > 0.0 && n < plan.messages {
            let next = start + Duration::from_secs_f64(n as f64 / plan.rate);
            tokio::time::sleep_until(next.into()).await;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let end_unix = unix_ns();
    let acks = transport.acks().clone();
    transport.finish(ops, Duration::from_secs(10)).await;
    if acks.done() < ops {
        warnings.push(format!(
            "publish: {} of {ops} operations never got a reply",
            ops - acks.done()
        ));
    }
    let summary = PublishSummary {
        mode: mode.to_string(),
        pattern: match plan.pattern {
            Pattern::Unicast => "unicast",
            Pattern::Broadcast => "broadcast",
        }
        .into(),
        requested: plan.messages,
        sent: ops,
        acknowledged: acks.ok.load(Relaxed),
        errors: acks.errors.load(Relaxed),
        errors_by_reason: lock(&acks.reasons).clone(),
        rate_requested: plan.rate,
        // Messages (not per-app operations) per second, comparable with the requested rate.
        rate_achieved: if secs > 0.0 {
            round(n as f64 / secs, 1)
        } else {
            0.0
        },
        secs: round(secs, 3),
        start_unix_ns: start_unix,
        end_unix_ns: end_unix,
        data_bytes: data.len(),
    };
    (counts, summary, warnings)
}

fn fill_data(buf: &mut String, key: &str, seq: u32, pad: &str) {
    use std::fmt::Write;
    buf.clear();
    let _ = write!(buf, "{{\"{key}\":{seq},\"ts_ns\":{}", unix_ns());
    if !pad.is_empty() {
        let _ = write!(buf, ",\"pad\":\"{pad}\"");
    }
    buf.push('}');
}

/// Deterministic target choice, the same for every run with the same seed.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Channel names per user and per app, rendered once.
pub struct Channels {
    pub user: Vec<String>,
    pub app: Vec<String>,
}

impl Channels {
    pub fn new(layout: &Layout, user_tpl: &str, app_tpl: &str) -> Channels {
        Channels {
            user: (0..layout.users)
                .map(|u| {
                    let app = layout.app_name(layout.app_of(u));
                    render(user_tpl, &app, &layout.user_name(u), 0)
                })
                .collect(),
            app: (0..layout.apps)
                .map(|a| render(app_tpl, &layout.app_name(a), "", 0))
                .collect(),
        }
    }
    fn name(&self, t: Target) -> &str {
        match t {
            Target::User(u) => &self.user[u as usize],
            Target::App(a) => &self.app[a as usize],
        }
    }
}

/// Most commands written but not yet answered before the pacer waits: bounds the tool's memory
/// if Redis falls behind.
const MAX_IN_FLIGHT: u64 = 100_000;

/// Which Redis command carries a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisCommand {
    /// `PUBLISH <channel> {"id","type","data"}`.
    Publish,
    /// `FCALL sse_publish 0 <app> <user or ""> {"type","data"}`: sse-gateway's durable path.
    Durable,
    /// `FCALL sse_publish 1 {<app>} <app> <user or ""> {"type","data"}`: the durable path in its
    /// Redis Cluster form, the application's hash tag declared as the one key (the connection
    /// must go to the primary that holds its slot).
    DurableKeyed,
}

/// Redis `PUBLISH` (or the durable `FCALL`) over one pipelined connection; a reader task counts
/// the replies.
pub struct Redis {
    writer: OwnedWriteHalf,
    buf: Vec<u8>,
    command: RedisCommand,
    layout: Layout,
    channels: Channels,
    event_type: String,
    written: u64,
    acks: Arc<Acks>,
    reader: JoinHandle<()>,
}

impl Redis {
    pub async fn connect(
        addr: SocketAddr,
        password: Option<String>,
        command: RedisCommand,
        layout: &Layout,
        channels: Channels,
        event_type: &str,
    ) -> Result<Redis, String> {
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .map_err(|_| format!("redis {addr}: connect timed out"))?
            .map_err(|e| format!("redis {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (read, writer) = stream.into_split();
        let acks = Arc::new(Acks::default());
        let reader = tokio::spawn(read_replies(read, acks.clone()));
        let mut r = Redis {
            writer,
            buf: Vec::with_capacity(64 * 1024),
            command,
            layout: layout.clone(),
            channels,
            event_type: event_type.to_string(),
            written: 0,
            acks,
            reader,
        };
        if let Some(p) = password {
            resp_command(&mut r.buf, &[b"AUTH", p.as_bytes()]);
            r.written += 1;
            r.flush().await?;
            // The AUTH reply is counted like a publish reply; do not count it as one.
            let deadline = Instant::now() + Duration::from_secs(5);
            while r.acks.done() < 1 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            if r.acks.errors.load(Relaxed) > 0 {
                return Err("redis: AUTH failed".into());
            }
            r.acks.ok.store(0, Relaxed);
            r.written = 0;
        }
        Ok(r)
    }

    fn push(&mut self, target: Target, n: u64, data: &str) {
        let et = &self.event_type;
        match self.command {
            RedisCommand::Publish => {
                let envelope = format!("{{\"id\":\"{n}\",\"type\":\"{et}\",\"data\":{data}}}");
                let channel = self.channels.name(target);
                resp_command(
                    &mut self.buf,
                    &[b"PUBLISH", channel.as_bytes(), envelope.as_bytes()],
                );
            }
            RedisCommand::Durable | RedisCommand::DurableKeyed => {
                // The function assigns the id; the envelope must not carry one.
                let envelope = format!("{{\"type\":\"{et}\",\"data\":{data}}}");
                let (app, user) = match target {
                    Target::User(u) => (self.layout.app_of(u), self.layout.user_name(u)),
                    Target::App(a) => (a, String::new()),
                };
                let app = self.layout.app_name(app);
                let keyed = self.command == RedisCommand::DurableKeyed;
                durable_command(&mut self.buf, keyed, &app, &user, &envelope);
            }
        }
        self.written += 1;
    }

    async fn flush(&mut self) -> Result<(), String> {
        if !self.buf.is_empty() {
            self.writer
                .write_all(&self.buf)
                .await
                .map_err(|e| format!("redis write: {e}"))?;
            self.buf.clear();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.written.saturating_sub(self.acks.done()) > MAX_IN_FLIGHT {
            if Instant::now() > deadline || self.reader.is_finished() {
                return Err("redis stopped answering".into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    async fn close(mut self) {
        let _ = self.writer.flush().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.acks.done() < self.written && Instant::now() < deadline {
            if self.reader.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.reader.abort();
    }
}

/// Appends one durable publish: `FCALL sse_publish 0 <app> ...`, or with `keyed` the cluster form
/// `FCALL sse_publish 1 {<app>} <app> ...`.
fn durable_command(buf: &mut Vec<u8>, keyed: bool, app: &str, user: &str, envelope: &str) {
    let tag = format!("{{{app}}}");
    let mut parts: Vec<&[u8]> = vec![b"FCALL", b"sse_publish"];
    if keyed {
        parts.extend([b"1" as &[u8], tag.as_bytes()]);
    } else {
        parts.push(b"0");
    }
    parts.extend([app.as_bytes(), user.as_bytes(), envelope.as_bytes()]);
    resp_command(buf, &parts);
}

/// Appends one RESP array-of-bulk-strings command.
pub fn resp_command(buf: &mut Vec<u8>, parts: &[&[u8]]) {
    buf.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
    for p in parts {
        buf.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        buf.extend_from_slice(p);
        buf.extend_from_slice(b"\r\n");
    }
}

/// Counts RESP replies: integers, strings and arrays (the durable `FCALL` answers `[id, n]`) are
/// acks; errors are counted by their first word (`-ERR`, `-NOSCRIPT`, ...). A reply type this
/// reader does not know ends it.
async fn read_replies(mut read: tokio::net::tcp::OwnedReadHalf, acks: Arc<Acks>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match read.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        let mut at = 0;
        while let Some(reply) = parse_reply(&pending[at..]) {
            match reply {
                Reply::Ok(used) => {
                    acks.ok.fetch_add(1, Relaxed);
                    at += used;
                }
                Reply::Error(used, word) => {
                    acks.error(format!("redis_{word}"));
                    at += used;
                }
                Reply::Unsupported => {
                    acks.error("redis_unsupported_reply");
                    return;
                }
            }
        }
        pending.drain(..at);
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Ok(usize),
    Error(usize, String),
    Unsupported,
}

/// Deepest array nesting looked into (a reply is one level deep; this bounds the recursion).
const MAX_DEPTH: u32 = 4;

/// One complete reply at the start of `b`, or `None` if more bytes are needed.
fn parse_reply(b: &[u8]) -> Option<Reply> {
    parse_value(b, 0)
}

fn parse_value(b: &[u8], depth: u32) -> Option<Reply> {
    let eol = b.windows(2).position(|w| w == b"\r\n")?;
    let line = &b[..eol];
    let used = eol + 2;
    match line.first()? {
        b'*' if depth < MAX_DEPTH => {
            let count: i64 = std::str::from_utf8(&line[1..]).ok()?.parse().ok()?;
            let mut at = used;
            for _ in 0..count.max(0) {
                match parse_value(&b[at..], depth + 1)? {
                    Reply::Ok(n) | Reply::Error(n, _) => at += n,
                    Reply::Unsupported => return Some(Reply::Unsupported),
                }
            }
            Some(Reply::Ok(at))
        }
        b':' | b'+' | b'_' => Some(Reply::Ok(used)),
        b'-' => {
            let word = line[1..]
                .split(|c| *c == b' ')
                .next()
                .map(|w| String::from_utf8_lossy(w).to_ascii_lowercase())
                .unwrap_or_default();
            Some(Reply::Error(used, word))
        }
        b'$' => {
            let len: i64 = std::str::from_utf8(&line[1..]).ok()?.parse().ok()?;
            if len < 0 {
                return Some(Reply::Ok(used));
            }
            let total = used + len as usize + 2;
            (b.len() >= total).then_some(Reply::Ok(total))
        }
        _ => Some(Reply::Unsupported),
    }
}

/// How to publish over HTTP.
pub struct HttpOptions<'a> {
    pub url: Url,
    pub style: HttpStyle,
    /// Parallel keep-alive connections.
    pub conns: usize,
    /// Mints the gateway style's publisher tokens.
    pub minter: Option<&'a Minter>,
    pub publisher_user: &'a str,
    pub event_type: &'a str,
}

/// HTTP POST publishing over a few keep-alive connections, one request at a time each.
pub struct Http {
    workers: Vec<mpsc::Sender<Request>>,
    handles: Vec<JoinHandle<()>>,
    next: usize,
    batch: Vec<Request>,
    /// Pushpin style: GRIP items waiting for the next flush, sent together in one request.
    items: Vec<serde_json::Value>,
    style: HttpStyle,
    url: Url,
    channels: Channels,
    layout: Layout,
    /// Gateway style: `Authorization` header value per app.
    app_auth: Vec<String>,
    event_type: String,
    acks: Arc<Acks>,
}

impl Http {
    pub fn start(o: HttpOptions<'_>, channels: Channels, layout: &Layout) -> Result<Http, String> {
        let HttpOptions {
            url,
            style,
            conns,
            minter,
            publisher_user,
            event_type,
        } = o;
        let acks = Arc::new(Acks::default());
        let app_auth = match (style, minter) {
            (HttpStyle::Gateway | HttpStyle::GatewayDurable, Some(m)) => (0..layout.apps)
                .map(|a| {
                    m.mint(&layout.app_name(a), publisher_user, Some("publisher"))
                        .map(|t| format!("Authorization: Bearer {t}\r\n"))
                })
                .collect::<Result<Vec<_>, _>>()?,
            (HttpStyle::Gateway | HttpStyle::GatewayDurable, None) => {
                return Err("gateway publishing needs --secret".into());
            }
            _ => Vec::new(),
        };
        let mut workers = Vec::new();
        let mut handles = Vec::new();
        for _ in 0..conns {
            // A very short queue per connection: when the server is slow the pacer feels it at
            // once, and its achieved rate says so.
            let (tx, rx) = mpsc::channel(2);
            workers.push(tx);
            handles.push(tokio::spawn(http_worker(url.addr, rx, acks.clone())));
        }
        Ok(Http {
            workers,
            handles,
            next: 0,
            batch: Vec::new(),
            items: Vec::new(),
            style,
            url,
            channels,
            layout: layout.clone(),
            app_auth,
            event_type: event_type.to_string(),
            acks,
        })
    }

    fn push(&mut self, target: Target, n: u64, data: &str) {
        let et = &self.event_type;
        let (path, body, auth) = match self.style {
            HttpStyle::Gateway | HttpStyle::GatewayDurable => {
                let (app, who) = match target {
                    Target::User(u) => (
                        self.layout.app_of(u),
                        format!("\"user\":\"{}\"", self.layout.user_name(u)),
                    ),
                    Target::App(a) => (a, "\"broadcast\":true".to_string()),
                };
                let body = if self.style == HttpStyle::Gateway {
                    format!(
                        "{{{who},\"type\":\"{et}\",\"id\":\"{n}\",\"durable\":false,\"data\":{data}}}"
                    )
                } else {
                    format!("{{{who},\"type\":\"{et}\",\"data\":{data}}}")
                };
                let auth = self.app_auth.get(app as usize).cloned().unwrap_or_default();
                (self.url.path.clone(), body, auth)
            }
            HttpStyle::Nchan => {
                let path = self
                    .url
                    .path
                    .replace("{channel}", self.channels.name(target));
                (
                    path,
                    data.to_string(),
                    format!("X-EventSource-Event: {et}\r\n"),
                )
            }
            HttpStyle::Pushpin => {
                // Pushpin's API takes many items per request, as a real publisher would send them.
                let content = format!("id: {n}\nevent: {et}\ndata: {data}\n\n");
                self.items.push(serde_json::json!({
                    "channel": self.channels.name(target),
                    "formats": {"http-stream": {"content": content}},
                }));
                return;
            }
        };
        self.batch.push(Request {
            bytes: http_post(&path, &self.url.host_header, &auth, &body),
            messages: 1,
        });
    }

    async fn flush(&mut self) -> Result<(), String> {
        const ITEMS_PER_REQUEST: usize = 100;
        for chunk in self.items.chunks(ITEMS_PER_REQUEST) {
            let body = serde_json::json!({ "items": chunk }).to_string();
            self.batch.push(Request {
                bytes: http_post(&self.url.path, &self.url.host_header, "", &body),
                messages: chunk.len() as u64,
            });
        }
        self.items.clear();
        for req in self.batch.drain(..) {
            let i = self.next % self.workers.len();
            self.next = self.next.wrapping_add(1);
            self.workers[i]
                .send(req)
                .await
                .map_err(|_| "every HTTP publish connection failed".to_string())?;
        }
        Ok(())
    }

    async fn close(self, within: Duration) {
        drop(self.workers);
        for h in self.handles {
            let _ = tokio::time::timeout(within, h).await;
        }
    }
}

/// One HTTP request ready to write, carrying `messages` publish operations.
struct Request {
    bytes: Vec<u8>,
    messages: u64,
}

fn http_post(path: &str, host: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Sends queued requests on one keep-alive connection, opening a new one when the server closed
/// it (Pushpin's publish endpoint closes after every response). After many connect failures in a
/// row the remaining requests are only counted as errors, so a dead server never stalls the run.
async fn http_worker(addr: SocketAddr, mut rx: mpsc::Receiver<Request>, acks: Arc<Acks>) {
    const MAX_CONNECT_FAILURES: u32 = 20;
    let mut stream: Option<TcpStream> = None;
    let mut failures = 0u32;
    let mut buf = vec![0u8; 16 * 1024];
    while let Some(req) = rx.recv().await {
        if stream.is_none() {
            if failures >= MAX_CONNECT_FAILURES {
                acks.errors_n("http_connect_failed", req.messages);
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    stream = Some(s);
                    failures = 0;
                }
                _ => {
                    failures += 1;
                    acks.errors_n("http_connect_failed", req.messages);
                    continue;
                }
            }
        }
        let Some(s) = stream.as_mut() else { continue };
        let r =
            tokio::time::timeout(Duration::from_secs(10), exchange(s, &req.bytes, &mut buf)).await;
        match r {
            Ok(Ok((status, keep))) => {
                if (200..300).contains(&status) {
                    acks.ok.fetch_add(req.messages, Relaxed);
                } else {
                    acks.errors_n(format!("http_{status}"), req.messages);
                }
                if !keep {
                    stream = None;
                }
            }
            Ok(Err(e)) => {
                acks.errors_n(e, req.messages);
                stream = None;
            }
            Err(_) => {
                acks.errors_n("http_timeout", req.messages);
                stream = None;
            }
        }
    }
}

/// Writes one request and reads its whole response; returns the status and whether the
/// connection can be reused.
async fn exchange(s: &mut TcpStream, req: &[u8], buf: &mut [u8]) -> Result<(u16, bool), String> {
    s.write_all(req)
        .await
        .map_err(|e| format!("http_write_{}", crate::conn::io_reason(&e)))?;
    let mut head = HeadReader::default();
    let mut body: Option<(u16, bool, BodyDecoder)> = None;
    loop {
        let n = s
            .read(buf)
            .await
            .map_err(|e| format!("http_read_{}", crate::conn::io_reason(&e)))?;
        if n == 0 {
            return match body {
                Some((status, _, d)) if d.eof_is_clean() => Ok((status, false)),
                _ => Err("http_closed".into()),
            };
        }
        let mut input = &buf[..n];
        if body.is_none() {
            match head.feed(input).map_err(|e| e.reason().to_string())? {
                None => continue,
                Some((h, used)) => {
                    input = &input[used..];
                    body = Some((h.status, h.keep_alive, BodyDecoder::new(&h.framing)));
                }
            }
        }
        if let Some((status, keep_alive, d)) = body.as_mut() {
            let keep = *keep_alive && !matches!(d, BodyDecoder::Close);
            if d.feed(input, &mut |_| {})
                .map_err(|e| e.reason().to_string())?
                == BodyState::Done
            {
                return Ok((*status, keep));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_encoding_and_replies() {
        let mut b = Vec::new();
        resp_command(&mut b, &[b"PUBLISH", b"a:broadcast", b"{}"]);
        assert_eq!(
            b,
            b"*3\r\n$7\r\nPUBLISH\r\n$11\r\na:broadcast\r\n$2\r\n{}\r\n"
        );
        assert_eq!(parse_reply(b":3\r\n"), Some(Reply::Ok(4)));
        assert_eq!(parse_reply(b":3\r"), None);
        assert_eq!(
            parse_reply(b"-ERR wrong\r\n"),
            Some(Reply::Error(12, "err".into()))
        );
        assert_eq!(parse_reply(b"$3\r\nabc\r\n"), Some(Reply::Ok(9)));
        assert_eq!(parse_reply(b"$3\r\nab"), None);
        assert_eq!(parse_reply(b"$-1\r\n"), Some(Reply::Ok(5)));
        assert_eq!(
            parse_reply(b"*2\r\n$5\r\n1-234\r\n:3\r\n"),
            Some(Reply::Ok(19))
        );
        assert_eq!(parse_reply(b"*2\r\n$5\r\n1-234\r\n"), None);
        assert_eq!(parse_reply(b"*-1\r\n"), Some(Reply::Ok(5)));
        assert_eq!(parse_reply(b"%1\r\n"), Some(Reply::Unsupported));
    }

    #[test]
    fn durable_forms() {
        let env = r#"{"type":"t","data":1}"#;
        let mut b = Vec::new();
        durable_command(&mut b, false, "app0", "u1", env);
        let mut want = Vec::new();
        resp_command(
            &mut want,
            &[
                b"FCALL",
                b"sse_publish",
                b"0",
                b"app0",
                b"u1",
                env.as_bytes(),
            ],
        );
        assert_eq!(b, want);
        b.clear();
        durable_command(&mut b, true, "app0", "", env);
        assert_eq!(
            b,
            b"*7\r\n$5\r\nFCALL\r\n$11\r\nsse_publish\r\n$1\r\n1\r\n$6\r\n{app0}\r\n\
              $4\r\napp0\r\n$0\r\n\r\n$21\r\n{\"type\":\"t\",\"data\":1}\r\n"
        );
    }

    #[test]
    fn payloads_carry_seq_and_timestamp() {
        let mut s = String::new();
        fill_data(&mut s, "seq", 7, "");
        assert!(s.starts_with("{\"seq\":7,\"ts_ns\":"), "{s}");
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert!(v["ts_ns"].as_u64().unwrap() > 1_600_000_000_000_000_000);
        fill_data(&mut s, "bseq", 1, "xx");
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["pad"], "xx");
        assert_eq!(v["bseq"], 1);
    }

    #[test]
    fn channel_names() {
        let layout = Layout {
            users: 3,
            apps: 2,
            app_prefix: "app".into(),
            user_prefix: "u".into(),
        };
        let c = Channels::new(&layout, "{app}:channel:{user}", "{app}:broadcast");
        assert_eq!(
            c.user,
            vec!["app0:channel:u0", "app1:channel:u1", "app0:channel:u2"]
        );
        assert_eq!(c.app, vec!["app0:broadcast", "app1:broadcast"]);
    }

    #[test]
    fn rng_is_deterministic_and_spreads() {
        let mut a = XorShift::new(1);
        let mut b = XorShift::new(1);
        let mut hits = [0u32; 10];
        for _ in 0..10_000 {
            let x = a.next();
            assert_eq!(x, b.next());
            hits[(x % 10) as usize] += 1;
        }
        assert!(hits.iter().all(|&h| h > 800), "{hits:?}");
    }
}
