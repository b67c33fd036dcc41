//! What operators and load balancers ask: liveness (`/health`), readiness (`/ready`), the metrics
//! (`/metrics`, operator listener only), and `/`, which points at `/health` (as the original).

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, header};
use serde_json::json;

use crate::http::body::{empty, json_response};
use crate::http::{AppState, Body, HttpResponse};

/// `/`: a 301 to `/health`.
pub fn root() -> HttpResponse {
    let mut resp = empty(StatusCode::MOVED_PERMANENTLY);
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/health"));
    resp
}

/// Liveness: the process serves HTTP. The same on both listeners.
pub fn health() -> HttpResponse {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

/// Readiness: 200 while the broker links are up, else 503; the links' state either way.
pub fn ready(state: &AppState) -> HttpResponse {
    let link = state.broker.link();
    let (status, word) = if link.ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    json_response(
        status,
        &json!({"status": word, "broker": link.kind, "commands": link.commands,
            "pubsub": link.pubsub, "functions": link.functions, "probe": link.probe,
            "probe_age_seconds": link.probe_age}),
    )
}

/// OpenMetrics, unless the client asks for the Prometheus text format (`Accept: text/plain`)
/// without accepting OpenMetrics: Prometheus itself asks for both and gets OpenMetrics.
pub fn metrics<B>(state: &AppState, req: &Request<B>) -> HttpResponse {
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let plain = accept.contains("text/plain") && !accept.contains("application/openmetrics-text");
    let mut text = state.metrics.render(state.broker.link());
    let mut content_type = crate::metrics::OPENMETRICS;
    if plain {
        text = crate::metrics::prometheus_text(&text);
        content_type = crate::metrics::PROMETHEUS_TEXT;
    }
    let mut resp = HttpResponse::new(Body::full(Bytes::from(text)));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
