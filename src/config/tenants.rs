//! Tenants: each application's own secrets, origins and caps (`TENANTS` or `TENANTS_FILE`).

use std::collections::HashMap;

use super::values::invalid;
use super::{ConfigError, Secret};

/// One application's own settings. Every field is optional; absent ones fall back to the global
/// setting.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    /// This application's HS256 secret.
    pub secret: Option<Secret>,
    /// The secret being rotated out: still accepted until `previous_secret_until`.
    pub previous_secret: Option<Secret>,
    /// Seconds since the epoch after which `previous_secret` is refused.
    pub previous_secret_until: Option<u64>,
    /// Browser origins allowed to open this application's streams.
    pub cors_origins: Option<Vec<String>>,
    /// Streams this application may hold across the cluster.
    pub max_connections: Option<u64>,
    /// Streams one of its users may hold across the cluster.
    pub max_user_connections: Option<u64>,
}

/// Reads the tenants from inline JSON or a file (not both), and checks them. Returns the name of
/// the variable they came from, for error messages.
pub(super) fn tenants(
    inline: Option<String>,
    file: Option<String>,
) -> Result<(&'static str, HashMap<String, Tenant>), ConfigError> {
    let (name, text) = match (inline, file) {
        (None, None) => return Ok(("TENANTS", HashMap::new())),
        (Some(_), Some(_)) => {
            return Err(invalid(
                "TENANTS",
                "set TENANTS or TENANTS_FILE, not both".into(),
            ));
        }
        (Some(text), None) => ("TENANTS", text),
        (None, Some(path)) => (
            "TENANTS_FILE",
            std::fs::read_to_string(&path)
                .map_err(|e| invalid("TENANTS_FILE", format!("{path}: {e}")))?,
        ),
    };
    // Errors name the field but never quote the input: it holds secrets.
    let tenants: HashMap<String, Tenant> = serde_json::from_str(&text).map_err(|e| {
        invalid(
            name,
            format!(
                "not a JSON object of applications (line {}, column {}): {}",
                e.line(),
                e.column(),
                match e.classify() {
                    serde_json::error::Category::Data => "a field is unknown or of the wrong type",
                    _ => "malformed JSON",
                }
            ),
        )
    })?;
    for (app, t) in &tenants {
        let problem = if !crate::ids::is_safe_id(app) {
            Some("is not a valid application id".to_string())
        } else if [&t.secret, &t.previous_secret]
            .iter()
            .any(|s| s.as_ref().is_some_and(|s| s.expose().is_empty()))
        {
            Some("has an empty secret".into())
        } else if t.previous_secret.is_some() != t.previous_secret_until.is_some() {
            Some("needs previous_secret and previous_secret_until together".into())
        } else if t.previous_secret.is_some() && t.secret.is_none() {
            Some("has a previous_secret but no secret".into())
        } else {
            None
        };
        if let Some(p) = problem {
            return Err(invalid(name, format!("application {app:?} {p}")));
        }
    }
    Ok((name, tenants))
}
