//! `GET /connections/{app}[/{user}]`: the cluster-wide registry's streams of an application (for
//! an operator token) or of one user (for that user's own token).

use std::collections::BTreeMap;

use http::{Request, StatusCode};

use super::admission::authenticate;
use crate::broker::ConnectionRecord;
use crate::http::body::{empty, json_bytes};
use crate::http::errors::ApiError;
use crate::http::{AppState, HttpResponse};

pub async fn list<B>(
    state: &AppState,
    req: &Request<B>,
    app: &str,
    user: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    let identity = authenticate(state, req)?;
    if identity.app != app {
        return Err(ApiError::WrongApplication);
    }
    let allowed = identity.roles.operator || user.is_some_and(|u| u == identity.user);
    if !allowed {
        return Err(ApiError::ListingForbidden(match user {
            None => "listing a whole application needs a token with \"sse_role\": \"operator\"",
            Some(_) => "a user token may only list its own connections",
        }));
    }
    // As the original: nothing to list is 204 with no body.
    if user.is_some_and(|u| !crate::ids::is_safe_id(u)) {
        return Ok(empty(StatusCode::NO_CONTENT)); // no such user can exist: nothing to ask the broker
    }
    // Each history of the application holds its own users' entries (one on a single Redis).
    let partitions = state.hub.partitions();
    let histories = match user {
        Some(u) => vec![partitions.history(app, u)],
        None => partitions.histories(app),
    };
    let mut records = Vec::new();
    for history in &histories {
        let read = state.broker.registry_list(history, user).await;
        records.extend(read.map_err(ApiError::BrokerUnavailable)?);
    }
    for r in &mut records {
        r.application.id = app.to_string();
    }
    if records.is_empty() {
        return Ok(empty(StatusCode::NO_CONTENT));
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
    body.map(|bytes| json_bytes(StatusCode::OK, bytes))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

fn by_id(records: Vec<ConnectionRecord>) -> BTreeMap<String, ConnectionRecord> {
    records.into_iter().map(|r| (r.id.clone(), r)).collect()
}
