//! The validation of a `POST /publish` body: a pure function from the bytes to the targets and the
//! one envelope sent to all of them ([`parse_publish`], fuzzed in `fuzz/`).

use std::collections::HashSet;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::sse::clean_field;

/// Most users one batch publish may name.
pub const MAX_BATCH_USERS: usize = 1000;

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
    if crate::ids::is_safe_id(user) {
        Ok(user)
    } else {
        Err(("invalid_user", format!("{user:?} is not a valid user id")))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

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
