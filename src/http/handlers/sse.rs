//! `GET /sse`: admits the caller (token, origin, rates) and attaches a stream to the hub. The
//! answer is a domain result, [`Opened`] or [`Refused`], that each HTTP stack adapts: hyper sends
//! the lease as the response body, the lean HTTP/1.1 path (`http::h1`) writes the head and hands
//! the socket to the stream.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, header};

use super::admission::{authenticate_token, caps, check_origin, check_rate, count_limit};
use crate::http::errors::ApiError;
use crate::http::{AppState, Body, HttpResponse};
use crate::hub::{AttachError, Lease, NewStream};
use crate::rate::{Action, Scope};

/// A stream the hub took: its place there, and the headers of the 200 that starts it.
pub struct Opened {
    /// Dropping it removes the stream from the hub and the registry.
    pub lease: Lease,
    pub headers: HeaderMap,
}

/// A stream the gateway would not open.
pub enum Refused {
    /// An error response: a refused token or origin, a rate or the user's cap.
    Error(ApiError),
    /// "Come back later", as a 200 stream that says only that and ends: any other status would
    /// make a native EventSource give up for good.
    RetryLater { retry_ms: u64, why: String },
}

impl From<ApiError> for Refused {
    fn from(e: ApiError) -> Refused {
        Refused::Error(e)
    }
}

impl Opened {
    /// hyper's answer: the stream's events are the response body.
    pub fn into_response(self) -> HttpResponse {
        let mut resp = HttpResponse::new(Body::Stream(self.lease));
        *resp.headers_mut() = self.headers;
        resp
    }
}

impl Refused {
    /// The complete response, on either stack.
    pub fn into_response(self) -> HttpResponse {
        match self {
            Refused::Error(e) => e.into_response(),
            Refused::RetryLater { retry_ms, why } => {
                let text = format!(
                    "retry: {retry_ms}\n: {}\n\n",
                    why.replace(['\r', '\n'], " ")
                );
                let mut resp = HttpResponse::new(Body::full(Bytes::from(text)));
                *resp.status_mut() = StatusCode::OK;
                let h = resp.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                );
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                resp
            }
        }
    }
}

/// Opens a stream for the caller of `req`, or says why not.
pub async fn open<B>(
    state: &AppState,
    peer: SocketAddr,
    req: &Request<B>,
) -> Result<Opened, Refused> {
    let (identity, token) = authenticate_token(state, req)?;
    check_origin(state, req, &identity.app)?;
    let last_event_id = last_event_id(req);
    let user_key = format!("{}/{}", identity.app, identity.user);
    let app = identity.app.as_str();
    check_rate(
        state,
        Action::Connect,
        &[
            (Scope::Token, &token),
            (Scope::User, &user_key),
            (Scope::App, app),
        ],
        app,
    )?;
    if last_event_id.is_some() {
        check_rate(
            state,
            Action::Resume,
            &[(Scope::User, &user_key), (Scope::App, app)],
            app,
        )?;
    }
    let user_agent = header_text(req, header::USER_AGENT, 256).unwrap_or_default();
    let new = NewStream {
        caps: caps(state, &identity.app),
        last_event_id,
        app: identity.app,
        user: identity.user,
        exp: identity.exp,
        remote_addr: peer,
        user_agent,
    };
    let (app, user) = (new.app.clone(), new.user.clone());
    let lease = match state.hub.attach(new).await {
        Ok(lease) => lease,
        Err(e) => return Err(refused(state, &app, &user, e)),
    };
    let conn = lease.conn();
    tracing::info!(app = %conn.app, user = %conn.user, conn = %conn.id, remote = %peer, "stream opened");
    let mut headers = HeaderMap::with_capacity(4);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    if let Ok(id) = HeaderValue::from_str(&conn.id.to_string()) {
        headers.insert(HeaderName::from_static("x-connection-id"), id);
    }
    Ok(Opened { lease, headers })
}

fn header_text<B>(req: &Request<B>, name: HeaderName, max: usize) -> Option<String> {
    let v = req.headers().get(name)?.to_str().ok()?.trim();
    (!v.is_empty()).then(|| v.chars().take(max).collect())
}

/// `Last-Event-ID` (a reconnecting EventSource), else `?last_event_id=` (the first connection of a
/// page). Anything longer than an id can be is cut: it will be an unknown id either way.
fn last_event_id<B>(req: &Request<B>) -> Option<String> {
    let max = crate::history::MAX_EVENT_ID_LEN + 1;
    header_text(req, HeaderName::from_static("last-event-id"), max).or_else(|| {
        form_urlencoded::parse(req.uri().query()?.as_bytes())
            .find(|(k, v)| k == "last_event_id" && !v.trim().is_empty())
            .map(|(_, v)| v.trim().chars().take(max).collect())
    })
}

/// A stream the hub would not take. A user over their cap gets a 429 (more tabs will not help, so
/// the client must not retry blindly); a full application or instance is shed with a ten times
/// longer `retry:`, since room comes back as other streams end; anything else is a short `retry:`.
fn refused(state: &AppState, app: &str, user: &str, e: AttachError) -> Refused {
    let limit = match e {
        AttachError::UserFull { .. } => "user",
        AttachError::AppFull { .. } => "application",
        AttachError::InstanceFull => "instance",
        _ => {
            tracing::warn!(%app, %user, error = %e, "stream refused, client told to retry");
            return Refused::RetryLater {
                retry_ms: state.config.retry_ms,
                why: e.to_string(),
            };
        }
    };
    count_limit(state, app, limit);
    tracing::info!(%app, %user, error = %e, "stream refused: over a limit");
    if let AttachError::UserFull { .. } = e {
        return Refused::Error(ApiError::TooManyConnections(e));
    }
    Refused::RetryLater {
        retry_ms: state.config.retry_ms * 10,
        why: e.to_string(),
    }
}
