//! Channel names, the publisher contract shared by both brokers: `{app}:channel:{user}` (the
//! original service's name) and `{app}:broadcast` for every user of an app. Both are unambiguous
//! because application and user ids cannot contain `:`.

/// Where a channel's messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic<'a> {
    User { app: &'a str, user: &'a str },
    App { app: &'a str },
}

impl Topic<'_> {
    /// The application (or history) the topic belongs to.
    pub fn app(&self) -> &str {
        match self {
            Topic::User { app, .. } | Topic::App { app } => app,
        }
    }
}

pub fn user_channel(app: &str, user: &str) -> String {
    format!("{app}:channel:{user}")
}

pub fn app_channel(app: &str) -> String {
    format!("{app}:broadcast")
}

/// The inverse of [`user_channel`] and [`app_channel`], also in the hash-tagged form a Redis
/// Cluster uses (`{app}:channel:{user}`, `{app}:broadcast`); `None` for anything else.
pub fn parse_channel(channel: &str) -> Option<Topic<'_>> {
    if let Some(a) = channel.strip_suffix(":broadcast") {
        return untag(a).map(|app| Topic::App { app });
    }
    let (a, user) = channel.split_once(":channel:")?;
    let app = untag(a)?;
    plain_id(user).then_some(Topic::User { app, user })
}

fn plain_id(s: &str) -> bool {
    !s.is_empty() && !s.contains([':', '{', '}'])
}

/// An application id, bare or as a cluster hash tag (`{app}`).
fn untag(s: &str) -> Option<&str> {
    let s = s
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or(s);
    plain_id(s).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_round_trip() {
        assert_eq!(
            parse_channel(&user_channel("a", "u")),
            Some(Topic::User {
                app: "a",
                user: "u"
            })
        );
        assert_eq!(
            parse_channel(&app_channel("a")),
            Some(Topic::App { app: "a" })
        );
        assert_eq!(
            parse_channel("{a}:channel:u"),
            Some(Topic::User {
                app: "a",
                user: "u"
            })
        );
        assert_eq!(
            parse_channel("{a}:broadcast"),
            Some(Topic::App { app: "a" })
        );
        for bad in [
            "",
            "a",
            "a:channel:",
            ":channel:u",
            "a:b:channel:u",
            ":broadcast",
            "a:x:broadcast",
            "{}:broadcast",
            "{a:broadcast",
            "{{a}}:channel:u",
            "{a}:channel:{u}",
        ] {
            assert_eq!(parse_channel(bad), None, "{bad}");
        }
    }
}
