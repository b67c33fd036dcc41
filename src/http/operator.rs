//! The operator listener: `/metrics`, `/health` and `/ready` on an address of their own
//! (`OPERATOR_ADDR`, loopback by default), never on the public port, because the metrics name every
//! application and one tenant must not watch another's traffic.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, StatusCode, header};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::body::empty;
use super::errors::ApiError;
use super::handlers::probes;
use super::{AppState, HttpResponse, allow_header};

/// A scraper sends its request at once; anything slower is not one.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves operators until `stop` is cancelled (with the public accept loop: a draining instance
/// answers neither), then ends the connections still open (scrapes are short).
pub async fn serve(listener: TcpListener, state: Arc<AppState>, stop: CancellationToken) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let Some((stream, peer)) = super::server::accept(&listener, &stop, "operator").await else {
            break;
        };
        let state = state.clone();
        let service = service_fn(move |req| {
            let resp = route(&state, &req);
            async move { Ok::<_, Infallible>(resp) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = conn => if let Err(error) = result {
                    tracing::debug!(%peer, %error, "operator connection ended with an error");
                },
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// The three operator routes: GET and HEAD, OPTIONS says so; no CORS (no browser page needs them).
fn route<B>(state: &AppState, req: &Request<B>) -> HttpResponse {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/health" | "/ready") {
        return ApiError::NotFound(
            "no such route: the operator listener serves /metrics, /health and /ready",
        )
        .into_response();
    }
    const GET: &[Method] = &[Method::GET, Method::HEAD];
    if req.method() == Method::OPTIONS {
        let mut resp = empty(StatusCode::NO_CONTENT);
        resp.headers_mut().insert(header::ALLOW, allow_header(GET));
        return resp;
    }
    if !GET.contains(req.method()) {
        return ApiError::MethodNotAllowed(GET).into_response();
    }
    match path {
        "/metrics" => probes::metrics(state, req),
        "/ready" => probes::ready(state),
        _ => probes::health(),
    }
}
