//! Every refusal of the HTTP edge, typed ([`ApiError`]), and the one place it becomes a response:
//! the status, the JSON body `{"error": "<code>", "message": "..."}` and the headers that go with it
//! (`Allow`, `Retry-After`, `WWW-Authenticate`). Handlers return an `ApiError`; none builds an error
//! response itself. Counting and logging a refusal stays with whoever decides it (it knows why).

use http::{HeaderValue, Method, StatusCode, header};
use serde_json::json;

use super::body::json_response;
use super::strict::Refusal;
use super::{HttpResponse, allow_header};
use crate::auth::AuthError;
use crate::broker::BrokerError;
use crate::hub::AttachError;
use crate::rate::Limited;
use crate::sse::EnvelopeError;

/// How long a user over their stream cap is asked to wait: more tabs will not help, so the client
/// must not retry at once.
const USER_FULL_RETRY_AFTER: &str = "30";

/// Why a request was refused. The `Display` text is the JSON `message`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request head that breaks the rules of [`super::strict`]: a 400 whatever the route.
    #[error("{}", .0.message)]
    Head(Refusal),
    /// No such route; the message says what the listener serves.
    #[error("{0}")]
    NotFound(&'static str),
    /// A known route, another method: a 405 with the route's `Allow`.
    #[error("method not allowed on this route")]
    MethodNotAllowed(&'static [Method]),
    /// A refused token, for any reason (a missing one included, so that clients need one rule).
    #[error(transparent)]
    Unauthorized(AuthError),
    /// The caller went over one of its request rates.
    #[error(
        "too many requests ({}): try again in {} s",
        .0.label(),
        .0.retry_after_secs()
    )]
    RateLimited(Limited),
    /// An application with its own origins, asked for a stream by a page of another.
    #[error("this application does not serve streams to pages of this origin")]
    OriginNotAllowed,
    /// The user already holds as many streams as allowed (the hub's `UserFull`).
    #[error(transparent)]
    TooManyConnections(AttachError),
    #[error("publishing needs a token with \"sse_role\": \"publisher\"")]
    PublisherRoleRequired,
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("{0}")]
    UnreadableBody(String),
    /// A publish request that does not validate: the code of the rule it broke, and why (the
    /// publish plan's `PlanError`).
    #[error("{}", .0.1)]
    InvalidPublish((&'static str, String)),
    /// An envelope the publish paths that keep history refuse (the Redis library makes the same
    /// checks).
    #[error(transparent)]
    Envelope(EnvelopeError),
    /// A publish the broker failed, after `published` targets went out (their `ids`, and that of
    /// an event which reached too few replicas: it exists, so the publisher can retry knowingly).
    #[error("{source}")]
    PublishFailed {
        source: BrokerError,
        published: usize,
        ids: Vec<String>,
    },
    #[error("the token's iss is not this application")]
    WrongApplication,
    /// A listing the token's roles do not allow; the message says which it needs.
    #[error("{0}")]
    ListingForbidden(&'static str),
    #[error(transparent)]
    BrokerUnavailable(BrokerError),
    #[error("{0}")]
    Internal(String),
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> ApiError {
        ApiError::Head(refusal)
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Envelope(EnvelopeError::TooLarge(_)) | ApiError::BodyTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::Head(_)
            | ApiError::UnreadableBody(_)
            | ApiError::InvalidPublish(_)
            | ApiError::Envelope(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::RateLimited(_) | ApiError::TooManyConnections(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::OriginNotAllowed
            | ApiError::PublisherRoleRequired
            | ApiError::WrongApplication
            | ApiError::ListingForbidden(_) => StatusCode::FORBIDDEN,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::PublishFailed { .. } | ApiError::BrokerUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON `error`: a stable code clients may match on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Head(refusal) => refusal.code,
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Unauthorized(e) => e.reason(),
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::OriginNotAllowed => "origin_not_allowed",
            ApiError::TooManyConnections(_) => "too_many_connections",
            ApiError::PublisherRoleRequired => "publisher_role_required",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::BodyTimeout => "body_timeout",
            ApiError::UnreadableBody(_) => "unreadable_body",
            ApiError::InvalidPublish((code, _)) => code,
            ApiError::Envelope(EnvelopeError::TooLarge(_)) => "message_too_large",
            ApiError::Envelope(_) => "invalid_envelope",
            ApiError::PublishFailed {
                source: BrokerError::NotReplicated { .. },
                ..
            } => "not_replicated",
            ApiError::PublishFailed { .. } | ApiError::BrokerUnavailable(_) => "broker_unavailable",
            ApiError::WrongApplication => "wrong_application",
            ApiError::ListingForbidden(_) => "forbidden",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The response: `{"error", "message"}` (a failed publish adds what did go out), and the
    /// headers that tell the client what to do next.
    pub fn into_response(self) -> HttpResponse {
        let mut body = json!({"error": self.code(), "message": self.to_string()});
        if let ApiError::PublishFailed { published, ids, .. } = &self {
            body["published"] = json!(published);
            body["ids"] = json!(ids);
        }
        let mut resp = json_response(self.status(), &body);
        let headers = resp.headers_mut();
        match self {
            ApiError::MethodNotAllowed(methods) => {
                headers.insert(header::ALLOW, allow_header(methods));
            }
            // Every reason gets the same challenge; the JSON body says which it was.
            ApiError::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            ApiError::RateLimited(limited) => {
                if let Ok(v) = HeaderValue::from_str(&limited.retry_after_secs().to_string()) {
                    headers.insert(header::RETRY_AFTER, v);
                }
            }
            ApiError::TooManyConnections(_) => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(USER_FULL_RETRY_AFTER),
                );
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::Value;

    use super::*;
    use crate::history::EventId;
    use crate::rate::{Action, Scope};

    fn body_json(resp: HttpResponse) -> Value {
        match resp.into_body() {
            crate::http::Body::Full(Some(b)) => serde_json::from_slice(&b).unwrap(),
            _ => Value::Null,
        }
    }

    fn parts(e: ApiError) -> (u16, Value, http::HeaderMap) {
        let resp = e.into_response();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, body_json(resp), headers)
    }

    #[test]
    fn each_refusal_has_its_status_code_and_headers() {
        let (status, body, h) = parts(ApiError::Unauthorized(AuthError::Expired));
        assert_eq!(status, 401);
        assert_eq!(body["error"], "expired");
        assert_eq!(body["message"], AuthError::Expired.to_string());
        assert_eq!(
            h[header::WWW_AUTHENTICATE],
            "Bearer error=\"invalid_token\""
        );
        assert_eq!(h[header::CONTENT_TYPE], "application/json");

        let limited = Limited {
            action: Action::Connect,
            scope: Scope::User,
            retry_after: Duration::from_millis(1500),
        };
        let (status, body, h) = parts(ApiError::RateLimited(limited));
        assert_eq!(status, 429);
        assert_eq!(body["error"], "rate_limited");
        assert_eq!(
            body["message"],
            "too many requests (connect_user_rate): try again in 2 s"
        );
        assert_eq!(h[header::RETRY_AFTER], "2");

        let full = AttachError::UserFull { count: 3, limit: 3 };
        let (status, body, h) = parts(ApiError::TooManyConnections(full));
        assert_eq!(
            (status, &body["error"]),
            (429, &json!("too_many_connections"))
        );
        assert_eq!(h[header::RETRY_AFTER], "30");

        let (status, _, h) = parts(ApiError::MethodNotAllowed(&[Method::GET, Method::HEAD]));
        assert_eq!(status, 405);
        assert_eq!(h[header::ALLOW], "GET, HEAD, OPTIONS");

        let (status, body, _) = parts(ApiError::Envelope(EnvelopeError::TooLarge(10)));
        assert_eq!((status, &body["error"]), (413, &json!("message_too_large")));
        let (status, body, _) = parts(ApiError::Envelope(EnvelopeError::NotAnObject));
        assert_eq!((status, &body["error"]), (400, &json!("invalid_envelope")));

        let (status, body, _) = parts(ApiError::BodyTooLarge { limit: 5 });
        assert_eq!(status, 413);
        assert_eq!(body["message"], "the request body is larger than 5 bytes");
    }

    #[test]
    fn a_failed_publish_says_what_went_out() {
        let id: EventId = "5-0-1".parse().unwrap();
        let failed = ApiError::PublishFailed {
            source: BrokerError::NotReplicated { id, replicas: 0 },
            published: 1,
            ids: vec!["4-0-1".into(), id.to_string()],
        };
        let (status, body, _) = parts(failed);
        assert_eq!(status, 503);
        assert_eq!(body["error"], "not_replicated");
        assert_eq!(body["published"], 1);
        assert_eq!(body["ids"], json!(["4-0-1", "5-0-1"]));
        let failed = ApiError::PublishFailed {
            source: BrokerError::Unavailable("down".into()),
            published: 0,
            ids: vec![],
        };
        let (_, body, _) = parts(failed);
        assert_eq!(body["error"], "broker_unavailable");
        assert_eq!(body["message"], "broker unavailable: down");
        assert_eq!(body["ids"], json!([]));
    }
}
