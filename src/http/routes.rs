//! Request handlers, one per route.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppState, Body, HttpResponse, error, json_bytes, json_response, unauthorized};
use crate::auth::{self, Identity};
use crate::broker::{BrokerError, ConnectionRecord, app_channel, user_channel};
use crate::hub::{AttachError, Caps, NewConn};
use crate::metrics::{AppReasonLabel, OutcomeLabel};
use crate::rate::{Action, Scope};
use crate::sse::clean_field;

/// Most users one batch publish may name.
pub const MAX_BATCH_USERS: usize = 1000;

pub enum Route {
    Root,
    Health,
    Ready,
    Sse,
    Publish,
    Connections { app: String, user: Option<String> },
}

fn authenticate<B>(state: &AppState, req: &Request<B>) -> Result<Identity, Box<HttpResponse>> {
    authenticate_token(state, req).map(|(identity, _)| identity)
}

/// The caller's identity, and the token it came with (rates are also counted per token).
fn authenticate_token<B>(
    state: &AppState,
    req: &Request<B>,
) -> Result<(Identity, String), Box<HttpResponse>> {
    auth::extract_token(req.headers(), req.uri().query())
        .and_then(|token| Ok((state.verifier.verify(&token)?, token)))
        .map_err(|e| {
            log_auth_failure(e, req.uri().path());
            Box::new(unauthorized(&state.metrics, e))
        })
}

/// Counts `action` against the caller's rates; over one, a 429 with `Retry-After`.
fn check_rate(
    state: &AppState,
    action: Action,
    who: &[(Scope, &str)],
    app: &str,
) -> Result<(), Box<HttpResponse>> {
    let limited = match state.limiter.check(action, who) {
        Ok(()) => return Ok(()),
        Err(limited) => limited,
    };
    count_limit(state, app, limited.label());
    let retry = limited.retry_after_secs();
    let mut resp = error(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        &format!(
            "too many requests ({}): try again in {retry} s",
            limited.label()
        ),
    );
    if let Ok(v) = HeaderValue::from_str(&retry.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    Err(Box::new(resp))
}

/// Refused tokens are the first thing to look for when clients cannot connect, so they are logged
/// at info; at most one line a second, though (a client retrying with a stale token, or a scan,
/// would flood the log), which counts the failures left out before it. All are in
/// `sse_auth_failures_total`, and at debug level.
fn log_auth_failure(e: auth::AuthError, path: &str) {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static LAST_SECOND: AtomicU64 = AtomicU64::new(0);
    static LEFT_OUT: AtomicU64 = AtomicU64::new(0);
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST_SECOND.load(Relaxed);
    if second > last
        && LAST_SECOND
            .compare_exchange(last, second, Relaxed, Relaxed)
            .is_ok()
    {
        let left_out = LEFT_OUT.swap(0, Relaxed);
        tracing::info!(
            reason = e.reason(),
            path,
            detail = %e,
            left_out,
            "authentication failed"
        );
    } else {
        LEFT_OUT.fetch_add(1, Relaxed);
        tracing::debug!(reason = e.reason(), path, "authentication failed");
    }
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

pub async fn sse<B>(state: &AppState, peer: SocketAddr, req: Request<B>) -> HttpResponse {
    let (identity, token) = match authenticate_token(state, &req) {
        Ok(caller) => caller,
        Err(resp) => return *resp,
    };
    if let Err(resp) = check_origin(state, &req, &identity.app) {
        return *resp;
    }
    let last_event_id = last_event_id(&req);
    let user_key = format!("{}/{}", identity.app, identity.user);
    let app = identity.app.as_str();
    let mut rated = check_rate(
        state,
        Action::Connect,
        &[
            (Scope::Token, &token),
            (Scope::User, &user_key),
            (Scope::App, app),
        ],
        app,
    );
    if rated.is_ok() && last_event_id.is_some() {
        rated = check_rate(
            state,
            Action::Resume,
            &[(Scope::User, &user_key), (Scope::App, app)],
            app,
        );
    }
    if let Err(resp) = rated {
        return *resp;
    }
    let user_agent = header_text(&req, header::USER_AGENT, 256).unwrap_or_default();
    let new = NewConn {
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
        Err(e) => return refused(state, &app, &user, &e),
    };
    let conn = lease.conn().clone();
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

fn header_text<B>(req: &Request<B>, name: header::HeaderName, max: usize) -> Option<String> {
    let v = req.headers().get(name)?.to_str().ok()?.trim();
    (!v.is_empty()).then(|| v.chars().take(max).collect())
}

/// `Last-Event-ID` (a reconnecting EventSource), else `?last_event_id=` (the first connection of a
/// page). Anything longer than an id can be is cut: it will be an unknown id either way.
fn last_event_id<B>(req: &Request<B>) -> Option<String> {
    let max = crate::history::MAX_ID_LEN + 1;
    header_text(req, header::HeaderName::from_static("last-event-id"), max).or_else(|| {
        form_urlencoded::parse(req.uri().query()?.as_bytes())
            .find(|(k, v)| k == "last_event_id" && !v.trim().is_empty())
            .map(|(_, v)| v.trim().chars().take(max).collect())
    })
}

fn count_limit(state: &AppState, app: &str, limit: &'static str) {
    state
        .metrics
        .limit_rejections
        .get_or_create(&AppReasonLabel {
            app: app.to_string(),
            reason: limit,
        })
        .inc();
}

/// An application with its own CORS origins only serves streams to pages of those origins (a
/// request without `Origin` is not from a cross-origin page and passes).
fn check_origin<B>(state: &AppState, req: &Request<B>, app: &str) -> Result<(), Box<HttpResponse>> {
    let Some(allowed) = state
        .config
        .tenants
        .get(app)
        .and_then(|t| t.cors_origins.as_ref())
    else {
        return Ok(());
    };
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or_default();
    if allowed.iter().any(|a| a.trim_end_matches('/') == origin) {
        return Ok(());
    }
    count_limit(state, app, "origin");
    Err(Box::new(error(
        StatusCode::FORBIDDEN,
        "origin_not_allowed",
        "this application does not serve streams to pages of this origin",
    )))
}

/// The cluster-wide caps of an application's streams: its tenant's own, else the defaults.
fn caps(state: &AppState, app: &str) -> Caps {
    let tenant = state.config.tenants.get(app);
    Caps {
        app: tenant
            .and_then(|t| t.max_connections)
            .unwrap_or(state.config.max_app_connections),
        user: tenant
            .and_then(|t| t.max_user_connections)
            .unwrap_or(state.config.max_user_connections),
    }
}

/// A stream the hub would not take. A user over their cap gets a 429 (more tabs will not help, so
/// the client must not retry blindly); a full application or instance is shed with a long
/// `retry:`, since room comes back as other streams end; anything else is a short `retry:`.
fn refused(state: &AppState, app: &str, user: &str, e: &AttachError) -> HttpResponse {
    let limit = match e {
        AttachError::UserFull { .. } => "user",
        AttachError::AppFull { .. } => "application",
        AttachError::InstanceFull => "instance",
        _ => {
            tracing::warn!(%app, %user, error = %e, "stream refused, client told to retry");
            return retry_later(state, &e.to_string(), false);
        }
    };
    count_limit(state, app, limit);
    tracing::info!(%app, %user, error = %e, "stream refused: over a limit");
    if let AttachError::UserFull { .. } = e {
        let mut resp = error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            &e.to_string(),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
        return resp;
    }
    retry_later(state, &e.to_string(), true)
}

/// A 200 stream that only says "come back later" and ends: any other status would make a native
/// EventSource give up for good. Shedding for a limit asks for a ten times longer wait.
fn retry_later(state: &AppState, why: &str, limit: bool) -> HttpResponse {
    let retry = if limit {
        state.config.retry_ms * 10
    } else {
        state.config.retry_ms
    };
    let text = format!("retry: {retry}\n: {}\n\n", why.replace(['\r', '\n'], " "));
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
    /// Keep the event in history for replay (default). `false`: fire-and-forget, like a plain
    /// Redis `PUBLISH`, which may carry the publisher's own `id`.
    #[serde(default = "yes")]
    durable: bool,
}

fn yes() -> bool {
    true
}

/// Who a publish goes to.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    User(String),
    Broadcast,
}

/// A validated publish: the targets and the one envelope sent to all of them.
#[derive(Debug)]
pub struct PublishPlan {
    pub targets: Vec<Target>,
    pub envelope: Bytes,
    pub durable: bool,
}

pub async fn publish<B>(state: &AppState, req: Request<B>) -> HttpResponse
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let (identity, token) = match authenticate_token(state, &req) {
        Ok(caller) => caller,
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
    let app = identity.app.as_str();
    if let Err(resp) = check_rate(
        state,
        Action::Publish,
        &[(Scope::Token, &token), (Scope::App, app)],
        app,
    ) {
        outcome("rate_limited");
        return *resp;
    }
    let limit = state.config.max_publish_body_bytes;
    let body = match read_body(req.into_body(), limit).await {
        Ok(bytes) => bytes,
        Err(BodyError::TooLarge) => {
            outcome("too_large");
            return too_large(limit);
        }
        Err(BodyError::Slow) => {
            outcome("bad_request");
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the request body did not arrive in time",
            );
        }
        Err(BodyError::Unreadable(e)) => {
            outcome("bad_request");
            return error(StatusCode::BAD_REQUEST, "unreadable_body", &e);
        }
    };
    let plan = match parse_publish(&body) {
        Ok(plan) => plan,
        Err((code, message)) => {
            outcome("bad_request");
            return error(StatusCode::BAD_REQUEST, code, &message);
        }
    };
    // The checks every publish path shares (the Redis library makes the same ones).
    match crate::sse::check_envelope(&plan.envelope, state.config.max_message_bytes) {
        Ok(()) => {}
        Err(e @ crate::sse::EnvelopeError::TooLarge(_)) => {
            outcome("too_large");
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "message_too_large",
                &e.to_string(),
            );
        }
        Err(e) => {
            outcome("bad_request");
            return error(StatusCode::BAD_REQUEST, "invalid_envelope", &e.to_string());
        }
    }
    let mut subscribers = 0;
    let mut ids = Vec::new();
    for (done, target) in plan.targets.iter().enumerate() {
        let user = match target {
            Target::User(u) => Some(u.as_str()),
            Target::Broadcast => None,
        };
        let sent = if plan.durable {
            state
                .broker
                .publish_durable(app, user, plan.envelope.clone())
                .await
                .map(|(id, n)| {
                    state.hub.published(app, id);
                    ids.push(id.to_string());
                    n
                })
        } else {
            let channel = match user {
                Some(u) => user_channel(app, u),
                None => app_channel(app),
            };
            state.broker.publish(channel, plan.envelope.clone()).await
        };
        match sent {
            Ok(n) => subscribers += n,
            Err(e) => {
                // An event that reached too few replicas exists (it may be delivered, and a
                // failover may lose it): the publisher gets its id, to retry knowingly.
                let error = match &e {
                    BrokerError::NotReplicated { id, .. } => {
                        state.hub.published(app, *id);
                        ids.push(id.to_string());
                        "not_replicated"
                    }
                    _ => "broker_unavailable",
                };
                outcome(error);
                tracing::warn!(%app, error = %e, "publish failed");
                return json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"error": error, "message": e.to_string(),
                            "published": done, "ids": ids}),
                );
            }
        }
    }
    outcome("ok");
    let mut body = json!({"published": plan.targets.len(), "subscribers": subscribers});
    if plan.durable {
        body["ids"] = json!(ids);
    }
    json_response(StatusCode::OK, &body)
}

/// Longest a request body may take to arrive.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How much of an oversized body is read (and thrown away) before answering 413: a client still
/// sending when the answer comes and the socket closes sees a broken pipe, not the 413.
const DRAIN_FACTOR: u64 = 8;

enum BodyError {
    TooLarge,
    Slow,
    Unreadable(String),
}

async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, BodyError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut buf = bytes::BytesMut::new();
    let mut total: u64 = 0;
    let deadline = tokio::time::Instant::now() + BODY_TIMEOUT;
    while let Some(frame) = tokio::time::timeout_at(deadline, body.frame())
        .await
        .map_err(|_| BodyError::Slow)?
    {
        let frame = frame.map_err(|e| BodyError::Unreadable(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        total += data.len() as u64;
        if total > limit as u64 {
            buf = bytes::BytesMut::new();
            if total > limit as u64 * DRAIN_FACTOR {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&data);
    }
    if total > limit as u64 {
        return Err(BodyError::TooLarge);
    }
    Ok(buf.freeze())
}

fn too_large(limit: usize) -> HttpResponse {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        &format!("the request body is larger than {limit} bytes"),
    )
}

/// Why a publish request was refused: the JSON error's code and message (a 400).
pub type PlanError = (&'static str, String);

/// Reads a `POST /publish` body into its plan: the JSON, then [`plan_publish`].
pub fn parse_publish(body: &[u8]) -> Result<PublishPlan, PlanError> {
    let request: PublishRequest =
        serde_json::from_slice(body).map_err(|e| ("invalid_json", e.to_string()))?;
    plan_publish(request)
}

/// Validates a publish request into its targets and the one envelope sent to all of them.
fn plan_publish(req: PublishRequest) -> Result<PublishPlan, PlanError> {
    let targets = match (req.user, req.users, req.broadcast) {
        (Some(user), None, false) => vec![Target::User(checked_user(&user)?.to_string())],
        (None, Some(users), false) => {
            if users.is_empty() || users.len() > MAX_BATCH_USERS {
                return Err((
                    "invalid_target",
                    format!("\"users\" must name 1 to {MAX_BATCH_USERS} users"),
                ));
            }
            let mut seen = HashSet::new();
            let mut targets = Vec::with_capacity(users.len());
            for u in users {
                if seen.insert(checked_user(&u)?.to_string()) {
                    targets.push(Target::User(u));
                }
            }
            targets
        }
        (None, None, true) => vec![Target::Broadcast],
        _ => {
            return Err((
                "invalid_target",
                "name exactly one target: \"user\", \"users\" or \"broadcast\": true".into(),
            ));
        }
    };
    if req.durable && req.id.is_some() {
        return Err((
            "invalid_field",
            "durable events get their id from the gateway; send \"durable\": false to publish \
             with your own id (without history)"
                .into(),
        ));
    }
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
    Ok(PublishPlan {
        targets,
        envelope: Bytes::from(Value::Object(envelope).to_string()),
        durable: req.durable,
    })
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
    if user.is_some_and(|u| !auth::is_safe_id(u)) {
        return no_content(); // no such user can exist: nothing to ask the broker
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
        return no_content();
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

/// As the original: nothing to list is 204 with no body.
fn no_content() -> HttpResponse {
    let mut resp = HttpResponse::new(Body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

fn by_id(records: Vec<ConnectionRecord>) -> BTreeMap<String, ConnectionRecord> {
    records.into_iter().map(|r| (r.id.clone(), r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(body: Value) -> Result<PublishPlan, PlanError> {
        parse_publish(body.to_string().as_bytes())
    }

    /// Doubles as JavaScript writes them (shortest spelling) that a best-effort float parser reads
    /// one unit in the last place off: the publish path parses the body, writes the envelope and
    /// the delivery path parses it again, so each must reach subscribers spelt as published.
    #[test]
    fn published_numbers_are_delivered_exactly() {
        for n in [
            "0.09144338512092887",
            "117.63331139400017",
            "1.5777777777770001",
            "10587.436593658975",
            "0.9215686321258545",
        ] {
            let body = format!(r#"{{"user":"u","data":[{n},{{"x":{n}}}]}}"#);
            let p = parse_publish(body.as_bytes()).unwrap();
            let data = format!(r#"[{n},{{"x":{n}}}]"#);
            assert_eq!(p.envelope, format!(r#"{{"data":{data}}}"#));
            assert_eq!(crate::sse::parse_payload(&p.envelope).event.data, data);
        }
    }

    #[test]
    fn publish_targets() {
        let p = plan(json!({"user":"u","type":"t","data":{"a":1}})).unwrap();
        assert_eq!(p.targets, vec![Target::User("u".into())]);
        assert!(p.durable);
        assert_eq!(&p.envelope[..], br#"{"data":{"a":1},"type":"t"}"#);
        let p = plan(json!({"user":"u","id":"7","durable":false,"data":1})).unwrap();
        assert_eq!(&p.envelope[..], br#"{"data":1,"id":"7"}"#);
        assert!(!p.durable);
        let p = plan(json!({"users":["a","b","a"],"data":1})).unwrap();
        assert_eq!(
            p.targets,
            vec![Target::User("a".into()), Target::User("b".into())]
        );
        let p = plan(json!({"broadcast":true})).unwrap();
        assert_eq!(p.targets, vec![Target::Broadcast]);
        let code = |v| plan(v).unwrap_err().0;
        assert_eq!(code(json!({"data":1})), "invalid_target");
        assert_eq!(code(json!({"user":"u","broadcast":true})), "invalid_target");
        assert_eq!(code(json!({"users":[]})), "invalid_target");
        assert_eq!(code(json!({"user":"a:b"})), "invalid_user");
        assert_eq!(code(json!({"user":"u","type":"x\ny"})), "invalid_field");
        assert_eq!(
            code(json!({"user":"u","id":"1","durable":false,"type":"\u{0}"})),
            "invalid_field"
        );
        assert_eq!(code(json!({"user":"u","id":"7"})), "invalid_field");
        assert_eq!(code(json!({"user":"u","extra":1})), "invalid_json");
        assert_eq!(code(json!({"user":"."})), "invalid_user");
        assert_eq!(code(json!({"users":["a",".."]})), "invalid_user");
        assert_eq!(parse_publish(b"{").unwrap_err().0, "invalid_json");
    }
}
