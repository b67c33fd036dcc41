//! The HTTP edge: the route table and dispatch; the handlers, the lean HTTP/1.1 stream path, CORS
//! and the one mapping of refusals to responses are in the modules below.
//!
//! | route | methods | what |
//! |---|---|---|
//! | `/` | GET, HEAD | 301 to `/health` (as the original) |
//! | `/health` | GET, HEAD | liveness, `{"status":"ok"}` |
//! | `/ready` | GET, HEAD | readiness: 200 when the broker links are up, else 503 |
//! | `/sse` | GET | the event stream |
//! | `/publish` | POST | publish over HTTP (publisher tokens) |
//! | `/connections/{app}[/{user}]` | GET | cluster-wide connection listing |
//!
//! Every route answers OPTIONS (CORS preflight); a known path with another method is a 405 with
//! `Allow`; anything else a 404. Errors are `{"error": "<code>", "message": "..."}`.
//!
//! `/metrics` is not among them: it names every application, so it is served only by the operator
//! listener ([`operator`], with `/health` and `/ready`), on an address of its own.
//!
//! A request flows edge → handler → core and back out as a result:
//! - [`server`] accepts connections; [`h1`] reads each one's first request head and serves a plain
//!   HTTP/1.1 `GET /sse` on the bare socket, hyper (h1 and h2) everything else, through
//!   [`handle`];
//! - [`strict`] refuses heads whose framing or host is in doubt, on both paths;
//! - [`handlers`] answer a response, a typed refusal ([`errors::ApiError`], turned into a response
//!   in [`errors`] only) or, for `GET /sse`, a domain result each stack adapts;
//! - [`cors`] adds the CORS headers to every answer; [`body`] is the response body.

mod body;
mod cors;
mod errors;
mod h1;
mod handlers;
pub mod operator;
mod read_body;
pub mod server;
mod strict;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, header};

pub use body::Body;

use self::errors::ApiError;
use self::handlers::{connections, probes, publish, sse};
use crate::auth::Verifier;
use crate::broker::Broker;
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;

/// The request paths' pure parsers, for the fuzz targets in `fuzz/`: not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::h1::{Parsed, parse as parse_head};
    pub use super::handlers::publish::{PlanError, PublishPlan, Target, parse_publish};
    pub use super::strict::{Refusal, check as check_head};
}

/// Everything a request handler can reach.
pub struct AppState {
    pub config: Config,
    pub verifier: Verifier,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub metrics: Arc<Metrics>,
    pub limiter: crate::rate::Limiter,
}

pub type HttpResponse = Response<Body>;

/// Serves one request. Never fails: every error is a response.
pub async fn handle<B>(
    state: Arc<AppState>,
    peer: SocketAddr,
    req: Request<B>,
) -> Result<HttpResponse, std::convert::Infallible>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let origin = req.headers().get(header::ORIGIN).cloned();
    let mut resp = route(&state, peer, req).await;
    cors::apply(&state.config.cors, origin.as_ref(), resp.headers_mut());
    Ok(resp)
}

enum Route {
    Root,
    Health,
    Ready,
    Sse,
    Publish,
    Connections { app: String, user: Option<String> },
}

async fn route<B>(state: &AppState, peer: SocketAddr, req: Request<B>) -> HttpResponse
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    const GET: &[Method] = &[Method::GET, Method::HEAD];
    // Before routing: a request whose host or framing is in doubt gets no answer but this one.
    if let Err(refusal) = strict::check(req.version(), req.headers()) {
        return ApiError::from(refusal).into_response();
    }
    let path = req.uri().path().to_string();
    let (allowed, route): (&'static [Method], Route) = match path.as_str() {
        "/" => (GET, Route::Root),
        "/health" => (GET, Route::Health),
        "/ready" => (GET, Route::Ready),
        "/sse" => (&[Method::GET], Route::Sse),
        "/publish" => (&[Method::POST], Route::Publish),
        p => match connections_path(p) {
            Some((app, user)) => (&[Method::GET], Route::Connections { app, user }),
            None => return ApiError::NotFound("no such route").into_response(),
        },
    };
    if req.method() == Method::OPTIONS {
        return cors::preflight(allowed);
    }
    if !allowed.contains(req.method()) {
        return ApiError::MethodNotAllowed(allowed).into_response();
    }
    let answer = match route {
        Route::Root => Ok(probes::root()),
        Route::Health => Ok(probes::health()),
        Route::Ready => Ok(probes::ready(state)),
        // hyper's adapter of the domain result: the lease becomes the response body.
        Route::Sse => {
            return match sse::open(state, peer, &req).await {
                Ok(opened) => opened.into_response(),
                Err(refused) => refused.into_response(),
            };
        }
        Route::Publish => publish::publish(state, req).await,
        Route::Connections { app, user } => {
            connections::list(state, &req, &app, user.as_deref()).await
        }
    };
    answer.unwrap_or_else(ApiError::into_response)
}

/// `/connections/{app}` or `/connections/{app}/{user}`, segments percent-decoded; no trailing slash.
fn connections_path(path: &str) -> Option<(String, Option<String>)> {
    let rest = path.strip_prefix("/connections/")?;
    let mut parts = rest.split('/');
    let app = percent_decode(parts.next()?)?;
    let user = parts.next().map(percent_decode);
    if parts.next().is_some() || app.is_empty() {
        return None;
    }
    match user {
        None => Some((app, None)),
        Some(Some(u)) if !u.is_empty() => Some((app, Some(u))),
        Some(_) => None,
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The `Allow` value of a route: its methods and OPTIONS.
fn allow_header(methods: &[Method]) -> HeaderValue {
    let list: Vec<&str> = methods
        .iter()
        .map(Method::as_str)
        .chain(std::iter::once("OPTIONS"))
        .collect();
    HeaderValue::from_str(&list.join(", ")).unwrap_or(HeaderValue::from_static("GET"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_paths() {
        assert_eq!(connections_path("/connections/a"), Some(("a".into(), None)));
        assert_eq!(
            connections_path("/connections/a/u%40x"),
            Some(("a".into(), Some("u@x".into())))
        );
        for bad in [
            "/connections/",
            "/connections/a/",
            "/connections/a/b/",
            "/connections/a/b/c",
            "/connections//b",
            "/connections/%zz",
        ] {
            assert_eq!(connections_path(bad), None, "{bad}");
        }
    }
}
