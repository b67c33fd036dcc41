//! Settings: read once from the environment (and an optional `.env`), validated before anything starts.
//!
//! Parsing is a pure function of a lookup closure, so it is unit-tested without touching the process
//! environment. Every error names the variable; the JWT secret's value is never printed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use jsonwebtoken::Algorithm;

/// What is wrong with the configuration; `main` prints it as one line and exits with status 78.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("configuration: {0} is required but not set")]
    Missing(&'static str),
    #[error("configuration: {name} is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// How the process logs (`APP_MODE`): `debug` is human-readable and verbose, `production` is JSON lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Debug,
    Production,
}

/// Where messages and the connection registry live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerConfig {
    /// Single node, in-process: no Redis needed.
    Embedded,
    /// A Redis URL (`redis://`, `rediss://`, with optional user and password).
    Redis { url: String },
}

/// Which origins may read responses from a browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    /// `Access-Control-Allow-Origin: *`, without credentials.
    Any,
    /// Only these origins, echoed back with `Access-Control-Allow-Credentials: true`.
    List(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub app_name: String,
    pub mode: Mode,
    pub listen: SocketAddr,
    pub broker: BrokerConfig,
    /// Identifies this process in registry entries; unique per running instance.
    pub instance_id: String,
    /// The default HMAC secret; an application listed in `tenants` with its own secret uses that
    /// instead. Optional only when tenants are configured (then unknown applications are refused).
    pub jwt_secret: Option<Secret>,
    /// Per-application settings (`TENANTS` inline JSON, or `TENANTS_FILE`).
    pub tenants: HashMap<String, Tenant>,
    pub jwt_algorithms: Vec<Algorithm>,
    pub jwt_leeway: Duration,
    pub cors: CorsOrigins,
    pub ping_interval: Duration,
    /// `retry:` hint sent to every stream, in milliseconds.
    pub retry_ms: u64,
    pub registry_ttl: Duration,
    pub registry_heartbeat: Duration,
    pub shutdown_timeout: Duration,
    /// How long a new stream may wait for its broker subscription before it is told to retry.
    pub subscribe_timeout: Duration,
    /// Largest published message (bytes of the broker payload) that is delivered.
    pub max_message_bytes: usize,
    /// Largest `POST /publish` body.
    pub max_publish_body_bytes: usize,
    /// Messages a stream may have queued before it counts as too slow and is cut off.
    pub client_queue: usize,
    /// Bytes a stream may have queued before it counts as too slow and is cut off.
    pub client_queue_bytes: usize,
    /// Streams this instance accepts (0: as many as the open-file limit allows, less
    /// `fd_reserve`). Beyond: 200 with a `retry:` hint, closed.
    pub max_connections: usize,
    /// Descriptors kept free of streams, for accepting, `/health`, the broker and refusals.
    pub fd_reserve: u64,
    /// Streams one application may hold across the cluster (0: no limit).
    pub max_app_connections: u64,
    /// Streams one user may hold across the cluster (0: no limit). Beyond: 429.
    pub max_user_connections: u64,
    /// Request rates per token, user and application (per instance).
    pub rates: crate::rate::Rates,
    /// History kept per stream for replay.
    pub retention: crate::broker::Retention,
    /// When a durable publish counts as acknowledged.
    pub durability: crate::broker::Durability,
}

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

impl Config {
    /// Reads `.env` if present (real environment variables win), then the environment.
    pub fn load() -> Result<Config, ConfigError> {
        match dotenvy::dotenv() {
            Ok(_) => {}
            Err(e) if e.not_found() => {}
            Err(e) => {
                return Err(ConfigError::Invalid {
                    name: ".env",
                    reason: e.to_string(),
                });
            }
        }
        Config::from_lookup(|k| std::env::var(k).ok())
    }

    /// A configuration for unit tests: embedded broker, the given secret.
    #[cfg(test)]
    pub fn for_tests(secret: &str) -> Config {
        Config::for_tests_with(secret, None)
    }

    /// As [`Config::for_tests`], with tenants given as inline JSON.
    #[cfg(test)]
    pub fn for_tests_with(secret: &str, tenants: Option<&str>) -> Config {
        let mut vars: HashMap<&str, &str> = [("JWT_SECRET", secret), ("APP_PORT", "0")].into();
        if let Some(t) = tenants {
            vars.insert("TENANTS", t);
        }
        Config::from_lookup(|k| vars.get(k).map(|v| v.to_string()))
            .unwrap_or_else(|e| panic!("test config: {e}"))
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        // An empty variable counts as unset: compose files often pass `FOO=` through.
        let get = |k: &str| {
            get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };

        let app_name = get("APP_NAME").unwrap_or_else(|| "sse-gateway".into());
        let mode = match get("APP_MODE").as_deref() {
            None | Some("production") => Mode::Production,
            Some("debug") => Mode::Debug,
            Some(other) => {
                return Err(invalid(
                    "APP_MODE",
                    format!("expected debug or production, got {other:?}"),
                ));
            }
        };
        let port: u16 = parse_or("APP_PORT", get("APP_PORT"), 8080)?;
        let host: IpAddr = parse_or("APP_HOST", get("APP_HOST"), IpAddr::from([0, 0, 0, 0]))?;

        let broker = match (get("REDIS_URL"), get("REDIS_HOST")) {
            (Some(url), _) => {
                let lower = url.to_ascii_lowercase();
                let schemes = [
                    "redis://",
                    "rediss://",
                    "redis-sentinel://",
                    "rediss-sentinel://",
                    "redis-cluster://",
                    "rediss-cluster://",
                ];
                if !schemes.iter().any(|s| lower.starts_with(s)) {
                    return Err(invalid(
                        "REDIS_URL",
                        "must start with redis://, rediss://, redis-sentinel:// or redis-cluster:// \
                         (rediss-* for TLS)"
                            .into(),
                    ));
                }
                BrokerConfig::Redis { url }
            }
            (None, Some(host)) => {
                let port: u16 = parse_or("REDIS_PORT", get("REDIS_PORT"), 6379)?;
                BrokerConfig::Redis {
                    url: format!("redis://{host}:{port}"),
                }
            }
            (None, None) => BrokerConfig::Embedded,
        };

        let tenants = tenants(get("TENANTS"), get("TENANTS_FILE"))?;
        let jwt_secret = get("JWT_SECRET").map(Secret);
        if jwt_secret.is_none() && tenants.values().all(|t| t.secret.is_none()) {
            return Err(ConfigError::Missing("JWT_SECRET"));
        }
        let jwt_algorithms = match get("JWT_ALGORITHMS") {
            None => vec![Algorithm::HS256],
            Some(list) => list
                .split(',')
                .map(|a| match a.trim() {
                    "HS256" => Ok(Algorithm::HS256),
                    "HS384" => Ok(Algorithm::HS384),
                    "HS512" => Ok(Algorithm::HS512),
                    other => Err(invalid(
                        "JWT_ALGORITHMS",
                        format!("{other:?} is not one of HS256, HS384, HS512"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
        };

        let cors = match get("CORS_ALLOWED_ORIGINS") {
            None => CorsOrigins::Any,
            Some(v) if v == "*" => CorsOrigins::Any,
            Some(v) => {
                // Browsers must be able to reach every application's streams: the global list
                // includes the tenants' origins (each application is then held to its own list).
                let mut list: Vec<String> = v
                    .split(',')
                    .map(|o| o.trim().trim_end_matches('/').to_string())
                    .filter(|o| !o.is_empty())
                    .collect();
                for t in tenants.values() {
                    list.extend(t.cors_origins.iter().flatten().cloned());
                }
                list.sort();
                list.dedup();
                CorsOrigins::List(list)
            }
        };

        let registry_ttl = duration_or("REGISTRY_TTL", get("REGISTRY_TTL"), secs(60))?;
        let registry_heartbeat = duration_or(
            "REGISTRY_HEARTBEAT",
            get("REGISTRY_HEARTBEAT"),
            registry_ttl / 3,
        )?;
        if registry_heartbeat >= registry_ttl {
            return Err(invalid(
                "REGISTRY_HEARTBEAT",
                "must be shorter than REGISTRY_TTL".into(),
            ));
        }
        if registry_ttl < secs(1) {
            return Err(invalid("REGISTRY_TTL", "must be at least 1s".into()));
        }

        let instance_id = match get("INSTANCE_ID") {
            Some(id) => id,
            None => {
                let host = get("HOSTNAME").unwrap_or_else(|| "gateway".into());
                let short = uuid::Uuid::new_v4().simple().to_string();
                format!("{host}-{}", &short[..8])
            }
        };

        let config = Config {
            app_name,
            mode,
            listen: SocketAddr::new(host, port),
            broker,
            instance_id,
            jwt_secret,
            tenants,
            jwt_algorithms,
            jwt_leeway: duration_or("JWT_LEEWAY", get("JWT_LEEWAY"), secs(5))?,
            cors,
            ping_interval: positive("PING_INTERVAL", get("PING_INTERVAL"), secs(30))?,
            retry_ms: parse_or("RETRY_MS", get("RETRY_MS"), 3000)?,
            registry_ttl,
            registry_heartbeat,
            shutdown_timeout: duration_or("SHUTDOWN_TIMEOUT", get("SHUTDOWN_TIMEOUT"), secs(10))?,
            subscribe_timeout: positive("SUBSCRIBE_TIMEOUT", get("SUBSCRIBE_TIMEOUT"), secs(5))?,
            max_message_bytes: parse_or("MAX_MESSAGE_BYTES", get("MAX_MESSAGE_BYTES"), 1 << 20)?,
            max_publish_body_bytes: parse_or(
                "MAX_PUBLISH_BODY_BYTES",
                get("MAX_PUBLISH_BODY_BYTES"),
                4 << 20,
            )?,
            client_queue: parse_or("CLIENT_QUEUE", get("CLIENT_QUEUE"), 1024)?,
            client_queue_bytes: parse_or("CLIENT_QUEUE_BYTES", get("CLIENT_QUEUE_BYTES"), 4 << 20)?,
            max_connections: parse_or("MAX_CONNECTIONS", get("MAX_CONNECTIONS"), 0)?,
            fd_reserve: parse_or("FD_RESERVE", get("FD_RESERVE"), 256)?,
            max_app_connections: parse_or(
                "MAX_APP_CONNECTIONS",
                get("MAX_APP_CONNECTIONS"),
                100_000,
            )?,
            max_user_connections: parse_or(
                "MAX_USER_CONNECTIONS",
                get("MAX_USER_CONNECTIONS"),
                32,
            )?,
            rates: {
                use crate::rate::Rate;
                let rate = |name: &'static str, default: f64| -> Result<Rate, ConfigError> {
                    let r: f64 = parse_or(name, get(name), default)?;
                    if !(r.is_finite() && r >= 0.0) {
                        return Err(invalid(
                            name,
                            "must be a number of requests per second, 0 for none".into(),
                        ));
                    }
                    Ok(Rate(r))
                };
                crate::rate::Rates {
                    connect_token: rate("RATE_CONNECT_TOKEN", 5.0)?,
                    connect_user: rate("RATE_CONNECT_USER", 10.0)?,
                    connect_app: rate("RATE_CONNECT_APP", 0.0)?,
                    resume_user: rate("RATE_RESUME_USER", 5.0)?,
                    resume_app: rate("RATE_RESUME_APP", 0.0)?,
                    publish_token: rate("RATE_PUBLISH_TOKEN", 0.0)?,
                    publish_app: rate("RATE_PUBLISH_APP", 0.0)?,
                }
            },
            retention: crate::broker::Retention {
                max_len: parse_or("HISTORY_MAXLEN", get("HISTORY_MAXLEN"), 1000)?,
                ttl_secs: positive("HISTORY_TTL", get("HISTORY_TTL"), secs(3600))?
                    .as_secs()
                    .max(1),
            },
            durability: crate::broker::Durability {
                min_replicas: parse_or("DURABLE_MIN_REPLICAS", get("DURABLE_MIN_REPLICAS"), 0)?,
                wait: positive("DURABLE_WAIT_TIMEOUT", get("DURABLE_WAIT_TIMEOUT"), secs(1))?,
            },
        };
        if config.client_queue == 0 {
            return Err(invalid("CLIENT_QUEUE", "must be at least 1".into()));
        }
        Ok(config)
    }
}

/// Reads the tenants from inline JSON or a file (not both), and checks them.
fn tenants(
    inline: Option<String>,
    file: Option<String>,
) -> Result<HashMap<String, Tenant>, ConfigError> {
    let (name, text) = match (inline, file) {
        (None, None) => return Ok(HashMap::new()),
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
        let problem = if !crate::auth::is_safe_id(app) {
            Some("is not a valid application id".to_string())
        } else if [&t.secret, &t.previous_secret]
            .iter()
            .any(|s| s.as_ref().is_some_and(|s| s.0.is_empty()))
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
    Ok(tenants)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn invalid(name: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { name, reason }
}

fn parse_or<T: std::str::FromStr>(
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

fn positive(
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
fn duration_or(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn secret_is_required_and_never_printed() {
        assert_eq!(parse(&[]).unwrap_err(), ConfigError::Missing("JWT_SECRET"));
        let c = parse(&[("JWT_SECRET", "hunter2-very-secret")]).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn defaults_are_embedded_port_8080_hs256() {
        let c = parse(&[("JWT_SECRET", "s")]).unwrap();
        assert_eq!(c.broker, BrokerConfig::Embedded);
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.jwt_algorithms, vec![Algorithm::HS256]);
        assert_eq!(c.ping_interval, secs(30));
        assert_eq!(c.cors, CorsOrigins::Any);
        assert_eq!(c.mode, Mode::Production);
    }

    #[test]
    fn original_redis_host_and_port_still_work() {
        let c = parse(&[
            ("JWT_SECRET", "s"),
            ("REDIS_HOST", "redis"),
            ("REDIS_PORT", "6380"),
        ])
        .unwrap();
        assert_eq!(
            c.broker,
            BrokerConfig::Redis {
                url: "redis://redis:6380".into()
            }
        );
        let c = parse(&[
            ("JWT_SECRET", "s"),
            ("REDIS_HOST", "ignored"),
            ("REDIS_URL", "rediss://u:p@h:1/2"),
        ])
        .unwrap();
        assert_eq!(
            c.broker,
            BrokerConfig::Redis {
                url: "rediss://u:p@h:1/2".into()
            }
        );
    }

    #[test]
    fn invalid_values_name_the_variable() {
        let err = parse(&[("JWT_SECRET", "s"), ("APP_PORT", "eighty")]).unwrap_err();
        assert!(err.to_string().contains("APP_PORT"), "{err}");
        let err = parse(&[("JWT_SECRET", "s"), ("PING_INTERVAL", "0")]).unwrap_err();
        assert!(err.to_string().contains("PING_INTERVAL"), "{err}");
        let err = parse(&[("JWT_SECRET", "s"), ("REDIS_URL", "http://x")]).unwrap_err();
        assert!(err.to_string().contains("REDIS_URL"), "{err}");
        let err = parse(&[("JWT_SECRET", "s"), ("JWT_ALGORITHMS", "RS256")]).unwrap_err();
        assert!(err.to_string().contains("JWT_ALGORITHMS"), "{err}");
        let err = parse(&[("JWT_SECRET", "s"), ("APP_MODE", "loud")]).unwrap_err();
        assert!(err.to_string().contains("APP_MODE"), "{err}");
    }

    #[test]
    fn durations_take_units() {
        let c = parse(&[
            ("JWT_SECRET", "s"),
            ("PING_INTERVAL", "250ms"),
            ("REGISTRY_TTL", "2m"),
        ])
        .unwrap();
        assert_eq!(c.ping_interval, Duration::from_millis(250));
        assert_eq!(c.registry_ttl, secs(120));
        assert_eq!(c.registry_heartbeat, secs(40));
        assert!(parse(&[("JWT_SECRET", "s"), ("PING_INTERVAL", "5h")]).is_err());
    }

    #[test]
    fn tenants_are_parsed_and_checked() {
        let json = r#"{"shop": {"secret": "s1", "previous_secret": "s0",
            "previous_secret_until": 1800000000, "cors_origins": ["https://shop.example"],
            "max_user_connections": 3}}"#;
        let c = parse(&[
            ("TENANTS", json),
            ("CORS_ALLOWED_ORIGINS", "https://a.example"),
        ])
        .unwrap();
        assert_eq!(
            c.jwt_secret, None,
            "per-app secrets make the global one optional"
        );
        let shop = &c.tenants["shop"];
        assert_eq!(shop.max_user_connections, Some(3));
        assert_eq!(
            c.cors,
            CorsOrigins::List(vec![
                "https://a.example".into(),
                "https://shop.example".into()
            ])
        );
        let bad = [
            r#"{"a:b": {"secret": "x"}}"#,
            r#"{"shop": {"secret": ""}}"#,
            r#"{"shop": {"secret": "x", "previous_secret": "y"}}"#,
            r#"{"shop": {"secret": "x", "colour": "red"}}"#,
            r#"{"shop": {"secret": "hunter2-in-a-broken-json""#,
        ];
        for b in bad {
            let err = parse(&[("TENANTS", b), ("JWT_SECRET", "s")])
                .unwrap_err()
                .to_string();
            assert!(err.contains("TENANTS"), "{err}");
            assert!(!err.contains("hunter2"), "never echo secrets: {err}");
        }
        let err = parse(&[("TENANTS", "{}"), ("TENANTS_FILE", "/x")]).unwrap_err();
        assert!(err.to_string().contains("not both"));
        let err = parse(&[("TENANTS_FILE", "/nonexistent/tenants.json")]).unwrap_err();
        assert!(err.to_string().contains("TENANTS_FILE"));
    }

    #[test]
    fn cors_list_is_parsed() {
        let c = parse(&[
            ("JWT_SECRET", "s"),
            (
                "CORS_ALLOWED_ORIGINS",
                "https://a.example, https://b.example/",
            ),
        ])
        .unwrap();
        assert_eq!(
            c.cors,
            CorsOrigins::List(vec!["https://a.example".into(), "https://b.example".into()])
        );
    }
}
