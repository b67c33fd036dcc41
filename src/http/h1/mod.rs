//! The lean path for event streams: an HTTP/1.1 `GET /sse` is read, answered and streamed on the bare
//! socket, with no hyper connection behind it.
//!
//! hyper keeps two 8 KiB buffers and a connection task per connection for its whole life; an idle
//! stream needs none of that. This path reads the first request head of every connection into a
//! short-lived buffer (refusing, with a JSON 400, framing that hyper would only answer with an empty
//! one), answers a plain `GET /sse` with the same handler as hyper's requests (same authentication,
//! limits, CORS and errors), adapting its result itself, then writes chunked events straight from
//! the stream's outbox. Everything else (other routes, HTTP/2, requests with a body) goes to hyper, with the
//! bytes read so far replayed in front of the socket by [`Rewind`].
//!
//! - [`head`]: reading and parsing the first request head;
//! - [`response`]: the response head (with `Date`) and whole short responses;
//! - [`chunked`]: the stream's socket, one chunk per event;
//! - [`rewind`]: the bytes read so far, replayed in front of the socket for hyper.
//!
//! A stream is one-way: the first byte a client sends on it ends it (see [`Chunked`]).

mod chunked;
mod head;
mod response;
mod rewind;

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use tokio::net::TcpStream;

use self::chunked::Chunked;
use self::response::{response_head, write_full};
use super::errors::ApiError;
use super::handlers::sse::{self, Opened, Refused};
use super::{AppState, cors, strict};
use crate::hub::Lease;

pub use self::head::{Head, Parsed, parse, read_head};
pub use self::rewind::Rewind;

/// Answers a `GET /sse` request read by [`read_head`]: writes the refusal, or hands the socket and
/// the response head to the stream and returns its lease. This path's adapter of the handler's
/// domain result. The caller boxes this future and lets it go before [`drive`]: an idle stream's
/// task must not keep room for the request handling (a future is as big as its largest await
/// point, and this one's was 900 bytes).
pub async fn answer(
    mut stream: TcpStream,
    peer: SocketAddr,
    state: Arc<AppState>,
    req: Box<Request<()>>,
) -> Option<Lease> {
    let opened = open(&state, peer, &req).await;
    let origin = req.headers().get(header::ORIGIN);
    match opened {
        Ok(Opened { lease, mut headers }) => {
            cors::apply(&state.config.cors, origin, &mut headers);
            let head = response_head(StatusCode::OK, &headers, None);
            // From here on the hub writes the stream's events.
            lease
                .conn()
                .attach_wire(Box::new(Chunked::new(stream)), Bytes::from(head));
            Some(lease)
        }
        Err(refused) => {
            let mut resp = refused.into_response();
            cors::apply(&state.config.cors, origin, resp.headers_mut());
            let _ = write_full(&mut stream, resp).await;
            None
        }
    }
}

/// A stream's life after [`answer`]: its task only wakes when the socket is full, when the stream
/// ends, or when the client leaves. Dropping the lease removes the stream from the hub and the
/// registry.
pub async fn drive(lease: Lease) {
    let conn = lease.conn();
    poll_fn(|cx| conn.poll_drive(cx)).await;
}

/// What routing does for hyper's requests, less what [`parse`] already settled (the route, the
/// method, the framing): the `Host` rules of [`strict`], then the handler.
async fn open(state: &AppState, peer: SocketAddr, req: &Request<()>) -> Result<Opened, Refused> {
    strict::check(req.version(), req.headers()).map_err(ApiError::from)?;
    sse::open(state, peer, req).await
}
