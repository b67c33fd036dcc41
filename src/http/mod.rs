//! The HTTP edge: routing, request handlers, CORS and JSON error responses.
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

mod body;
mod cors;
mod h1;
pub mod operator;
mod routes;
pub mod server;
mod strict;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::json;

pub use body::Body;

/// The request paths' pure parsers, for the fuzz targets in `fuzz/`: not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::h1::{Parsed, parse as parse_head};
    pub use super::routes::{PlanError, PublishPlan, Target, parse_publish};
    pub use super::strict::{Refusal, check as check_head};
}

use crate::auth::{AuthError, Verifier};
use crate::broker::Broker;
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::{Metrics, ReasonLabel};

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

async fn route<B>(state: &AppState, peer: SocketAddr, req: Request<B>) -> HttpResponse
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    use routes::*;
    const GET: &[Method] = &[Method::GET, Method::HEAD];
    // Before routing: a request whose host or framing is in doubt gets no answer but this one.
    if let Err(refusal) = strict::check(req.version(), req.headers()) {
        return refused(refusal);
    }
    let path = req.uri().path().to_string();
    let (allowed, route): (&[Method], Route) = match path.as_str() {
        "/" => (GET, Route::Root),
        "/health" => (GET, Route::Health),
        "/ready" => (GET, Route::Ready),
        "/sse" => (&[Method::GET], Route::Sse),
        "/publish" => (&[Method::POST], Route::Publish),
        p => match connections_path(p) {
            Some((app, user)) => (&[Method::GET], Route::Connections { app, user }),
            None => return error(StatusCode::NOT_FOUND, "not_found", "no such route"),
        },
    };
    if req.method() == Method::OPTIONS {
        return cors::preflight(allowed);
    }
    if !allowed.contains(req.method()) {
        let mut resp = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this route",
        );
        resp.headers_mut()
            .insert(header::ALLOW, allow_header(allowed));
        return resp;
    }
    match route {
        Route::Root => {
            let mut resp = Response::new(Body::empty());
            *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
            resp.headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("/health"));
            resp
        }
        Route::Health => health(),
        Route::Ready => ready(state),
        Route::Sse => sse(state, peer, req).await,
        Route::Publish => publish(state, req).await,
        Route::Connections { app, user } => connections(state, &req, &app, user.as_deref()).await,
    }
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

fn allow_header(methods: &[Method]) -> HeaderValue {
    let list: Vec<&str> = methods
        .iter()
        .map(Method::as_str)
        .chain(std::iter::once("OPTIONS"))
        .collect();
    HeaderValue::from_str(&list.join(", ")).unwrap_or(HeaderValue::from_static("GET"))
}

/// Liveness: the process serves HTTP. The same on both listeners.
fn health() -> HttpResponse {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> HttpResponse {
    json_bytes(status, value.to_string().into_bytes())
}

pub fn json_bytes(status: StatusCode, body: Vec<u8>) -> HttpResponse {
    let mut resp = Response::new(Body::full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub fn error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    json_response(status, &json!({"error": code, "message": message}))
}

/// The 400 for a request head that breaks the rules of [`strict`].
fn refused(refusal: strict::Refusal) -> HttpResponse {
    error(StatusCode::BAD_REQUEST, refusal.code, refusal.message)
}

/// The 401 for a refused token: `WWW-Authenticate: Bearer error="invalid_token"` for every reason
/// (including a missing token, so that clients need one rule), and the reason in the JSON body.
pub fn unauthorized(metrics: &Metrics, e: AuthError) -> HttpResponse {
    metrics
        .auth_failures
        .get_or_create(&ReasonLabel { reason: e.reason() })
        .inc();
    let mut resp = error(StatusCode::UNAUTHORIZED, e.reason(), &e.to_string());
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    resp
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
