//! Servers announce themselves: a lease, the instance's keys, and a task that
//! keeps both alive for as long as the [`Registration`] lives.
//!
//! # Lifecycle
//!
//! 1. [`RegistrationBuilder::register`] grants a lease (default TTL 10 s) and
//!    writes every key with it atomically (one put, or one transaction for
//!    several services), retrying with back-off
//!    until the start-up deadline.
//! 2. A background task keeps the lease alive over **one long-lived
//!    keep-alive stream**, sending a keep-alive every TTL/3 and draining every
//!    reply. etcd-client's stream never recovers by itself; when it errors,
//!    ends or goes silent, the task **re-attaches to the same lease** (it
//!    usually survived: etcd renews leases when it regains a leader). When
//!    etcd says the lease is gone (not found, or a reply with TTL 0), it
//!    grants a new lease and writes every key again. Retries back off
//!    exponentially with jitter up to a second and never stop; while etcd
//!    pushes back ("too many requests", renewals refused while it catches
//!    up) up to 16 s, and grants and puts are never sent twice in one
//!    attempt (see `benches/storm.rs`: a fleet re-registering at once).
//!    The first keep-alive goes out between a third and two thirds of the
//!    TTL after the grant, not at once: the lease was just granted, and in
//!    a fleet starting together renewals sent during the storm of grants
//!    and puts are what etcd can least afford (see `benches/storm.rs`).
//! 3. Every 30 s (`key_check_interval`) the task also checks, in one read-only
//!    transaction, that each key still holds this instance's value under this
//!    lease, and writes them back if someone deleted or overwrote them.
//!    While etcd answers slowly (over a second, in the last 30 s) the check
//!    is skipped and a quiet keep-alive stream is given the whole TTL: its
//!    answers are late, not lost, and 10,000 instances re-attaching and
//!    checking is load an etcd that is behind cannot take.
//! 4. [`Registration::deregister`] revokes the lease (deleting every key) and
//!    waits for etcd's answer; dropping the `Registration` revokes it in the
//!    background. A registration attempt cut off by either (or by shutdown
//!    during start-up) revokes the lease it was granted.
//!
//! The background task owns all of this; the [`Registration`] handle only
//! sends it commands ([`update_metadata`](Registration::update_metadata),
//! stop) and watches its state. The task's etcd calls go through a small
//! internal trait, so its timing is unit-tested on a paused clock.
//!
//! Writes are idempotent: a retry after an ambiguous timeout writes the same
//! value again. If a key already exists under another lease (a restarted
//! process at the same address whose old lease has not expired yet), it is
//! overwritten with a warning: the new process is the one serving there now.
//!
//! State changes are logged with `tracing` and published on
//! [`Registration::watch_state`].

mod shared;
mod store;
mod worker;

pub(crate) use shared::{LeaseKey, SharedLease};

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::Etcd;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::instance::validate_advertised;
use crate::schema::{Encoded, NamingSchema, Schema};
use crate::{Error, Instance, Metadata};
use worker::{Command, Spec, Worker};

/// etcd refuses shorter TTLs (it raises them to 2 s).
const MIN_TTL: Duration = Duration::from_secs(2);
const DEFAULT_TTL: Duration = Duration::from_secs(10);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Consul's anti-entropy runs at most once a minute. A check every keep-alive
/// tick (TTL/3) made 10,000 idle registrations cost etcd 1.16 CPU s/s, 0.82
/// with one every 30 s (`scale` benchmark, one run); the rest is keep-alives.
const DEFAULT_KEY_CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// The key check compares value and lease of each key in one transaction;
/// etcd allows 128 operations per transaction by default.
const MAX_SERVICES: usize = 64;

/// Where a registration stands.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum RegistrationState {
    /// The first registration is being made.
    Registering,
    /// Every key is in etcd under `lease_id`, and the lease is kept alive.
    Registered {
        /// The lease the keys are attached to.
        lease_id: i64,
    },
    /// The lease is gone (etcd lost it, or it expired during a partition);
    /// a new one is being granted.
    Lost {
        /// What was observed.
        reason: String,
    },
    /// etcd could not be reached; retrying with back-off.
    Retrying {
        /// Retries since the last success.
        attempt: u32,
        /// The last error, with its `source()` chain.
        error: Arc<Error>,
    },
    /// The registration ended; its keys were removed (or expire with the lease).
    Deregistered,
}

/// Errors compare by their message: two `Retrying` states are equal when
/// they would log the same.
impl PartialEq for RegistrationState {
    fn eq(&self, other: &Self) -> bool {
        use RegistrationState as S;
        match (self, other) {
            (S::Registering, S::Registering) | (S::Deregistered, S::Deregistered) => true,
            (S::Registered { lease_id: a }, S::Registered { lease_id: b }) => a == b,
            (S::Lost { reason: a }, S::Lost { reason: b }) => a == b,
            (
                S::Retrying {
                    attempt: a,
                    error: e,
                },
                S::Retrying {
                    attempt: b,
                    error: f,
                },
            ) => a == b && e.to_string() == f.to_string(),
            _ => false,
        }
    }
}

impl Eq for RegistrationState {}

/// Options for a registration. Created by [`Registration::builder`].
pub struct RegistrationBuilder {
    client: Etcd,
    schema: Arc<dyn Schema>,
    services: Vec<String>,
    addr: Option<String>,
    id: Option<String>,
    metadata: Metadata,
    ttl: Duration,
    request_timeout: Duration,
    startup_timeout: Duration,
    key_check_interval: Duration,
}

impl fmt::Debug for RegistrationBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistrationBuilder")
            .field("schema", &self.schema)
            .field("services", &self.services)
            .field("addr", &self.addr)
            .field("id", &self.id)
            .field("metadata", &self.metadata)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl RegistrationBuilder {
    /// Adds a service this instance serves; call once per gRPC service (the
    /// whole registration shares one lease).
    #[must_use]
    pub fn service(mut self, name: impl Into<String>) -> Self {
        self.services.push(name.into());
        self
    }

    /// The address clients dial (`host:port`, `[ipv6]:port`, `hostname:port`).
    /// The server integration fills it from the listener when it is unset.
    #[must_use]
    pub fn addr(mut self, addr: impl Into<String>) -> Self {
        self.addr = Some(addr.into());
        self
    }

    /// The instance id, the key's last segment (default: the address).
    #[must_use]
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Metadata stored beside the address (default `null`). See [`Metadata`]
    /// for the hazard object metadata poses to older Go clients.
    #[must_use]
    pub fn metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// The key layout (default [`NamingSchema::new`]).
    #[must_use]
    pub fn schema(mut self, schema: impl Schema) -> Self {
        self.schema = Arc::new(schema);
        self
    }

    /// The lease TTL (default 10 s, at least 2 s): how long a crashed
    /// process's keys outlive it.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = crate::time::cap(ttl);
        self
    }

    /// The limit on each etcd request (default 5 s).
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = crate::time::cap(timeout);
        self
    }

    /// How long [`register`](Self::register) retries an unreachable etcd
    /// before it fails (default 30 s).
    #[must_use]
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = crate::time::cap(timeout);
        self
    }

    /// How often the keys are checked and put back if someone deleted or
    /// overwrote them (default 30 s, rounded up to keep-alive ticks, TTL/3;
    /// the first check of each lease is spread over the first interval).
    /// Each check is a read-only transaction: 10,000 registrations checking
    /// every TTL/3 cost etcd 40 % more CPU than checking every 30 s.
    #[must_use]
    pub fn key_check_interval(mut self, interval: Duration) -> Self {
        self.key_check_interval = crate::time::cap(interval);
        self
    }

    /// The service names this registration announces.
    pub(crate) fn service_names(&self) -> &[String] {
        &self.services
    }

    pub(crate) fn has_addr(&self) -> bool {
        self.addr.is_some()
    }

    /// Checks the options and encodes every key, without touching etcd.
    pub(crate) fn encode(&self) -> Result<Vec<Encoded>, Error> {
        if self.services.is_empty() {
            return Err(Error::InvalidConfig(
                "no service to register: call .service(\"<name>\") at least once".into(),
            ));
        }
        if self.services.len() > MAX_SERVICES {
            return Err(Error::InvalidConfig(format!(
                "{} services in one registration; at most {MAX_SERVICES} fit etcd's default \
                 limit of 128 operations per transaction (2 per key): split them into several \
                 registrations",
                self.services.len()
            )));
        }
        if self.ttl < MIN_TTL {
            return Err(Error::TtlTooShort { ttl: self.ttl });
        }
        if self.ttl.subsec_nanos() != 0 {
            return Err(Error::InvalidConfig(format!(
                "ttl {:?} is not a whole number of seconds: etcd leases count whole \
                 seconds; use e.g. Duration::from_secs({})",
                self.ttl,
                self.ttl.as_secs()
            )));
        }
        if self.request_timeout.is_zero() {
            return Err(Error::InvalidConfig(
                "request_timeout must be above zero".into(),
            ));
        }
        let addr = self.addr.as_deref().ok_or_else(|| {
            Error::InvalidConfig(
                "no address to advertise: call .addr(\"<host:port>\") with the address clients dial"
                    .into(),
            )
        })?;
        validate_advertised(addr)?;
        encode_all(
            &*self.schema,
            &self.services,
            addr,
            self.id.as_deref(),
            &self.metadata,
        )
    }

    /// Registers: grants a lease, writes the keys, and starts keeping them
    /// alive. Retries an unreachable etcd until the start-up deadline.
    pub async fn register(self) -> Result<Registration, Error> {
        let entries = self.encode()?;
        let spec = Spec {
            schema: self.schema,
            services: self.services,
            addr: self.addr.unwrap_or_default(),
            id: self.id,
            entries,
            ttl: self.ttl,
            request_timeout: self.request_timeout,
            key_check_interval: self.key_check_interval,
        };
        start(
            etcd_client::Client::from(self.client),
            spec,
            self.startup_timeout,
        )
        .await
    }
}

/// Makes the first registration (in the caller's task, so that dropping
/// the future cancels it), then hands the lease to a background worker.
async fn start<S: store::Store>(
    store: S,
    spec: Spec,
    startup_timeout: Duration,
) -> Result<Registration, Error> {
    crate::metrics::describe();
    let request_timeout = spec.request_timeout;
    let (state_tx, state_rx) = watch::channel(RegistrationState::Registering);
    let mut worker = Worker::new(store, spec, state_tx);
    let deadline = crate::time::deadline_after(Instant::now(), startup_timeout);
    let lease = worker.start(deadline, startup_timeout).await?;
    let keys = worker.keys();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (commands_tx, commands_rx) = mpsc::channel(8);
    let (done_tx, done_rx) = oneshot::channel();
    tokio::spawn(async move {
        let result = worker.run(lease, stop_rx, commands_rx).await;
        let _ = done_tx.send(result);
    });
    Ok(Registration {
        keys,
        state: state_rx,
        stop: stop_tx,
        commands: commands_tx,
        done: Some(done_rx),
        request_timeout,
    })
}

fn encode_all(
    schema: &dyn Schema,
    services: &[String],
    addr: &str,
    id: Option<&str>,
    metadata: &Metadata,
) -> Result<Vec<Encoded>, Error> {
    services
        .iter()
        .map(|service| {
            schema.encode(&Instance {
                service: service.clone(),
                id: id.unwrap_or(addr).to_owned(),
                addr: addr.to_owned(),
                metadata: metadata.clone(),
            })
        })
        .collect()
}

/// A live registration. Dropping it revokes the lease in the background;
/// [`deregister`](Self::deregister) does so and waits for etcd's answer.
#[must_use = "dropping a Registration deregisters the instance at once"]
pub struct Registration {
    keys: Vec<String>,
    state: watch::Receiver<RegistrationState>,
    // Dropping the sender is itself the signal to stop and revoke.
    stop: watch::Sender<bool>,
    commands: mpsc::Sender<Command>,
    done: Option<oneshot::Receiver<Result<(), Error>>>,
    request_timeout: Duration,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("keys", &self.keys)
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

impl Registration {
    /// Options for registering an instance through `client`.
    ///
    /// Any client works, so etcd auth and TLS come from its `ConnectOptions`
    /// (see [`crate::connect_options`] for recommended settings).
    pub fn builder(etcd: impl Into<Etcd>) -> RegistrationBuilder {
        RegistrationBuilder {
            client: etcd.into(),
            schema: Arc::new(NamingSchema::new()),
            services: Vec::new(),
            addr: None,
            id: None,
            metadata: Metadata::new(),
            ttl: DEFAULT_TTL,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            key_check_interval: DEFAULT_KEY_CHECK_INTERVAL,
        }
    }

    /// The etcd keys this registration maintains.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// The current state.
    pub fn state(&self) -> RegistrationState {
        self.state.borrow().clone()
    }

    /// A receiver of every state change.
    pub fn watch_state(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    /// The lease the keys are attached to, while registered.
    pub fn lease_id(&self) -> Option<i64> {
        match *self.state.borrow() {
            RegistrationState::Registered { lease_id } => Some(lease_id),
            _ => None,
        }
    }

    /// Replaces the metadata of every key and writes it now (under the
    /// current lease); answers once etcd has. While etcd is unreachable the
    /// new value is kept and written by the next successful (re-)registration
    /// or repair, and this returns at once.
    pub async fn update_metadata(&self, metadata: Metadata) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Metadata(metadata, reply))
            .await
            .map_err(|_| Error::TaskGone("registration"))?;
        answer.await.map_err(|_| Error::TaskGone("registration"))?
    }

    /// Replaces the set of keys under the lease (see [`shared`]): new and
    /// changed keys are written, dropped ones deleted; answers once etcd
    /// has, or at once while etcd is away (the worker writes them later).
    pub(crate) async fn replace_entries(
        &self,
        services: Vec<String>,
        entries: Vec<Encoded>,
    ) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Entries {
                services,
                entries,
                reply,
            })
            .await
            .map_err(|_| Error::TaskGone("registration"))?;
        answer.await.map_err(|_| Error::TaskGone("registration"))?
    }

    /// Removes the keys (revokes the lease) and waits for etcd's answer,
    /// within the request timeout. On error the keys expire with the lease.
    pub async fn deregister(mut self) -> Result<(), Error> {
        let _ = self.stop.send(true);
        let Some(done) = self.done.take() else {
            return Ok(());
        };
        match tokio::time::timeout(self.request_timeout + Duration::from_secs(1), done).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::TaskGone("registration")),
            Err(_) => Err(Error::Timeout {
                op: "lease revoke",
                timeout: self.request_timeout,
            }),
        }
    }
}

#[cfg(test)]
mod tests;
