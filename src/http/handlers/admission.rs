//! Who may do what, checked before a handler acts: the token, the page's origin, the request rates
//! and the stream caps. Each refusal is counted (and a refused token logged) here, where the reason
//! is known; the response is [`ApiError`]'s.

use http::{Request, header};

use crate::auth::{self, AuthError, Identity};
use crate::http::AppState;
use crate::http::errors::ApiError;
use crate::hub::Caps;
use crate::metrics::{AppReasonLabel, ReasonLabel};
use crate::rate::{Action, Scope};

/// The caller's identity.
pub fn authenticate<B>(state: &AppState, req: &Request<B>) -> Result<Identity, ApiError> {
    authenticate_token(state, req).map(|(identity, _)| identity)
}

/// The caller's identity, and the token it came with (rates are also counted per token).
pub fn authenticate_token<B>(
    state: &AppState,
    req: &Request<B>,
) -> Result<(Identity, String), ApiError> {
    auth::extract_token(req.headers(), req.uri().query())
        .and_then(|token| Ok((state.verifier.verify(&token)?, token)))
        .map_err(|e| {
            log_auth_failure(e, req.uri().path());
            state
                .metrics
                .auth_failures
                .get_or_create(&ReasonLabel { reason: e.reason() })
                .inc();
            ApiError::Unauthorized(e)
        })
}

/// Refused tokens are the first thing to look for when clients cannot connect, so they are logged
/// at info; at most one line a second, though (a client retrying with a stale token, or a scan,
/// would flood the log), which counts the failures left out before it. All are in
/// `sse_auth_failures_total`, and at debug level.
fn log_auth_failure(e: AuthError, path: &str) {
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

/// Counts `action` against the caller's rates; over one, a 429 with `Retry-After`.
pub fn check_rate(
    state: &AppState,
    action: Action,
    who: &[(Scope, &str)],
    app: &str,
) -> Result<(), ApiError> {
    state.limiter.check(action, who).map_err(|limited| {
        count_limit(state, app, limited.label());
        ApiError::RateLimited(limited)
    })
}

/// Counts a request refused for one of the application's limits (`sse_limit_rejections_total`).
pub fn count_limit(state: &AppState, app: &str, limit: &'static str) {
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
pub fn check_origin<B>(state: &AppState, req: &Request<B>, app: &str) -> Result<(), ApiError> {
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
    Err(ApiError::OriginNotAllowed)
}

/// The cluster-wide caps of an application's streams: its tenant's own, else the defaults.
pub fn caps(state: &AppState, app: &str) -> Caps {
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
