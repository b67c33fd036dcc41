//! Secrets: a value that never shows up in `Debug` output or logs, and which ones production
//! refuses (too short, or `.env.example`'s public placeholder).

use std::collections::HashMap;

use super::values::invalid;
use super::{ConfigError, Mode, Tenant};

/// A secret that never shows up in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `.env.example`'s placeholder `JWT_SECRET`: public, so production refuses it whatever its length
/// (a unit test keeps the two equal).
pub const EXAMPLE_SECRET: &str = "change-me-to-a-long-random-secret";

/// Shortest secret production accepts: 256 bits, the size of HS256's hash. Shorter ones (and
/// anything a person typed) fall to an offline guess from a single token.
pub const MIN_SECRET_BYTES: usize = 32;

/// How to make a secret; every refusal and warning ends with it.
const MAKE_ONE: &str = "make one with `openssl rand -hex 32`";

/// Every secret that opens tokens (the global one, each tenant's current and previous one) should be
/// long and not the example's. Production refuses the first weak current secret (one line, naming
/// where it is but never its value); debug mode accepts them, with one warning each. A weak
/// `previous_secret` is only warned about in production too: it is on its way out (until its
/// cut-off), and refusing it would make rotating away from a weak secret impossible without a cut.
pub(super) fn weak_secrets(
    mode: Mode,
    global: Option<&Secret>,
    tenants_name: &'static str,
    tenants: &HashMap<String, Tenant>,
) -> Result<Vec<String>, ConfigError> {
    // (variable, what it is in the message, the secret, whether it is being rotated out)
    let mut found: Vec<(&'static str, String, &Secret, bool)> = Vec::new();
    if let Some(s) = global {
        found.push(("JWT_SECRET", "it".into(), s, false));
    }
    let mut apps: Vec<&String> = tenants.keys().collect();
    apps.sort();
    for app in apps {
        let t = &tenants[app];
        if let Some(s) = &t.secret {
            found.push((
                tenants_name,
                format!("application {app:?}'s secret"),
                s,
                false,
            ));
        }
        if let Some(s) = &t.previous_secret {
            let what = format!("application {app:?}'s previous_secret");
            found.push((tenants_name, what, s, true));
        }
    }
    let mut warnings = Vec::new();
    for (name, what, secret, outgoing) in found {
        let problem = if secret.expose() == EXAMPLE_SECRET.as_bytes() {
            format!("{what} is .env.example's public placeholder")
        } else if secret.expose().len() < MIN_SECRET_BYTES {
            format!(
                "{what} is {} bytes long, under {MIN_SECRET_BYTES}",
                secret.expose().len()
            )
        } else {
            continue;
        };
        match (mode, outgoing) {
            (Mode::Production, false) => {
                return Err(invalid(
                    name,
                    format!("{problem}; production refuses it: {MAKE_ONE}"),
                ));
            }
            (Mode::Production, true) => warnings.push(format!(
                "{name}: {problem}; accepted until its previous_secret_until only: {MAKE_ONE}"
            )),
            (Mode::Debug, _) => warnings.push(format!(
                "{name}: {problem}; accepted in debug mode only, production refuses it: {MAKE_ONE}"
            )),
        }
    }
    Ok(warnings)
}
