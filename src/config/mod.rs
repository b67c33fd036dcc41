//! Settings: read once from the environment (and an optional `.env`), validated before anything starts.
//!
//! Parsing is a pure function of a lookup closure, so it is unit-tested without touching the process
//! environment. Every error names the variable; the JWT secret's value is never printed.
//!
//! - this file: the settings and the table of variables they are read from;
//! - [`secrets`]: the secret type and which secrets production refuses;
//! - [`tenants`]: each application's own settings;
//! - [`values`]: reading numbers and durations, and errors naming the variable.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use jsonwebtoken::Algorithm;

mod secrets;
mod tenants;
mod values;

use self::secrets::weak_secrets;
pub use self::secrets::{EXAMPLE_SECRET, MIN_SECRET_BYTES, Secret};
pub use self::tenants::Tenant;
use self::tenants::tenants;
use self::values::{duration_or, invalid, parse_or, positive, secs};

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
    /// The public listener: streams, publishing, listing, `/health` and `/ready`.
    pub listen: SocketAddr,
    /// The operator listener (`OPERATOR_ADDR`): `/metrics`, `/health` and `/ready`, kept off the
    /// public port because the metrics name every application. `None`: `OPERATOR_ADDR=off`.
    pub operator_listen: Option<SocketAddr>,
    /// What is unsafe but tolerated: weak secrets in debug mode (production refuses them), a weak
    /// `previous_secret` in either mode. `main` logs each once logging is up.
    pub warnings: Vec<String>,
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
    /// How each application's users are spread over histories (Redis Cluster slots):
    /// `CLUSTER_PARTITIONS`, 1 unless the broker is a Redis Cluster.
    pub partitions: crate::history::Partitions,
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
        // Debug mode: unit tests use short secrets, which production refuses.
        let mut vars: HashMap<&str, &str> = [
            ("JWT_SECRET", secret),
            ("APP_PORT", "0"),
            ("APP_MODE", "debug"),
        ]
        .into();
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
        // Loopback unless told otherwise: a gateway started by hand is not on the network by
        // accident. Containers set APP_HOST=0.0.0.0 (docker/Dockerfile, the compose file).
        let host: IpAddr = parse_or("APP_HOST", get("APP_HOST"), IpAddr::from([127, 0, 0, 1]))?;
        let operator_listen = match get("OPERATOR_ADDR") {
            Some(v) if v.eq_ignore_ascii_case("off") => None,
            Some(v) => Some(v.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "OPERATOR_ADDR",
                    format!("{v:?}: {e} (expected host:port, like 127.0.0.1:9180, or off)"),
                )
            })?),
            None => Some(DEFAULT_OPERATOR_ADDR),
        };

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

        let (tenants_name, tenants) = tenants(get("TENANTS"), get("TENANTS_FILE"))?;
        let jwt_secret = get("JWT_SECRET").map(Secret::new);
        if jwt_secret.is_none() && tenants.values().all(|t| t.secret.is_none()) {
            return Err(ConfigError::Missing("JWT_SECRET"));
        }
        let warnings = weak_secrets(mode, jwt_secret.as_ref(), tenants_name, &tenants)?;
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

        let partitions = partitions(get("CLUSTER_PARTITIONS"), &broker)?;
        let config = Config {
            app_name,
            mode,
            listen: SocketAddr::new(host, port),
            operator_listen,
            warnings,
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
            partitions,
        };
        if config.client_queue == 0 {
            return Err(invalid("CLIENT_QUEUE", "must be at least 1".into()));
        }
        Ok(config)
    }
}

/// `CLUSTER_PARTITIONS`: only a Redis Cluster has slots to spread an application over.
fn partitions(
    value: Option<String>,
    broker: &BrokerConfig,
) -> Result<crate::history::Partitions, ConfigError> {
    use crate::history::{MAX_PARTITIONS, Partitions};
    let n: u32 = parse_or("CLUSTER_PARTITIONS", value, 1)?;
    let cluster = matches!(broker, BrokerConfig::Redis { url } if url.to_ascii_lowercase().contains("-cluster://"));
    if n > 1 && !cluster {
        return Err(invalid(
            "CLUSTER_PARTITIONS",
            "spreads applications over Redis Cluster slots: it needs REDIS_URL=redis-cluster://… \
             (leave it at 1 on a single Redis or Sentinel)"
                .into(),
        ));
    }
    Partitions::new(n).ok_or_else(|| {
        invalid(
            "CLUSTER_PARTITIONS",
            format!("must be 1 to {MAX_PARTITIONS}"),
        )
    })
}

/// The operator listener's address unless `OPERATOR_ADDR` says otherwise: loopback, so that only
/// this host (a local Prometheus or agent, an SSH tunnel) reaches it. 9180, not Prometheus' own 9090,
/// which is often taken on the same host.
pub const DEFAULT_OPERATOR_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9180);

#[cfg(test)]
mod tests {
    use super::*;

    /// Debug mode unless `pairs` say otherwise: most tests use short secrets.
    fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        map.entry("APP_MODE".into()).or_insert("debug".into());
        Config::from_lookup(|k| map.get(k).cloned())
    }

    /// As the process sees it: nothing set but what `pairs` set.
    fn parse_exactly(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        Config::from_lookup(|k| map.get(k).map(|v| v.to_string()))
    }

    const LONG: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn secret_is_required_and_never_printed() {
        assert_eq!(parse(&[]).unwrap_err(), ConfigError::Missing("JWT_SECRET"));
        let c = parse(&[("JWT_SECRET", "hunter2-very-secret")]).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn defaults_are_embedded_loopback_8080_hs256_production() {
        let c = parse_exactly(&[("JWT_SECRET", LONG)]).unwrap();
        assert_eq!(c.broker, BrokerConfig::Embedded);
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.operator_listen, Some("127.0.0.1:9180".parse().unwrap()));
        assert_eq!(c.jwt_algorithms, vec![Algorithm::HS256]);
        assert_eq!(c.ping_interval, secs(30));
        assert_eq!(c.cors, CorsOrigins::Any);
        assert_eq!(c.mode, Mode::Production);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn operator_listener_is_configurable_or_off() {
        let at = |v: &str| parse(&[("JWT_SECRET", "s"), ("OPERATOR_ADDR", v)]);
        assert_eq!(
            at("0.0.0.0:9090").unwrap().operator_listen,
            Some("0.0.0.0:9090".parse().unwrap())
        );
        assert_eq!(
            at("[::1]:9180").unwrap().operator_listen,
            Some("[::1]:9180".parse().unwrap())
        );
        assert_eq!(at("off").unwrap().operator_listen, None);
        for bad in ["9180", "localhost:9180", "127.0.0.1"] {
            let err = at(bad).unwrap_err().to_string();
            assert!(err.contains("OPERATOR_ADDR"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_example_secret_is_the_one_in_env_example() {
        let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example"))
            .expect(".env.example");
        let secret = example
            .lines()
            .find_map(|l| l.strip_prefix("JWT_SECRET="))
            .expect("JWT_SECRET in .env.example");
        assert_eq!(secret, EXAMPLE_SECRET);
    }

    #[test]
    fn production_refuses_weak_secrets_with_one_line_saying_how_to_make_one() {
        let weak = [EXAMPLE_SECRET, "hunter2-but-only-26-bytes!", "zq"];
        for secret in weak {
            let err = parse_exactly(&[("JWT_SECRET", secret)])
                .unwrap_err()
                .to_string();
            assert!(err.contains("JWT_SECRET"), "{err}");
            assert!(err.contains("openssl rand -hex 32"), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
            assert!(!err.contains(secret), "never echo the secret: {err}");
        }
        // A tenant's secret too.
        let err = parse_exactly(&[("TENANTS", r#"{"shop": {"secret": "short"}}"#)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TENANTS") && err.contains("shop") && err.contains("openssl"),
            "{err}"
        );
        // A weak previous secret is on its way out: a warning, so that rotating away from it
        // needs no cut.
        let c = parse_exactly(&[(
            "TENANTS",
            r#"{"shop": {"secret": "0123456789abcdef0123456789abcdef",
                "previous_secret": "old", "previous_secret_until": 1}}"#,
        )])
        .unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(
            c.warnings[0].contains("previous_secret") && c.warnings[0].contains("openssl"),
            "{:?}",
            c.warnings
        );
        // Debug mode starts, with one warning per weak secret.
        let c = parse(&[
            ("JWT_SECRET", EXAMPLE_SECRET),
            ("TENANTS", r#"{"shop": {"secret": "short"}}"#),
        ])
        .unwrap();
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
        assert!(
            c.warnings
                .iter()
                .all(|w| w.contains("openssl rand -hex 32"))
        );
        // 32 bytes pass.
        assert!(parse_exactly(&[("JWT_SECRET", LONG)]).is_ok());
    }

    #[test]
    fn partitions_need_a_cluster() {
        let cluster = [
            ("JWT_SECRET", "s"),
            ("REDIS_URL", "redis-cluster://h:7000"),
            ("CLUSTER_PARTITIONS", "16"),
        ];
        assert_eq!(parse(&cluster).unwrap().partitions.count(), 16);
        assert_eq!(parse(&cluster[..2]).unwrap().partitions.count(), 1);
        for (url, n) in [
            ("redis://h:6379", "16"),
            ("redis-cluster://h:7000", "0"),
            ("redis-cluster://h:7000", "1025"),
            ("redis-cluster://h:7000", "many"),
        ] {
            let e = parse(&[
                ("JWT_SECRET", "s"),
                ("REDIS_URL", url),
                ("CLUSTER_PARTITIONS", n),
            ]);
            assert!(
                matches!(
                    e,
                    Err(ConfigError::Invalid {
                        name: "CLUSTER_PARTITIONS",
                        ..
                    })
                ),
                "{url} {n}: {e:?}"
            );
        }
        let embedded = parse(&[("JWT_SECRET", "s"), ("CLUSTER_PARTITIONS", "2")]);
        assert!(embedded.is_err(), "no cluster, no partitions");
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
