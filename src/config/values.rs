//! Reading one setting: a number, a duration with its unit, and the error that names the variable.

use std::time::Duration;

use super::ConfigError;

pub(super) fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub(super) fn invalid(name: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { name, reason }
}

pub(super) fn parse_or<T: std::str::FromStr>(
    name: &'static str,
    value: Option<String>,
    default: T,
) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match value {
        None => Ok(default),
        Some(v) => v.parse().map_err(|e| invalid(name, format!("{v:?}: {e}"))),
    }
}

pub(super) fn positive(
    name: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let d = duration_or(name, value, default)?;
    if d.is_zero() {
        return Err(invalid(name, "must be greater than zero".into()));
    }
    Ok(d)
}

/// Durations are whole seconds (`30`) or carry a unit: `250ms`, `30s`, `5m`.
pub(super) fn duration_or(
    name: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(v) = value else { return Ok(default) };
    let (digits, unit) = match v.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => v.split_at(i),
        None => (v.as_str(), "s"),
    };
    let n: u64 = digits.parse().map_err(|_| {
        invalid(
            name,
            format!("{v:?} is not a duration like 30, 30s, 250ms or 5m"),
        )
    })?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(invalid(
            name,
            format!("{v:?} is not a duration like 30, 30s, 250ms or 5m"),
        )),
    }
}
