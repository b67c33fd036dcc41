//! One SSE client connection: bind a loopback source address, connect, write a minimal HTTP/1.1
//! request, parse the response incrementally, and account every event it carries; reconnect when
//! the run starts a reconnect wave; stop when told.
//!
//! Per-connection memory is kept small on purpose, so that the tool can hold as many streams as the
//! server: a raw tokio `TcpStream`, the parser's (normally empty) buffers and two sequence trackers.
//! Reads go through one buffer per thread instead of one per connection.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

use crate::cli::TokenIn;
use crate::http::Head;
use crate::report::{MAX_US, new_histogram};
use crate::sse::{Event, Progress, Sink, StreamParser};
use crate::target::{Layout, render};
use crate::token::Minter;
use crate::track::{Seen, SeqTracker};

/// Wall-clock nanoseconds since the Unix epoch: the clock the publisher stamps messages with, shared
/// by every process on the machine (monotonic clocks are not comparable across processes).
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Locks a mutex even if a panicking thread poisoned it: the data are counters, still usable.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the run asks of every connection.
#[derive(Debug, Clone, Copy)]
pub struct Ctl {
    /// 0 for the first connect; each reconnect wave increments it.
    pub wave: u32,
    pub stop: bool,
    pub wave_start: Instant,
    /// Reconnects per second in this wave (0: at once).
    pub rate: f64,
}

/// Connect figures of one wave (wave 0 is the initial connect phase).
pub struct WaveStats {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub reasons: Mutex<BTreeMap<String, u64>>,
    pub latency: Mutex<Histogram<u64>>,
    /// Microseconds from the run's start to the last stream established in this wave.
    pub last_ok_us: AtomicU64,
}

impl WaveStats {
    fn new() -> WaveStats {
        WaveStats {
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            reasons: Mutex::new(BTreeMap::new()),
            latency: Mutex::new(new_histogram()),
            last_ok_us: AtomicU64::new(0),
        }
    }

    pub fn done(&self) -> u64 {
        self.ok.load(Relaxed) + self.failed.load(Relaxed)
    }
}

/// Counters shared by every connection of the process.
pub struct Stats {
    pub waves: Vec<WaveStats>,
    pub open: AtomicU64,
    pub dropped: AtomicU64,
    pub drop_reasons: Mutex<BTreeMap<String, u64>>,
    /// Distinct messages received (first arrival of a sequence number on a stream).
    pub fresh: AtomicU64,
    pub duplicates: AtomicU64,
    pub pings: AtomicU64,
    pub comments: AtomicU64,
    pub other_events: AtomicU64,
    pub first_delivery_ns: AtomicU64,
    pub last_delivery_ns: AtomicU64,
    pub latency: Mutex<Histogram<u64>>,
}

impl Stats {
    pub fn new(waves: u32) -> Stats {
        Stats {
            waves: (0..=waves).map(|_| WaveStats::new()).collect(),
            open: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            drop_reasons: Mutex::new(BTreeMap::new()),
            fresh: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            pings: AtomicU64::new(0),
            comments: AtomicU64::new(0),
            other_events: AtomicU64::new(0),
            first_delivery_ns: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
            latency: Mutex::new(new_histogram()),
        }
    }
}

/// Everything the connections of a process share.
pub struct Shared {
    pub target: SocketAddr,
    pub host_header: String,
    pub path_template: String,
    pub token_in: TokenIn,
    pub token_param: String,
    /// Extra header lines, already formatted with their CRLFs.
    pub extra_headers: String,
    pub minter: Option<Minter>,
    pub send_last_event_id: bool,
    pub layout: Layout,
    pub source_ips: Vec<IpAddr>,
    pub connect_timeout: Duration,
    pub run_start: Instant,
    pub stats: Stats,
    /// Per local connection: whether its stream is open now.
    pub live: Vec<AtomicBool>,
    /// `(wave, start µs, latency µs)` of every stream established, with `--connect-trace`.
    pub connect_trace: Option<Mutex<Vec<(u32, u64, u64)>>>,
}

/// What a connection hands back at the end of the run.
#[derive(Debug, Default)]
pub struct Outcome {
    pub user: u32,
    pub app: u32,
    /// Messages to the user's channel (`seq` in the data).
    pub unicast: SeqTracker,
    /// Messages to the app's broadcast channel (`bseq` in the data).
    pub broadcast: SeqTracker,
    /// Last event id seen, for `Last-Event-ID` on reconnect (kept only with `--last-event-id`).
    pub last_id: Option<Box<str>>,
}

enum End {
    /// The run changed `Ctl` (new wave or stop).
    Ctl,
    /// Failed to establish, or the stream broke: wait for the next wave.
    Broken,
}

/// Runs one connection until the run says stop. `local` indexes this process's connections,
/// `global` the whole run's (it decides the user, app and source address).
pub async fn connection(
    sh: std::sync::Arc<Shared>,
    local: usize,
    global: u64,
    mut ctl: watch::Receiver<Ctl>,
) -> Outcome {
    let user = sh.layout.user_of(global);
    let mut out = Outcome {
        user,
        app: sh.layout.app_of(user),
        ..Outcome::default()
    };
    let mut wave = ctl.borrow_and_update().wave;
    loop {
        let end = session(&sh, local, global, wave, &mut out, &mut ctl).await;
        if let End::Broken = end
            && ctl.changed().await.is_err()
        {
            return out;
        }
        let c = *ctl.borrow_and_update();
        if c.stop {
            return out;
        }
        if c.wave != wave {
            wave = c.wave;
            if c.rate > 0.0 {
                // Spread this wave's reconnects at the requested rate, in connection order.
                let at = c.wave_start + Duration::from_secs_f64(local as f64 / c.rate);
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    r = ctl.changed() => if r.is_err() || ctl.borrow().stop { return out; },
                }
            }
        }
    }
}

async fn session(
    sh: &Shared,
    local: usize,
    global: u64,
    wave: u32,
    out: &mut Outcome,
    ctl: &mut watch::Receiver<Ctl>,
) -> End {
    let Some(ws) = sh.stats.waves.get(wave as usize) else {
        return End::Broken;
    };
    let started = Instant::now();
    let mut parser = StreamParser::default();
    let attempt = tokio::time::timeout(sh.connect_timeout, establish(sh, global, out, &mut parser));
    let result = tokio::select! {
        r = attempt => r,
        _ = ctl.changed() => return End::Ctl,
    };
    let mut stream = match result {
        Ok(Ok(s)) => s,
        Ok(Err(reason)) => {
            fail(ws, reason);
            return End::Broken;
        }
        Err(_) => {
            fail(ws, Cow::Borrowed("timeout"));
            return End::Broken;
        }
    };
    let us = started.elapsed().as_micros() as u64;
    lock(&ws.latency).saturating_record(us.clamp(1, MAX_US));
    if let Some(trace) = &sh.connect_trace {
        let start = started.duration_since(sh.run_start).as_micros() as u64;
        lock(trace).push((wave, start, us));
    }
    ws.ok.fetch_add(1, Relaxed);
    ws.last_ok_us
        .fetch_max(sh.run_start.elapsed().as_micros() as u64, Relaxed);
    sh.stats.open.fetch_add(1, Relaxed);
    if let Some(l) = sh.live.get(local) {
        l.store(true, Relaxed);
    }

    // One wait on the run's control for the whole stream: a fresh `changed()` per read would
    // register with (and leave) the watch's waiter list, shared by every stream, for each event.
    let changed = ctl.changed();
    tokio::pin!(changed);
    let end = loop {
        let mut sink = ConnSink {
            sh,
            out: &mut *out,
            status: None,
        };
        tokio::select! {
            biased;
            _ = &mut changed => break End::Ctl,
            r = read_with(&mut stream, |bytes| parser.feed(bytes, &mut sink)) => {
                let reason: Cow<'static, str> = match r {
                    Ok(Some(Ok(Progress::More))) => continue,
                    Ok(Some(Ok(_))) => "body_ended".into(),
                    Ok(Some(Err(e))) => e.reason().into(),
                    Ok(None) if parser.eof_is_clean() => "server_closed".into(),
                    Ok(None) => "eof_mid_body".into(),
                    Err(e) => io_reason(&e),
                };
                sh.stats.dropped.fetch_add(1, Relaxed);
                *lock(&sh.stats.drop_reasons).entry(reason.into_owned()).or_default() += 1;
                break End::Broken;
            }
        }
    };
    if let Some(l) = sh.live.get(local) {
        l.store(false, Relaxed);
    }
    sh.stats.open.fetch_sub(1, Relaxed);
    end
}

fn fail(ws: &WaveStats, reason: Cow<'static, str>) {
    ws.failed.fetch_add(1, Relaxed);
    *lock(&ws.reasons).entry(reason.into_owned()).or_default() += 1;
}

/// Connects and reads until the first byte of the stream body (the server has authenticated the
/// request and subscribed the stream); events already in that read are accounted.
async fn establish(
    sh: &Shared,
    global: u64,
    out: &mut Outcome,
    parser: &mut StreamParser,
) -> Result<TcpStream, Cow<'static, str>> {
    let socket = match sh.target {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| io_reason(&e))?;
    if !sh.source_ips.is_empty() {
        let src = sh.source_ips[(global % sh.source_ips.len() as u64) as usize];
        if src.is_ipv4() == sh.target.is_ipv4() {
            bind_no_port(&socket);
            socket
                .bind(SocketAddr::new(src, 0))
                .map_err(|e| format!("bind_{}", io_reason(&e)))?;
        }
    }
    let mut stream = socket
        .connect(sh.target)
        .await
        .map_err(|e| format!("connect_{}", io_reason(&e)))?;
    // Small requests and nothing else written: Nagle would only delay the request.
    let _ = stream.set_nodelay(true);
    let request = build_request(sh, out, global)?;
    stream
        .write_all(&request)
        .await
        .map_err(|e| format!("write_{}", io_reason(&e)))?;
    drop(request);
    loop {
        let mut sink = ConnSink {
            sh,
            out: &mut *out,
            status: None,
        };
        let r = read_with(&mut stream, |bytes| parser.feed(bytes, &mut sink)).await;
        let status = sink.status;
        match r {
            Err(e) => return Err(format!("read_{}", io_reason(&e)).into()),
            Ok(None) if status.is_some() => return Err("closed_before_body".into()),
            Ok(None) => return Err("closed_before_head".into()),
            Ok(Some(Err(e))) => return Err(e.reason().into()),
            Ok(Some(Ok(Progress::Refused))) => {
                return Err(format!("http_{}", status.unwrap_or(0)).into());
            }
            Ok(Some(Ok(_))) if parser.body_started() => return Ok(stream),
            Ok(Some(Ok(Progress::Ended))) => return Err("empty_body".into()),
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Lets the kernel pick the source port at connect time, per destination, instead of at bind time
/// across all destinations: with it, one source address serves ~28k streams per server port.
fn bind_no_port(socket: &TcpSocket) {
    let one: libc::c_int = 1;
    // SAFETY: a valid fd and a pointer to a c_int of the size we pass; failure is harmless.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn build_request(sh: &Shared, out: &Outcome, global: u64) -> Result<Vec<u8>, Cow<'static, str>> {
    let app = sh.layout.app_name(out.app);
    let user = sh.layout.user_name(out.user);
    let mut path = render(&sh.path_template, &app, &user, global);
    let token = match (&sh.minter, sh.token_in) {
        (Some(m), TokenIn::Header | TokenIn::Query) => {
            Some(m.mint(&app, &user, None).map_err(Cow::Owned)?)
        }
        _ => None,
    };
    let mut req = Vec::with_capacity(256 + path.len());
    if let (Some(t), TokenIn::Query) = (&token, sh.token_in) {
        path.push(if path.contains('?') { '&' } else { '?' });
        path.push_str(&sh.token_param);
        path.push('=');
        // JWTs are base64url and dots: safe in a query without escaping.
        path.push_str(t);
    }
    req.extend_from_slice(b"GET ");
    req.extend_from_slice(path.as_bytes());
    req.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    req.extend_from_slice(sh.host_header.as_bytes());
    req.extend_from_slice(b"\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n");
    if let (Some(t), TokenIn::Header) = (&token, sh.token_in) {
        req.extend_from_slice(b"Authorization: Bearer ");
        req.extend_from_slice(t.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    if let (true, Some(id)) = (sh.send_last_event_id, &out.last_id) {
        req.extend_from_slice(b"Last-Event-ID: ");
        req.extend_from_slice(id.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(sh.extra_headers.as_bytes());
    req.extend_from_slice(b"\r\n");
    Ok(req)
}

pub fn io_reason(e: &io::Error) -> Cow<'static, str> {
    use io::ErrorKind::*;
    Cow::Borrowed(match e.kind() {
        ConnectionRefused => "refused",
        ConnectionReset => "reset",
        ConnectionAborted => "aborted",
        AddrInUse => "addr_in_use",
        AddrNotAvailable => "addr_not_available",
        TimedOut => "timed_out",
        BrokenPipe => "broken_pipe",
        UnexpectedEof => "unexpected_eof",
        _ => match e.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) => "too_many_open_files",
            Some(libc::ENOBUFS) | Some(libc::ENOMEM) => "no_memory",
            _ => return Cow::Owned(format!("io_{:?}", e.kind()).to_ascii_lowercase()),
        },
    })
}

thread_local! {
    /// The read buffer of every connection on this thread: bytes never stay in it across an await.
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; 64 * 1024]);
}

/// Reads once into the thread's buffer and hands the bytes to `f`. `Ok(None)` is end of stream.
/// Going through `AsyncRead::poll_read` (not `try_read`) keeps tokio's short-read readiness
/// optimisation: one `read` syscall per wake-up instead of two.
async fn read_with<R>(
    stream: &mut TcpStream,
    mut f: impl FnMut(&[u8]) -> R,
) -> io::Result<Option<R>> {
    poll_fn(|cx| {
        READ_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            let mut rb = ReadBuf::new(&mut buf[..]);
            match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => Poll::Ready(Ok(None)),
                Poll::Ready(Ok(())) => Poll::Ready(Ok(Some(f(rb.filled())))),
            }
        })
    })
    .await
}

/// Accounts what one connection's stream carries.
struct ConnSink<'a> {
    sh: &'a Shared,
    out: &'a mut Outcome,
    status: Option<u16>,
}

impl Sink for ConnSink<'_> {
    fn head(&mut self, head: &Head) -> bool {
        self.status = Some(head.status);
        head.status == 200
    }

    fn body_started(&mut self) {}

    fn event(&mut self, ev: &Event<'_>) {
        let stats = &self.sh.stats;
        if ev.event_type == b"ping" {
            stats.pings.fetch_add(1, Relaxed);
            return;
        }
        if self.sh.send_last_event_id
            && !ev.id.is_empty()
            && ev.id.len() <= 128
            && self.out.last_id.as_deref().map(str::as_bytes) != Some(ev.id)
            && let Ok(id) = std::str::from_utf8(ev.id)
            && !id.contains(['\r', '\n'])
        {
            self.out.last_id = Some(id.into());
        }
        let (tracker, seq) = if let Some(s) = scan_number(ev.data, b"\"seq\":") {
            (&mut self.out.unicast, s)
        } else if let Some(s) = scan_number(ev.data, b"\"bseq\":") {
            (&mut self.out.broadcast, s)
        } else {
            stats.other_events.fetch_add(1, Relaxed);
            return;
        };
        match tracker.record(seq.min(u32::MAX as u64) as u32) {
            Seen::New => {
                let now = unix_ns();
                stats.fresh.fetch_add(1, Relaxed);
                if stats.first_delivery_ns.load(Relaxed) == 0 {
                    let _ = stats
                        .first_delivery_ns
                        .compare_exchange(0, now, Relaxed, Relaxed);
                }
                stats.last_delivery_ns.fetch_max(now, Relaxed);
                if let Some(ts) = scan_number(ev.data, b"\"ts_ns\":") {
                    let us = now.saturating_sub(ts) / 1000;
                    lock(&stats.latency).saturating_record(us.clamp(1, MAX_US));
                }
            }
            Seen::Duplicate => {
                stats.duplicates.fetch_add(1, Relaxed);
            }
            Seen::Invalid => {}
        }
    }

    fn comment(&mut self, _text: &[u8]) {
        self.sh.stats.comments.fetch_add(1, Relaxed);
    }
}

/// The unsigned integer following `key` in `data` (a tiny scan instead of a JSON parse per event:
/// the tool's own CPU per delivery must stay far below the server's).
pub fn scan_number(data: &[u8], key: &[u8]) -> Option<u64> {
    let at = data.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = data[at..]
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    let mut any = false;
    for d in digits {
        n = n.checked_mul(10)?.checked_add((d - b'0') as u64)?;
        any = true;
    }
    any.then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_numbers() {
        let d = br#"{"seq":42,"ts_ns":1700000000000000000,"pad":"x"}"#;
        assert_eq!(scan_number(d, b"\"seq\":"), Some(42));
        assert_eq!(
            scan_number(d, b"\"ts_ns\":"),
            Some(1_700_000_000_000_000_000)
        );
        assert_eq!(scan_number(d, b"\"bseq\":"), None);
        assert_eq!(scan_number(br#"{"seq": 7}"#, b"\"seq\":"), Some(7));
        assert_eq!(scan_number(br#"{"seq":"x"}"#, b"\"seq\":"), None);
        assert_eq!(
            scan_number(br#"{"seq":99999999999999999999999}"#, b"\"seq\":"),
            None
        );
    }
}
