//! The accept loop: HTTP/1.1 event streams on the raw socket (see [`super::h1`]), everything else
//! (h1 and h2 prior knowledge) through hyper-util's auto builder.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
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

/// Binds `addr` with a listen backlog as deep as the system allows (`net.core.somaxconn` caps it):
/// tokio's default of 1024 overflows in a reconnect storm, and every connection dropped from a full
/// backlog costs its client a one-second SYN retransmit.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(65_535)
}

/// Accepts connections until `stop` is cancelled; returns what is needed to drain them.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    stop: CancellationToken,
) -> Connections {
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
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let tasks = TaskTracker::new();
    // A quarter of the descriptor reserve short of the limit, accepting pauses until sockets
    // close: the kernel's backlog holds the connects meanwhile (they are served late, not
    // refused), and the last quarter stays for the broker's links, logs and the runtime, so that
    // `accept` never fails with EMFILE. Streams stop well before (the whole reserve short), so
    // this only happens when a burst of connects arrives at a full instance.
    let pause_at = crate::fds::open_files_limit().map_or(usize::MAX, |limit| {
        usize::try_from(limit.saturating_sub(state.config.fd_reserve / 4)).unwrap_or(usize::MAX)
    });
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    loop {
        if tasks.len() >= pause_at {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => continue,
                _ = stop.cancelled() => break,
            }
        }
        let Some((stream, peer)) = accept(&listener, &stop, "public").await else {
            break;
        };
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        tasks.spawn(connection(
            stream,
            peer,
            state.clone(),
            builder.clone(),
            graceful.watcher(),
        ));
    }
    tasks.close();
    Connections { graceful, tasks }
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
