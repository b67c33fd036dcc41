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

/// One route of the public listener: a path pattern, whose `{name}` segments each match one
/// non-empty, percent-decoded segment, and the methods it answers besides OPTIONS (every route
/// answers the CORS preflight).
pub struct Route {
    pub pattern: &'static str,
    pub methods: &'static [Method],
    endpoint: Endpoint,
}

/// Which handler a route calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Root,
    Health,
    Ready,
    Sse,
    Publish,
    Connections,
}

const GET: &[Method] = &[Method::GET, Method::HEAD];

/// The public listener's routes. The router reads them, and so does `tests/openapi.rs`, which
/// checks that `docs/openapi.yaml` documents exactly these paths and methods.
pub static ROUTES: &[Route] = &[
    Route {
        pattern: "/",
        methods: GET,
        endpoint: Endpoint::Root,
    },
    Route {
        pattern: "/health",
        methods: GET,
        endpoint: Endpoint::Health,
    },
    Route {
        pattern: "/ready",
        methods: GET,
        endpoint: Endpoint::Ready,
    },
    Route {
        pattern: "/sse",
        methods: &[Method::GET],
        endpoint: Endpoint::Sse,
    },
    Route {
        pattern: "/publish",
        methods: &[Method::POST],
        endpoint: Endpoint::Publish,
    },
    Route {
        pattern: "/connections/{app}",
        methods: &[Method::GET],
        endpoint: Endpoint::Connections,
    },
    Route {
        pattern: "/connections/{app}/{user}",
        methods: &[Method::GET],
        endpoint: Endpoint::Connections,
    },
];

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
    let mut resp = dispatch(&state, peer, req).await;
    cors::apply(&state.config.cors, origin.as_ref(), resp.headers_mut());
    Ok(resp)
}

async fn dispatch<B>(state: &AppState, peer: SocketAddr, req: Request<B>) -> HttpResponse
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    // Before routing: a request whose host or framing is in doubt gets no answer but this one.
    if let Err(refusal) = strict::check(req.version(), req.headers()) {
        return ApiError::from(refusal).into_response();
    }
    let Some((route, params)) = find(req.uri().path()) else {
        return ApiError::NotFound("no such route").into_response();
    };
    if req.method() == Method::OPTIONS {
        return cors::preflight(route.methods);
    }
    if !route.methods.contains(req.method()) {
        return ApiError::MethodNotAllowed(route.methods).into_response();
    }
    let answer = match (route.endpoint, params.as_slice()) {
        (Endpoint::Root, _) => Ok(probes::root()),
        (Endpoint::Health, _) => Ok(probes::health()),
        (Endpoint::Ready, _) => Ok(probes::ready(state)),
        // hyper's adapter of the domain result: the lease becomes the response body.
        (Endpoint::Sse, _) => {
            return match sse::open(state, peer, &req).await {
                Ok(opened) => opened.into_response(),
                Err(refused) => refused.into_response(),
            };
        }
        (Endpoint::Publish, _) => publish::publish(state, req).await,
        (Endpoint::Connections, [app]) => connections::list(state, &req, app, None).await,
        (Endpoint::Connections, [app, user]) => {
            connections::list(state, &req, app, Some(user)).await
        }
        // A pattern with captures its handler does not take: none in `ROUTES`.
        (Endpoint::Connections, _) => Err(ApiError::NotFound("no such route")),
    };
    answer.unwrap_or_else(ApiError::into_response)
}

/// The route `path` matches, and its captured segments in order.
fn find(path: &str) -> Option<(&'static Route, Vec<String>)> {
    ROUTES
        .iter()
        .find_map(|route| Some((route, captures(route.pattern, path)?)))
}

/// The `{name}` segments of `pattern` in `path`, percent-decoded; `None` unless `path` has exactly
/// the pattern's segments (so no trailing slash), each literal equal and each capture non-empty.
fn captures(pattern: &str, path: &str) -> Option<Vec<String>> {
    let mut found = Vec::new();
    let mut segments = path.split('/');
    for want in pattern.split('/') {
        let got = segments.next()?;
        if want.starts_with('{') {
            let value = percent_decode(got).filter(|v| !v.is_empty())?;
            found.push(value);
        } else if want != got {
            return None;
        }
    }
    segments.next().is_none().then_some(found)
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

    /// `/connections/{app}` or `/connections/{app}/{user}`, segments percent-decoded.
    fn connections_path(path: &str) -> Option<(String, Option<String>)> {
        let (route, params) = find(path)?;
        assert_eq!(route.endpoint, Endpoint::Connections, "{path}");
        let mut params = params.into_iter();
        Some((params.next()?, params.next()))
    }

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

    #[test]
    fn literal_routes_match_exactly() {
        let endpoint = |p: &str| find(p).map(|(r, _)| r.endpoint);
        assert_eq!(endpoint("/"), Some(Endpoint::Root));
        assert_eq!(endpoint("/health"), Some(Endpoint::Health));
        assert_eq!(endpoint("/sse"), Some(Endpoint::Sse));
        for other in [
            "",
            "/health/",
            "/h%65alth",
            "/sse/",
            "/ssex",
            "//",
            "/connections",
        ] {
            assert_eq!(endpoint(other), None, "{other}");
        }
    }
}
