//! Request handlers, one per route.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppState, Body, HttpResponse, error, json_bytes, json_response, unauthorized};
use crate::auth::{self, Identity};
use crate::broker::{ConnectionRecord, app_channel, user_channel};
use crate::hub::{AttachError, NewConn};
use crate::metrics::OutcomeLabel;
use crate::sse::clean_field;

/// Most users one batch publish may name.
pub const MAX_BATCH_USERS: usize = 1000;

pub enum Route {
    Root,
    Health,
    Ready,
    Metrics,
    Sse,
    Publish,
    Connections { app: String, user: Option<String> },
}

fn authenticate<B>(state: &AppState, req: &Request<B>) -> Result<Identity, Box<HttpResponse>> {
    auth::extract_token(req.headers(), req.uri().query())
        .and_then(|token| state.verifier.verify(&token))
        .map_err(|e| {
            tracing::debug!(
                reason = e.reason(),
                path = req.uri().path(),
                "authentication failed"
            );
            Box::new(unauthorized(&state.metrics, e))
        })
}

pub fn ready(state: &AppState) -> HttpResponse {
    let link = state.broker.link();
    let (status, word) = if link.ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    json_response(
        status,
        &json!({"status": word, "broker": link.kind, "commands": link.commands, "pubsub": link.pubsub}),
    )
}

pub fn metrics(state: &AppState) -> HttpResponse {
    let text = state.metrics.render(state.broker.link());
    let mut resp = HttpResponse::new(Body::full(Bytes::from(text)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

pub async fn sse<B>(state: &AppState, peer: SocketAddr, req: Request<B>) -> HttpResponse {
    let identity = match authenticate(state, &req) {
        Ok(id) => id,
        Err(resp) => return *resp,
    };
    let user_agent = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .chars()
        .take(256)
        .collect();
    let new = NewConn {
        app: identity.app,
        user: identity.user,
        remote_addr: peer,
        user_agent,
    };
    let (app, user) = (new.app.clone(), new.user.clone());
    let lease = match state.hub.attach(new, state.config.subscribe_timeout).await {
        Ok(lease) => lease,
        Err(e) => {
            tracing::warn!(%app, %user, error = %e, "stream refused, client told to retry");
            return retry_later(state, &e);
        }
    };
    let conn = lease.conn().clone();
    conn.push(state.hello.clone());
    tracing::info!(app = %conn.app, user = %conn.user, conn = %conn.id, remote = %peer, "stream opened");
    let mut resp = HttpResponse::new(Body::Stream(lease));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(id) = HeaderValue::from_str(&conn.id.to_string()) {
        h.insert("x-connection-id", id);
    }
    resp
}

/// A 200 stream that only says "come back later" and ends: any other status would make a native
/// EventSource give up for good.
fn retry_later(state: &AppState, e: &AttachError) -> HttpResponse {
    let text = format!(
        "retry: {}\n: {}\n\n",
        state.config.retry_ms,
        e.to_string().replace(['\r', '\n'], " ")
    );
    let mut resp = HttpResponse::new(Body::full(Bytes::from(text)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// `POST /publish` body. Exactly one of `user`, `users` or `broadcast: true`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    user: Option<String>,
    users: Option<Vec<String>>,
    #[serde(default)]
    broadcast: bool,
    #[serde(rename = "type")]
    event_type: Option<String>,
    id: Option<String>,
    #[serde(default)]
    data: Value,
    retry: Option<u64>,
}

pub async fn publish<B>(state: &AppState, req: Request<B>) -> HttpResponse
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let identity = match authenticate(state, &req) {
        Ok(id) => id,
        Err(resp) => return *resp,
    };
    let outcome = |o: &'static str| {
        state
            .metrics
            .publish_requests
            .get_or_create(&OutcomeLabel {
                app: identity.app.clone(),
                outcome: o,
            })
            .inc();
    };
    if !identity.roles.publisher {
        outcome("forbidden");
        return error(
            StatusCode::FORBIDDEN,
            "publisher_role_required",
            "publishing needs a token with \"sse_role\": \"publisher\"",
        );
    }
    let limit = state.config.max_publish_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        outcome("too_large");
        return too_large(limit);
    }
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            outcome("too_large");
            return too_large(limit);
        }
        Err(e) => {
            outcome("bad_request");
            return error(StatusCode::BAD_REQUEST, "unreadable_body", &e.to_string());
        }
    };
    let request: PublishRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            outcome("bad_request");
            return error(StatusCode::BAD_REQUEST, "invalid_json", &e.to_string());
        }
    };
    let (channels, payload) = match plan_publish(&identity.app, request) {
        Ok(plan) => plan,
        Err((code, message)) => {
            outcome("bad_request");
            return error(StatusCode::BAD_REQUEST, code, &message);
        }
    };
    if payload.len() > state.config.max_message_bytes {
        outcome("too_large");
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "message_too_large",
            &format!(
                "the encoded message is larger than {} bytes",
                state.config.max_message_bytes
            ),
        );
    }
    let mut subscribers = 0;
    for (done, channel) in channels.iter().enumerate() {
        match state.broker.publish(channel.clone(), payload.clone()).await {
            Ok(n) => subscribers += n,
            Err(e) => {
                outcome("broker_unavailable");
                tracing::warn!(app = %identity.app, error = %e, "publish failed");
                return json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"error": "broker_unavailable", "message": e.to_string(), "published": done}),
                );
            }
        }
    }
    outcome("ok");
    json_response(
        StatusCode::OK,
        &json!({"published": channels.len(), "subscribers": subscribers}),
    )
}

fn too_large(limit: usize) -> HttpResponse {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        &format!("the request body is larger than {limit} bytes"),
    )
}

type PlanError = (&'static str, String);

/// Validates a publish request into target channels and the one envelope sent to all of them.
fn plan_publish(app: &str, req: PublishRequest) -> Result<(Vec<String>, Bytes), PlanError> {
    let channels = match (req.user, req.users, req.broadcast) {
        (Some(user), None, false) => vec![checked_user(&user).map(|u| user_channel(app, u))?],
        (None, Some(users), false) => {
            if users.is_empty() || users.len() > MAX_BATCH_USERS {
                return Err((
                    "invalid_target",
                    format!("\"users\" must name 1 to {MAX_BATCH_USERS} users"),
                ));
            }
            let mut seen = HashSet::new();
            let mut channels = Vec::with_capacity(users.len());
            for u in &users {
                if seen.insert(checked_user(u)?) {
                    channels.push(user_channel(app, u));
                }
            }
            channels
        }
        (None, None, true) => vec![app_channel(app)],
        _ => {
            return Err((
                "invalid_target",
                "name exactly one target: \"user\", \"users\" or \"broadcast\": true".into(),
            ));
        }
    };
    for (name, value) in [("type", &req.event_type), ("id", &req.id)] {
        if let Some(v) = value
            && clean_field(v).1
        {
            return Err((
                "invalid_field",
                format!(
                    "\"{name}\" must have no control characters and at most {} bytes",
                    crate::sse::MAX_FIELD_LEN
                ),
            ));
        }
    }
    let mut envelope = serde_json::Map::new();
    if let Some(id) = req.id {
        envelope.insert("id".into(), Value::String(id));
    }
    if let Some(t) = req.event_type {
        envelope.insert("type".into(), Value::String(t));
    }
    envelope.insert("data".into(), req.data);
    if let Some(r) = req.retry {
        envelope.insert("retry".into(), Value::from(r));
    }
    let payload = Value::Object(envelope).to_string();
    Ok((channels, Bytes::from(payload)))
}

fn checked_user(user: &str) -> Result<&str, PlanError> {
    if auth::is_safe_id(user) {
        Ok(user)
    } else {
        Err(("invalid_user", format!("{user:?} is not a valid user id")))
    }
}

pub async fn connections<B>(
    state: &AppState,
    req: &Request<B>,
    app: &str,
    user: Option<&str>,
) -> HttpResponse {
    let identity = match authenticate(state, req) {
        Ok(id) => id,
        Err(resp) => return *resp,
    };
    if identity.app != app {
        return error(
            StatusCode::FORBIDDEN,
            "wrong_application",
            "the token's iss is not this application",
        );
    }
    let allowed = identity.roles.operator || user.is_some_and(|u| u == identity.user);
    if !allowed {
        let message = match user {
            None => "listing a whole application needs a token with \"sse_role\": \"operator\"",
            Some(_) => "a user token may only list its own connections",
        };
        return error(StatusCode::FORBIDDEN, "forbidden", message);
    }
    let records = match state.broker.registry_list(app, user).await {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "broker_unavailable",
                &e.to_string(),
            );
        }
    };
    if records.is_empty() {
        // As the original: nothing to list is 204 with no body.
        let mut resp = HttpResponse::new(Body::empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        return resp;
    }
    // Serialised straight from the records (not through `Value`, which would sort the fields) so
    // that each entry keeps the original's field order.
    let body = match user {
        Some(_) => serde_json::to_vec(&by_id(records)),
        None => {
            let mut users: BTreeMap<String, BTreeMap<String, ConnectionRecord>> = BTreeMap::new();
            for r in records {
                users
                    .entry(r.user.id.clone())
                    .or_default()
                    .insert(r.id.clone(), r);
            }
            serde_json::to_vec(&users)
        }
    };
    match body {
        Ok(bytes) => json_bytes(StatusCode::OK, bytes),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &e.to_string(),
        ),
    }
}

fn by_id(records: Vec<ConnectionRecord>) -> BTreeMap<String, ConnectionRecord> {
    records.into_iter().map(|r| (r.id.clone(), r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(body: Value) -> Result<(Vec<String>, Bytes), PlanError> {
        plan_publish("app", serde_json::from_value(body).unwrap())
    }

    #[test]
    fn publish_targets() {
        let (ch, payload) = plan(json!({"user":"u","type":"t","data":{"a":1},"id":"7"})).unwrap();
        assert_eq!(ch, vec!["app:channel:u"]);
        assert_eq!(&payload[..], br#"{"data":{"a":1},"id":"7","type":"t"}"#);
        let (ch, _) = plan(json!({"users":["a","b","a"],"data":1})).unwrap();
        assert_eq!(ch, vec!["app:channel:a", "app:channel:b"]);
        let (ch, _) = plan(json!({"broadcast":true})).unwrap();
        assert_eq!(ch, vec!["app:broadcast"]);
        assert_eq!(plan(json!({"data":1})).unwrap_err().0, "invalid_target");
        assert_eq!(
            plan(json!({"user":"u","broadcast":true})).unwrap_err().0,
            "invalid_target"
        );
        assert_eq!(plan(json!({"users":[]})).unwrap_err().0, "invalid_target");
        assert_eq!(plan(json!({"user":"a:b"})).unwrap_err().0, "invalid_user");
        assert_eq!(
            plan(json!({"user":"u","type":"x\ny"})).unwrap_err().0,
            "invalid_field"
        );
        assert_eq!(
            plan(json!({"user":"u","id":"1\u{0}"})).unwrap_err().0,
            "invalid_field"
        );
    }
}
