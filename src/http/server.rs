//! The accept loop, on a thread of its own: HTTP/1.1 event streams on the raw socket (see
//! [`super::h1`]), everything else (h1 and h2 prior knowledge) through hyper-util's auto builder.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use mio::unix::SourceFd;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::h1::{self, Head, Rewind};
use super::{AppState, handle};

/// A client must send its request head within this time (slowloris guard).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive finds peers that vanished without a FIN even between pings.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// What is left to wait for once accepting stops.
pub struct Connections {
    /// hyper's connections (graceful: in-flight requests finish, keep-alive ends).
    pub graceful: GracefulShutdown,
    /// Every connection task, raw event streams included.
    pub tasks: TaskTracker,
}

/// Listening sockets sharing the public port (`SO_REUSEPORT`); the kernel spreads connects over
/// them. Each has an accept queue of its own, at most `net.core.somaxconn` deep (4,096 by
/// default): a reconnect storm of 19,500 streams arrives faster than any accept loop on two busy
/// cores takes it, and every connect dropped from a full queue costs its client a one-second SYN
/// retransmit. Eight queues hold 32,768 connects without raising the system's limit.
const LISTEN_SOCKETS: usize = 8;

/// The public listener: [`LISTEN_SOCKETS`] sockets on one address, served by one accept thread.
pub struct PublicListener {
    sockets: Vec<std::net::TcpListener>,
}

impl PublicListener {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self.sockets.first() {
            Some(s) => s.local_addr(),
            None => Err(io::Error::other("no listening socket")),
        }
    }
}

/// Binds `addr` ([`LISTEN_SOCKETS`] sockets, each with a listen backlog as deep as the system
/// allows). The port is first taken without `SO_REUSEPORT`, then let go: that fails when anything
/// else holds it, another gateway's sockets included, so two gateways never share a port
/// unknowingly (and it gives port 0 its number).
pub fn listen(addr: SocketAddr) -> io::Result<PublicListener> {
    let addr = std::net::TcpListener::bind(addr)?.local_addr()?;
    let sockets = (0..LISTEN_SOCKETS)
        .map(|_| {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(65_535)?;
            Ok(socket.into())
        })
        .collect::<io::Result<Vec<std::net::TcpListener>>>()?;
    Ok(PublicListener { sockets })
}

/// How long the accept thread waits for a connection before it looks at `stop` again, should the
/// wake-up sent on cancellation be lost.
const STOP_CHECK: Duration = Duration::from_secs(1);
/// The wake-up on `stop`; the sockets' tokens are their indexes.
const STOP: mio::Token = mio::Token(usize::MAX);

/// The accept thread at work; [`Serving::stopped`] waits for it to stop.
pub struct Serving {
    stopped: oneshot::Receiver<Connections>,
}

impl Serving {
    /// What is left to drain once the thread stopped accepting (after `stop` was cancelled);
    /// `None` if the thread died.
    pub async fn stopped(self) -> Option<Connections> {
        self.stopped.await.ok()
    }
}

/// Starts accepting connections on a thread of its own, until `stop` is cancelled. Each
/// connection is served by a task on the caller's runtime.
///
/// Not on the runtime: in a reconnect storm its threads have thousands of connections' requests,
/// admissions and replays queued, and an accept loop waiting its turn behind them leaves the
/// kernel's accept queues to fill. The thread only accepts, sets the socket options and hands the
/// socket over. (It alone did not keep a 19,500-stream wave out of one full queue on two busy
/// cores; the [`LISTEN_SOCKETS`] queues did: see docs/benchmarks.md.)
pub fn serve(
    listener: PublicListener,
    state: Arc<AppState>,
    stop: CancellationToken,
) -> io::Result<Serving> {
    let poll = mio::Poll::new()?;
    for (i, socket) in listener.sockets.iter().enumerate() {
        poll.registry().register(
            &mut SourceFd(&socket.as_raw_fd()),
            mio::Token(i),
            mio::Interest::READABLE,
        )?;
    }
    let waker = mio::Waker::new(poll.registry(), STOP)?;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    // A quarter of the descriptor reserve short of the limit (less the listener's own sockets,
    // its poller and its wake-up), accepting pauses until sockets close: the kernel's backlog
    // holds the connects meanwhile (they are served late, not refused), and the last quarter
    // stays for the broker's links, logs and the runtime, so that `accept` never fails with
    // EMFILE. Streams stop well before (the whole reserve short), so this only happens when a
    // burst of connects arrives at a full instance.
    let own = listener.sockets.len() as u64 + 2;
    let pause_at = crate::fds::open_files_limit().map_or(usize::MAX, |limit| {
        usize::try_from(limit.saturating_sub(state.config.fd_reserve / 4 + own))
            .unwrap_or(usize::MAX)
    });
    let acceptor = Acceptor {
        ready: vec![true; listener.sockets.len()],
        sockets: listener.sockets,
        poll,
        runtime: tokio::runtime::Handle::current(),
        state,
        stop: stop.clone(),
        builder: Arc::new(builder),
        graceful: GracefulShutdown::new(),
        tasks: TaskTracker::new(),
        pause_at,
        keepalive: socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL),
    };
    let (done, stopped) = oneshot::channel();
    std::thread::Builder::new()
        .name("sse-accept".into())
        .spawn(move || {
            let _ = done.send(acceptor.run());
        })?;
    tokio::spawn(async move {
        let wake = StopAccepting { stop, waker };
        wake.stop.cancelled().await;
    });
    Ok(Serving { stopped })
}

/// Held by a task that waits for `stop`: dropped when `stop` is cancelled, or with the task when
/// the runtime shuts down first, it stops the accept thread (which would otherwise go on holding
/// the port with nowhere to send connections).
struct StopAccepting {
    stop: CancellationToken,
    waker: mio::Waker,
}

impl Drop for StopAccepting {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Err(error) = self.waker.wake() {
            tracing::warn!(%error, "could not wake the accept thread; it stops within a second");
        }
    }
}

/// The accept thread's state.
struct Acceptor {
    /// Non-blocking, their readiness watched by `poll`.
    sockets: Vec<std::net::TcpListener>,
    /// Which sockets may have connects queued. Readiness is edge-triggered: a socket's queue is
    /// emptied before its next wake-up is waited for.
    ready: Vec<bool>,
    poll: mio::Poll,
    /// Where connections are served.
    runtime: tokio::runtime::Handle,
    state: Arc<AppState>,
    stop: CancellationToken,
    builder: Arc<auto::Builder<TokioExecutor>>,
    graceful: GracefulShutdown,
    tasks: TaskTracker,
    pause_at: usize,
    keepalive: socket2::TcpKeepalive,
}

impl Acceptor {
    /// Accepts until `stop` is cancelled, one connect from each ready socket in turn; returns
    /// what is needed to drain the connections.
    fn run(mut self) -> Connections {
        let mut events = mio::Events::with_capacity(LISTEN_SOCKETS + 1);
        while !self.stop.is_cancelled() {
            if !self.ready.contains(&true) {
                match self.poll.poll(&mut events, Some(STOP_CHECK)) {
                    Ok(()) => {
                        for event in &events {
                            if let Some(ready) = self.ready.get_mut(event.token().0) {
                                *ready = true;
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(error) => {
                        tracing::warn!(%error, "waiting for connections failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                continue;
            }
            if self.tasks.len() >= self.pause_at {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            for i in 0..self.sockets.len() {
                if self.ready[i] {
                    self.accept(i);
                }
            }
        }
        self.tasks.close();
        Connections {
            graceful: self.graceful,
            tasks: self.tasks,
        }
    }

    /// Takes one connect from socket `i`, if it has one.
    fn accept(&mut self, i: usize) {
        match self.sockets[i].accept() {
            Ok((stream, peer)) => self.start(stream, peer),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.ready[i] = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                // Out of file descriptors and the like: retried after a short pause instead of
                // spinning.
                tracing::warn!(%error, listener = "public", "accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Hands a new connection to the runtime.
    fn start(&self, stream: std::net::TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&self.keepalive);
        let stream = match stream.set_nonblocking(true).and_then(|()| {
            let _runtime = self.runtime.enter();
            TcpStream::from_std(stream)
        }) {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, %peer, "could not serve an accepted connection");
                return;
            }
        };
        self.tasks.spawn_on(
            connection(
                stream,
                peer,
                self.state.clone(),
                self.builder.clone(),
                self.graceful.watcher(),
            ),
            &self.runtime,
        );
    }
}

/// The next connection on `listener`, or `None` once `stop` is cancelled. A failed accept (out of
/// file descriptors and the like) is logged and retried after a short pause instead of spinning.
pub(super) async fn accept(
    listener: &TcpListener,
    stop: &CancellationToken,
    which: &'static str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => return Some(pair),
                Err(error) => {
                    tracing::warn!(%error, listener = which, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.cancelled() => return None,
        }
    }
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    state: Arc<AppState>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
) {
    // The branches are boxed so that each connection's task is only as large as what it runs:
    // an idle event stream does not carry room for a hyper connection.
    match Box::pin(h1::read_head(&mut stream, HEADER_READ_TIMEOUT)).await {
        Head::Sse(request) => {
            drop(watcher);
            if let Some(lease) = Box::pin(h1::answer(stream, peer, state, request)).await {
                h1::drive(lease).await;
            }
        }
        Head::Other(prefix) => {
            let service = service_fn(move |req| handle(state.clone(), peer, req));
            let io = TokioIo::new(Rewind::new(prefix, stream));
            let conn = builder.serve_connection(io, service).into_owned();
            if let Err(error) = Box::pin(watcher.watch(conn)).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        }
        Head::Done => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    #[test]
    fn a_port_held_by_a_gateway_is_refused_to_the_next() {
        let first = listen(loopback()).expect("listen");
        let addr = first.local_addr().expect("addr");
        assert_eq!(first.sockets.len(), LISTEN_SOCKETS);
        let second = listen(addr).err().map(|e| e.kind());
        assert_eq!(second, Some(io::ErrorKind::AddrInUse));
    }

    /// Connects beyond one system accept queue (`net.core.somaxconn`) complete while nobody
    /// accepts: with one socket, each of them would wait for a SYN retransmit instead.
    #[test]
    fn connects_beyond_one_accept_queue_are_held_not_dropped() {
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4096);
        // Half again one queue, and well within what the others hold together.
        let n = somaxconn + somaxconn / 2;
        let files = crate::fds::open_files_limit().unwrap_or(u64::MAX);
        if n > 8_000 || files < n as u64 + 256 {
            eprintln!("skipped: net.core.somaxconn {somaxconn} needs {n} sockets, {files} open");
            return;
        }
        let listener = listen(loopback()).expect("listen");
        let addr = listener.local_addr().expect("addr");
        // Held open to the end (each one still sits in an accept queue); the first that fails
        // ends the collection.
        let clients: io::Result<Vec<std::net::TcpStream>> = (0..n)
            .map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)))
            .collect();
        let held = clients.map(|c| c.len()).map_err(|e| e.kind());
        assert_eq!(held, Ok(n), "connects held of {n} (somaxconn {somaxconn})");
    }
}
