//! CORS: which browser origins may read responses, and preflight answers.
//!
//! With the default `*`, any origin may read responses but no credentials are involved (tokens travel
//! in the `Authorization` header or the query). With a configured list, a listed origin is echoed back
//! with `Access-Control-Allow-Credentials: true`, so cookies and `withCredentials` work too.

use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use super::{Body, HttpResponse, allow_header};
use crate::config::CorsOrigins;

/// Response headers browser code may read: the stream's connection id above all.
const EXPOSE: &str = "X-Connection-Id, Content-Type";
/// Request headers a browser may send cross-origin.
const ALLOW_HEADERS: &str = "Authorization, Content-Type, Last-Event-ID, Cache-Control";

pub fn apply(cors: &CorsOrigins, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
    match cors {
        CorsOrigins::Any => {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        }
        CorsOrigins::List(list) => {
            headers.append(header::VARY, HeaderValue::from_static("Origin"));
            let Some(origin) = origin else { return };
            let allowed = origin
                .to_str()
                .is_ok_and(|o| list.iter().any(|allowed| allowed == o));
            if !allowed {
                return;
            }
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSE),
    );
}

/// The answer to `OPTIONS` on a known route: 204 with the route's methods.
pub fn preflight(methods: &[Method]) -> HttpResponse {
    let mut resp = HttpResponse::new(Body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(header::ALLOW, allow_header(methods));
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, allow_header(methods));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(ALLOW_HEADERS),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    resp
}
