//! The accept loop: HTTP/1.1 event streams on the raw socket (see [`super::raw`]), everything else
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

use super::raw::{self, Head, Rewind};
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
    // Half the descriptor reserve is for sockets that are not streams (yet): requests in flight,
    // `/health`, refusals. Past that, a connection gets a 503 at once and is closed; a quarter
    // short of the limit, accepting pauses (the kernel's backlog holds the rest) until sockets
    // close. So a burst of connects never runs the process out of descriptors, and the last
    // quarter stays for the broker's links, logs and the runtime.
    let (busy_at, pause_at) =
        crate::fds::open_files_limit().map_or((usize::MAX, usize::MAX), |limit| {
            let below = |n: u64| usize::try_from(limit.saturating_sub(n)).unwrap_or(usize::MAX);
            let reserve = state.config.fd_reserve;
            (below(reserve / 2), below(reserve / 4))
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
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        if tasks.len() >= busy_at {
            tasks.spawn(overloaded(stream));
            continue;
        }
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

/// The answer when the instance holds all the sockets it can: short, without reading the request.
async fn overloaded(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\n\
        content-type: application/json\r\ncontent-length: 70\r\nconnection: close\r\n\r\n\
        {\"error\":\"overloaded\",\"message\":\"this instance is out of connections\"}";
    use tokio::io::AsyncReadExt;
    let answer = async {
        // The request head first (a little, briefly): an answer before the request confuses
        // clients, and closing with unread bytes would reset the connection.
        let mut buf = [0u8; 4096];
        let mut tail = [0u8; 4];
        for _ in 0..4 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            let seen: Vec<u8> = tail.iter().chain(&buf[..n]).copied().collect();
            if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
            tail.copy_from_slice(&seen[seen.len() - 4..]);
        }
        stream.write_all(BUSY).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), answer).await;
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
    match Box::pin(raw::read_head(&mut stream, HEADER_READ_TIMEOUT)).await {
        Head::Sse(request) => {
            drop(watcher);
            Box::pin(raw::serve(stream, peer, state, request)).await;
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
