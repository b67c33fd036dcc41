//! Streams joining and leaving: the instance's room and the cluster-wide caps, the subscriptions,
//! the first position or a replay, and the lease whose drop removes a stream.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::stream::close_reason;
use super::{Hub, State, Stream};
use crate::broker::{Admission, Admitted, BrokerError, app_channel, user_channel};
use crate::metrics::{AppReasonLabel, Metrics};

/// What a new stream is, before it joins the hub.
pub struct NewStream {
    pub app: String,
    pub user: String,
    pub exp: u64,
    pub remote_addr: SocketAddr,
    pub user_agent: String,
    /// The last event id the client saw (`Last-Event-ID` or `?last_event_id=`): replay from there.
    pub last_event_id: Option<String>,
    /// The cluster-wide caps that apply to it.
    pub caps: Caps,
}

/// Most live streams across the cluster, per application and per user (0: no cap).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub app: u64,
    pub user: u64,
}

/// Why a stream could not join.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error("this instance holds its maximum number of streams")]
    InstanceFull,
    #[error("this user already has {count} streams open (limit {limit})")]
    UserFull { count: u64, limit: u64 },
    #[error("this application holds its maximum number of streams ({limit})")]
    AppFull { limit: u64 },
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the broker did not answer in time")]
    Timeout,
}

/// A stream's membership in the hub; dropping it (when the response body is dropped, i.e. the
/// client is gone or the stream ended) removes the stream and its registry entry.
pub struct Lease {
    conn: Arc<Stream>,
    hub: Arc<Hub>,
}

impl Lease {
    pub fn conn(&self) -> &Arc<Stream> {
        &self.conn
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.hub.detach(&self.conn);
    }
}

/// A stream in the hub that has not joined yet (its admission, subscriptions or catch-up are
/// under way): dropped, it leaves the hub without having been counted as opened.
struct Joining<'a> {
    conn: Arc<Stream>,
    hub: &'a Arc<Hub>,
    joined: bool,
}

impl Joining<'_> {
    /// The stream is open for its client: counted, and from now on its lease removes it.
    fn joined(mut self) -> Lease {
        self.joined = true;
        let label = Metrics::app(&self.conn.app);
        self.hub.metrics.connections.get_or_create(&label).inc();
        self.hub.metrics.active_clients.inc();
        self.hub
            .metrics
            .connections_opened
            .get_or_create(&label)
            .inc();
        Lease {
            conn: self.conn.clone(),
            hub: self.hub.clone(),
        }
    }
}

impl Drop for Joining<'_> {
    fn drop(&mut self) {
        if !self.joined {
            self.hub.remove(&self.conn);
        }
    }
}

impl Hub {
    /// Adds a stream, returning once its place is admitted under the cluster-wide caps, its
    /// subscriptions are live and, when it resumes from an id, once what it missed is queued ahead
    /// of live events. On error the stream is already gone.
    ///
    /// The admission runs beside the subscriptions and the history read rather than before them:
    /// in a reconnect storm its round trip was most of a stream's wait. A refused stream has then
    /// cost a subscription and a read, which the connect rates per user and token bound.
    pub async fn attach(self: &Arc<Self>, mut new: NewStream) -> Result<Lease, AttachError> {
        // From here on the stream's application is its user's history (see `Partitions`).
        if let Cow::Owned(history) = self.config.partitions.history(&new.app, &new.user) {
            new.app = history;
        }
        let id = uuid::Uuid::new_v4();
        // The instance's own room is checked first, so that a full instance costs the broker
        // nothing.
        let joining = self.insert(id, &new)?;
        let conn = &joining.conn;
        let channels = vec![user_channel(&new.app, &new.user), app_channel(&new.app)];
        let caught_up = async {
            self.broker.subscribe(channels).await?;
            let start = self.position(&conn.app).await?;
            Ok::<_, AttachError>(match &new.last_event_id {
                None => (Vec::new(), Some(start), false),
                Some(last) => self.replay(conn, last).await,
            })
        };
        // Both are awaited even when one fails: an admission abandoned in flight could reserve
        // its place after the removal meant to give it back.
        let both = async { tokio::join!(self.admit(&new, conn), caught_up) };
        let (written, (replay, after, more)) =
            match tokio::time::timeout(self.config.broker_timeout, both).await {
                Ok((Ok(written), Ok(caught_up))) => (written, caught_up),
                Ok((Err(e), _) | (_, Err(e))) => return Err(self.not_joined(joining, e)),
                Err(_) => return Err(self.not_joined(joining, AttachError::Timeout)),
            };
        let open = if more {
            conn.catch_up_page(replay, after)
        } else {
            conn.catch_up(replay, after)
        };
        if !open {
            // Ended while joining (the subscriber link was lost meanwhile): the client retries,
            // and resumes by id.
            let lost =
                BrokerError::Unavailable("the broker link was lost while the stream joined".into());
            return Err(self.not_joined(joining, AttachError::Broker(lost)));
        }
        if more {
            tokio::spawn(self.clone().page_on(conn.clone(), after));
        }
        // An admission wrote the registry entry already.
        if !written {
            self.registry.put(conn);
        }
        Ok(joining.joined())
    }

    /// Ends a stream that could not join; dropping `joining` removes it.
    fn not_joined(&self, joining: Joining<'_>, e: AttachError) -> AttachError {
        joining.conn.finish(close_reason::BROKER_UNAVAILABLE, None);
        e
    }

    /// Whether this instance takes one more stream.
    pub(super) fn room(&self, state: &State) -> Result<(), AttachError> {
        if state.closed {
            return Err(AttachError::ShuttingDown);
        }
        if self.config.max_connections > 0 && state.len >= self.config.max_connections {
            return Err(AttachError::InstanceFull);
        }
        Ok(())
    }

    /// Reserves the stream's place under the cluster-wide caps, in one atomic broker step (a
    /// burst of connects on any number of instances never gets past a cap) that also writes its
    /// registry entry. `false` when no cap applies: nothing was written.
    async fn admit(&self, new: &NewStream, conn: &Stream) -> Result<bool, AttachError> {
        if new.caps == Caps::default() {
            return Ok(false);
        }
        let admission = Admission {
            record: self.registry.record(conn),
            max_app: self.config.partitions.share(new.caps.app),
            max_user: new.caps.user,
            ttl_secs: self.config.registry_ttl_secs,
        };
        let admitted =
            tokio::time::timeout(self.config.broker_timeout, self.broker.admit(admission))
                .await
                .map_err(|_| AttachError::Timeout)??;
        match admitted {
            Admitted::Yes => Ok(true),
            Admitted::UserFull(count) => Err(AttachError::UserFull {
                count,
                limit: new.caps.user,
            }),
            Admitted::AppFull(_) => Err(AttachError::AppFull {
                limit: new.caps.app,
            }),
        }
    }

    fn insert<'a>(
        self: &'a Arc<Self>,
        id: uuid::Uuid,
        new: &NewStream,
    ) -> Result<Joining<'a>, AttachError> {
        let mut state = self.lock();
        self.room(&state)?;
        let app: Arc<str> = match state.apps.get_key_value(new.app.as_str()) {
            Some((k, _)) => k.clone(),
            None => Arc::from(new.app.as_str()),
        };
        let entry = state.apps.entry(app.clone()).or_default();
        let user: Arc<str> = match entry.users.get_key_value(new.user.as_str()) {
            Some((k, _)) => k.clone(),
            None => Arc::from(new.user.as_str()),
        };
        let conn = Arc::new(Stream::new(
            id,
            new,
            (app, user.clone()),
            self.next_key.fetch_add(1, Ordering::Relaxed),
            self.config.queue,
            self.config.hello.clone(),
        ));
        entry.conns.insert(conn.key, conn.clone());
        entry
            .users
            .entry(user)
            .or_default()
            .insert(conn.key, conn.clone());
        state.expiries.insert((conn.exp, conn.key), conn.clone());
        state.len += 1;
        Ok(Joining {
            conn,
            hub: self,
            joined: false,
        })
    }

    /// Removes a stream that had joined, counting why it ended.
    pub(super) fn detach(&self, conn: &Arc<Stream>) {
        let reason = conn.close_reason();
        if !self.remove(conn) {
            return;
        }
        let label = Metrics::app(&conn.app);
        self.metrics.connections.get_or_create(&label).dec();
        self.metrics.active_clients.dec();
        self.metrics
            .connections_closed
            .get_or_create(&AppReasonLabel {
                app: conn.tenant().to_string(),
                reason,
            })
            .inc();
        tracing::debug!(app = %conn.app, user = %conn.user, conn = %conn.id, reason, "stream closed");
    }

    /// Takes a stream out of the hub, its subscriptions and the registry; `false` if it was not
    /// in the hub (already removed).
    fn remove(&self, conn: &Arc<Stream>) -> bool {
        let mut state = self.lock();
        state.expiries.remove(&(conn.exp, conn.key));
        let Some(entry) = state.apps.get_mut(&*conn.app) else {
            return false;
        };
        if entry.conns.remove(&conn.key).is_none() {
            return false;
        }
        let mut unsubscribe = Vec::new();
        if let Some(users) = entry.users.get_mut(&*conn.user) {
            users.remove(&conn.key);
            if users.is_empty() {
                entry.users.remove(&*conn.user);
                unsubscribe.push(user_channel(&conn.app, &conn.user));
            }
        }
        if entry.conns.is_empty() {
            state.apps.remove(&*conn.app);
            unsubscribe.push(app_channel(&conn.app));
            // Unsubscribed, this instance no longer follows the application's history.
            if let Some(p) = state.positions.get_mut(&*conn.app) {
                p.delivered = None;
                p.resyncing = false;
            }
        }
        state.len -= 1;
        // The last stream's unsubscribe is sent under the lock: a stream that joins after it
        // sends its subscribe later, so the broker always ends up subscribed when it should.
        if !unsubscribe.is_empty() {
            self.broker.unsubscribe(unsubscribe);
        }
        // Also under the lock, so that no heartbeat touch of this stream is queued after this
        // delete (a touch that finds the entry gone would write it again). Always: a stream
        // that never joined may hold the place its admission reserved.
        self.registry.remove(conn);
        true
    }
}
