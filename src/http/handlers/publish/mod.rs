//! `POST /publish`: a publisher token's request, validated ([`plan`]), published through the
//! broker to each target, exactly like a Redis `PUBLISH` (durable by default: with an id and
//! history).

mod plan;

use std::borrow::Cow;

use bytes::Bytes;
use http::{Request, StatusCode};
use serde_json::json;

use super::admission::{authenticate_token, check_rate};
use crate::auth::Identity;
use crate::broker::{BrokerError, app_channel, user_channel};
use crate::history::EventId;
use crate::http::body::json_response;
use crate::http::errors::ApiError;
use crate::http::read_body::read_body;
use crate::http::{AppState, HttpResponse};
use crate::metrics::OutcomeLabel;
use crate::rate::{Action, Scope};
use crate::sse::EnvelopeError;

pub use self::plan::{PlanError, PublishPlan, Target, parse_publish};

pub async fn publish<B>(state: &AppState, req: Request<B>) -> Result<HttpResponse, ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let (identity, token) = authenticate_token(state, &req)?;
    let result = publish_as(state, &identity, &token, req.into_body()).await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => outcome(e),
    };
    state
        .metrics
        .publish_requests
        .get_or_create(&OutcomeLabel {
            app: identity.app,
            outcome,
        })
        .inc();
    result
}

/// The `outcome` label of `sse_publish_requests_total` for a refused publish.
fn outcome(e: &ApiError) -> &'static str {
    match e {
        ApiError::PublisherRoleRequired => "forbidden",
        ApiError::RateLimited(_) => "rate_limited",
        ApiError::BodyTooLarge { .. } | ApiError::Envelope(EnvelopeError::TooLarge(_)) => {
            "too_large"
        }
        // `not_replicated` or `broker_unavailable`: the error's own code.
        ApiError::PublishFailed { .. } => e.code(),
        _ => "bad_request",
    }
}

/// Everything after authentication: role, rate, body, plan, and the publishes.
async fn publish_as<B>(
    state: &AppState,
    identity: &Identity,
    token: &str,
    body: B,
) -> Result<HttpResponse, ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    if !identity.roles.publisher {
        return Err(ApiError::PublisherRoleRequired);
    }
    let app = identity.app.as_str();
    check_rate(
        state,
        Action::Publish,
        &[(Scope::Token, token), (Scope::App, app)],
        app,
    )?;
    let body = read_body(body, state.config.max_publish_body_bytes).await?;
    let plan = parse_publish(&body).map_err(ApiError::InvalidPublish)?;
    // The checks every publish path shares (the Redis library makes the same ones).
    crate::sse::check_envelope(&plan.envelope, state.config.max_message_bytes)
        .map_err(ApiError::Envelope)?;
    let mut subscribers = 0;
    let mut ids = Vec::new();
    let partitions = state.hub.partitions();
    for (done, target) in plan.targets.iter().enumerate() {
        // A user's events go to their history; a broadcast to every history of the application
        // (one on a single Redis, one per partition on a partitioned cluster: one id each).
        let (user, histories) = match target {
            Target::User(u) => (Some(u.as_str()), vec![partitions.history(app, u)]),
            Target::Broadcast => (None, partitions.histories(app)),
        };
        let histories = histories.into_iter().map(Cow::into_owned).collect();
        let mut failed = None;
        for (history, sent) in send_all(state, histories, user, &plan.envelope, plan.durable).await
        {
            match sent {
                Ok((id, n)) => {
                    if let Some(id) = id {
                        state.hub.published(&history, id);
                        ids.push(id.to_string());
                    }
                    subscribers += n;
                }
                Err(e) => {
                    // An event that reached too few replicas exists (it may be delivered, and a
                    // failover may lose it): the publisher gets its id, to retry knowingly.
                    if let BrokerError::NotReplicated { id, .. } = &e {
                        state.hub.published(&history, *id);
                        ids.push(id.to_string());
                    }
                    tracing::warn!(%app, %history, error = %e, "publish failed");
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(source) = failed {
            return Err(ApiError::PublishFailed {
                source,
                published: done,
                ids,
            });
        }
    }
    let mut body = json!({"published": plan.targets.len(), "subscribers": subscribers});
    if plan.durable {
        body["ids"] = json!(ids);
    }
    Ok(json_response(StatusCode::OK, &body))
}

/// What one history's publish gave: the event's id (durable only) and the subscribers reached.
type Sent = Result<(Option<EventId>, u64), BrokerError>;

/// One target's publishes, one per history, answered in the order of `histories`. A partitioned
/// broadcast's go out together: one round trip, not one per partition.
async fn send_all(
    state: &AppState,
    histories: Vec<String>,
    user: Option<&str>,
    envelope: &Bytes,
    durable: bool,
) -> Vec<(String, Sent)> {
    let send = |history: String| {
        let (broker, envelope) = (state.broker.clone(), envelope.clone());
        let user = user.map(str::to_owned);
        async move {
            let sent = if durable {
                broker
                    .publish_durable(&history, user.as_deref(), envelope)
                    .await
                    .map(|(id, n)| (Some(id), n))
            } else {
                let channel = match &user {
                    Some(u) => user_channel(&history, u),
                    None => app_channel(&history),
                };
                broker.publish(channel, envelope).await.map(|n| (None, n))
            };
            (history, sent)
        }
    };
    if let [history] = &histories[..] {
        return vec![send(history.clone()).await];
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, history) in histories.iter().enumerate() {
        let publish = send(history.clone());
        tasks.spawn(async move { (i, publish.await) });
    }
    let mut answers: Vec<(String, Sent)> = histories
        .into_iter()
        .map(|h| {
            let lost = BrokerError::Unavailable("the publish task ended early".into());
            (h, Err(lost))
        })
        .collect();
    while let Some(done) = tasks.join_next().await {
        if let Ok((i, answer)) = done {
            answers[i] = answer;
        }
    }
    answers
}
