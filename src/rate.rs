//! Request rates: token buckets per token, per user and per application, for connects, resumes
//! and publishes, so that one client or one tenant cannot take an instance's CPU or its broker's.
//!
//! Rates are counted per instance (a fleet of N instances behind a balancer lets through up to N
//! times the rate): a check costs a hash lookup, never a broker round trip. Each bucket holds two
//! seconds' worth, so a page that opens a few streams at once is never refused.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What is being done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Opening a stream.
    Connect,
    /// Opening a stream that resumes from an id (a history read).
    Resume,
    /// `POST /publish`.
    Publish,
}

/// Who it is counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Token,
    User,
    App,
}

/// A sustained rate, per second (0: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rate(pub f64);

impl Rate {
    fn burst(self) -> f64 {
        (self.0 * 2.0).max(1.0)
    }
}

/// The rates in force, as configured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rates {
    pub connect_token: Rate,
    pub connect_user: Rate,
    pub connect_app: Rate,
    pub resume_user: Rate,
    pub resume_app: Rate,
    pub publish_token: Rate,
    pub publish_app: Rate,
}

impl Rates {
    fn get(&self, action: Action, scope: Scope) -> Rate {
        match (action, scope) {
            (Action::Connect, Scope::Token) => self.connect_token,
            (Action::Connect, Scope::User) => self.connect_user,
            (Action::Connect, Scope::App) => self.connect_app,
            (Action::Resume, Scope::User) => self.resume_user,
            (Action::Resume, Scope::App) => self.resume_app,
            (Action::Resume, Scope::Token) => Rate(0.0),
            (Action::Publish, Scope::Token) => self.publish_token,
            (Action::Publish, Scope::App) => self.publish_app,
            (Action::Publish, Scope::User) => Rate(0.0),
        }
    }
}

/// An action refused: which rate it went over, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limited {
    pub action: Action,
    pub scope: Scope,
    pub retry_after: Duration,
}

impl Limited {
    /// The metric label: `connect_user_rate`, say.
    pub fn label(&self) -> &'static str {
        match (self.action, self.scope) {
            (Action::Connect, Scope::Token) => "connect_token_rate",
            (Action::Connect, Scope::User) => "connect_user_rate",
            (Action::Connect, Scope::App) => "connect_app_rate",
            (Action::Resume, Scope::App) => "resume_app_rate",
            (Action::Resume, _) => "resume_user_rate",
            (Action::Publish, Scope::App) => "publish_app_rate",
            (Action::Publish, _) => "publish_token_rate",
        }
    }

    /// The `Retry-After` value: whole seconds, at least one.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets are keyed by a hash of what they count (a token's text is not kept); the hasher's
/// keys are random per process, so clients cannot aim collisions.
type Key = (Action, Scope, u64);

pub struct Limiter {
    rates: Rates,
    hasher: RandomState,
    buckets: Mutex<Buckets>,
}

#[derive(Default)]
struct Buckets {
    map: HashMap<Key, Bucket>,
    /// Size after the last sweep: the map is swept (full buckets dropped) when it doubles.
    swept_len: usize,
}

impl Limiter {
    pub fn new(rates: Rates) -> Limiter {
        Limiter {
            rates,
            hasher: RandomState::new(),
            buckets: Mutex::default(),
        }
    }

    /// Takes one unit of `action` from every bucket in `who` (scope and what it counts), or
    /// none if any of them is empty.
    pub fn check(&self, action: Action, who: &[(Scope, &str)]) -> Result<(), Limited> {
        self.check_at(action, who, Instant::now())
    }

    fn check_at(&self, action: Action, who: &[(Scope, &str)], now: Instant) -> Result<(), Limited> {
        let limited: Vec<(Key, Rate)> = who
            .iter()
            .map(|(scope, name)| (*scope, self.rates.get(action, *scope), name))
            .filter(|(_, rate, _)| rate.0 > 0.0)
            .map(|(scope, rate, name)| ((action, scope, self.hasher.hash_one(name)), rate))
            .collect();
        if limited.is_empty() {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        // Refill everything first, then take from all or none, so that a refusal by one bucket
        // does not drain the others.
        let mut refused = None;
        for (key, rate) in &limited {
            let bucket = buckets.map.entry(*key).or_insert(Bucket {
                tokens: rate.burst(),
                at: now,
            });
            let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
            bucket.tokens = (bucket.tokens + elapsed * rate.0).min(rate.burst());
            bucket.at = now;
            if bucket.tokens < 1.0 && refused.is_none() {
                refused = Some(Limited {
                    action,
                    scope: key.1,
                    retry_after: Duration::from_secs_f64((1.0 - bucket.tokens) / rate.0),
                });
            }
        }
        if let Some(limited) = refused {
            return Err(limited);
        }
        for (key, _) in &limited {
            if let Some(bucket) = buckets.map.get_mut(key) {
                bucket.tokens -= 1.0;
            }
        }
        buckets.sweep(&self.rates, now);
        Ok(())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.lock().map(|b| b.map.len()).unwrap_or(0)
    }
}

impl Buckets {
    /// Drops buckets that have refilled (they hold nothing a new bucket would not), once the map
    /// has doubled since the last sweep: memory stays in proportion to recent callers.
    fn sweep(&mut self, rates: &Rates, now: Instant) {
        if self.map.len() < 1024 || self.map.len() < self.swept_len * 2 {
            return;
        }
        self.map.retain(|(action, scope, _), b| {
            let rate = rates.get(*action, *scope);
            let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens + elapsed * rate.0 < rate.burst()
        });
        self.swept_len = self.map.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> Limiter {
        Limiter::new(Rates {
            connect_user: Rate(2.0),
            connect_app: Rate(10.0),
            ..Rates::default()
        })
    }

    #[test]
    fn a_burst_of_two_seconds_then_the_rate() {
        let l = limiter();
        let t = Instant::now();
        let who = [(Scope::User, "shop/alice"), (Scope::App, "shop")];
        for _ in 0..4 {
            assert_eq!(l.check_at(Action::Connect, &who, t), Ok(()));
        }
        let refused = l.check_at(Action::Connect, &who, t).unwrap_err();
        assert_eq!(
            (refused.scope, refused.label()),
            (Scope::User, "connect_user_rate")
        );
        assert_eq!(refused.retry_after_secs(), 1);
        // Half a second later, one more at 2/s.
        let later = t + Duration::from_millis(500);
        assert_eq!(l.check_at(Action::Connect, &who, later), Ok(()));
        assert!(l.check_at(Action::Connect, &who, later).is_err());
        // Another user is not affected; unlimited actions are never counted.
        assert_eq!(
            l.check_at(Action::Connect, &[(Scope::User, "shop/bob")], t),
            Ok(())
        );
        assert_eq!(l.check_at(Action::Publish, &who, t), Ok(()));
    }

    #[test]
    fn a_refusal_takes_nothing_from_the_other_buckets() {
        let l = limiter();
        let t = Instant::now();
        for _ in 0..4 {
            l.check_at(
                Action::Connect,
                &[(Scope::User, "u1"), (Scope::App, "a")],
                t,
            )
            .unwrap();
        }
        for _ in 0..10 {
            assert!(
                l.check_at(
                    Action::Connect,
                    &[(Scope::User, "u1"), (Scope::App, "a")],
                    t
                )
                .is_err()
            );
        }
        // The application's bucket (20) lost only the four that got through.
        for n in 0..16 {
            let user = format!("other{n}");
            assert_eq!(
                l.check_at(
                    Action::Connect,
                    &[(Scope::User, &user), (Scope::App, "a")],
                    t
                ),
                Ok(()),
                "{n}"
            );
        }
        let refused = l
            .check_at(
                Action::Connect,
                &[(Scope::User, "late"), (Scope::App, "a")],
                t,
            )
            .unwrap_err();
        assert_eq!(refused.scope, Scope::App);
    }

    #[test]
    fn idle_buckets_are_dropped() {
        let l = limiter();
        let t = Instant::now();
        for n in 0..3000 {
            let user = n.to_string();
            l.check_at(Action::Connect, &[(Scope::User, &user)], t)
                .unwrap();
        }
        assert!(l.len() <= 3000);
        let later = t + Duration::from_secs(5);
        for n in 0..2100 {
            let user = format!("later{n}");
            l.check_at(Action::Connect, &[(Scope::User, &user)], later)
                .unwrap();
        }
        assert!(
            l.len() < 3000,
            "the refilled first 3000 were swept: {}",
            l.len()
        );
    }
}
