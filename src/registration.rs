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
//!    exponentially with jitter up to a few seconds and never stop.
//! 3. Every keep-alive tick the task also checks, in one read-only
//!    transaction, that each key still holds this instance's value under this
//!    lease, and writes them back if someone deleted or overwrote them.
//! 4. [`Registration::deregister`] revokes the lease (deleting every key) and
//!    waits for etcd's answer; dropping the `Registration` revokes it in the
//!    background.
//!
//! Writes are idempotent: a retry after an ambiguous timeout writes the same
//! value again. If a key already exists under another lease (a restarted
//! process at the same address whose old lease has not expired yet), it is
//! overwritten with a warning: the new process is the one serving there now.
//!
//! State changes are logged with `tracing` and published on
//! [`Registration::watch_state`].

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::instance::validate_advertised;
use crate::retry::with_timeout;
use crate::schema::{Encoded, NamingSchema, Schema};
use crate::{Error, Instance, Metadata};

/// etcd refuses shorter TTLs (it raises them to 2 s).
const MIN_TTL: Duration = Duration::from_secs(2);
const DEFAULT_TTL: Duration = Duration::from_secs(10);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// The key check compares value and lease of each key in one transaction;
/// etcd allows 128 operations per transaction by default.
const MAX_SERVICES: usize = 64;
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Where a registration stands.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        /// The last error.
        error: String,
    },
    /// The registration ended; its keys were removed (or expire with the lease).
    Deregistered,
}

/// Options for a registration. Created by [`Registration::builder`].
pub struct RegistrationBuilder {
    client: Client,
    schema: Arc<dyn Schema>,
    services: Vec<String>,
    addr: Option<String>,
    id: Option<String>,
    metadata: Metadata,
    ttl: Duration,
    request_timeout: Duration,
    startup_timeout: Duration,
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
        let addr = self.addr.clone().unwrap_or_default();
        let ttl_secs = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let (state_tx, state_rx) = watch::channel(RegistrationState::Registering);
        let mut worker = Worker {
            client: self.client,
            services: self.services.clone(),
            entries: Arc::new(Mutex::new(entries)),
            ttl_secs,
            ttl: self.ttl,
            request_timeout: self.request_timeout,
            state: state_tx,
            backoff: Backoff::new(BACKOFF_BASE, BACKOFF_MAX),
        };
        let deadline = crate::time::deadline_after(Instant::now(), self.startup_timeout);
        let lease = loop {
            match worker.register_once().await {
                Ok(lease) => break lease,
                Err(e) if e.is_permanent() => return Err(e),
                Err(e) => {
                    let delay = worker.backoff.next_delay();
                    if Instant::now() + delay >= deadline {
                        return Err(Error::StartupDeadline {
                            deadline: self.startup_timeout,
                            last_error: Box::new(e),
                        });
                    }
                    worker.retrying(&e);
                    tokio::time::sleep(delay).await;
                }
            }
        };
        worker.backoff.reset();
        let keys = worker.keys();
        let entries = worker.entries.clone();
        let client = worker.client.clone();
        let (stop_tx, stop_rx) = watch::channel(false);
        let (done_tx, done_rx) = oneshot::channel();
        tokio::spawn(async move {
            let result = worker.run(lease, stop_rx).await;
            let _ = done_tx.send(result);
        });
        Ok(Registration {
            keys,
            state: state_rx,
            stop: stop_tx,
            done: Some(done_rx),
            entries,
            client,
            request_timeout: self.request_timeout,
            schema: self.schema,
            services: self.services,
            addr,
            id: self.id,
        })
    }
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
    done: Option<oneshot::Receiver<Result<(), Error>>>,
    entries: Arc<Mutex<Vec<Encoded>>>,
    client: Client,
    request_timeout: Duration,
    schema: Arc<dyn Schema>,
    services: Vec<String>,
    addr: String,
    id: Option<String>,
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
    pub fn builder(client: Client) -> RegistrationBuilder {
        RegistrationBuilder {
            client,
            schema: Arc::new(NamingSchema::new()),
            services: Vec::new(),
            addr: None,
            id: None,
            metadata: Metadata::new(),
            ttl: DEFAULT_TTL,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
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
    /// current lease). While etcd is unreachable the new value is kept and
    /// written by the next successful (re-)registration or repair.
    pub async fn update_metadata(&self, metadata: Metadata) -> Result<(), Error> {
        let updated = encode_all(
            &*self.schema,
            &self.services,
            &self.addr,
            self.id.as_deref(),
            &metadata,
        )?;
        match self.entries.lock() {
            Ok(mut entries) => entries.clone_from(&updated),
            Err(_) => return Err(Error::TaskGone("registration")),
        }
        let Some(lease) = self.lease_id() else {
            return Ok(());
        };
        put_all(&self.client, &updated, lease, self.request_timeout).await?;
        Ok(())
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

struct Worker {
    client: Client,
    services: Vec<String>,
    entries: Arc<Mutex<Vec<Encoded>>>,
    ttl_secs: i64,
    ttl: Duration,
    request_timeout: Duration,
    state: watch::Sender<RegistrationState>,
    backoff: Backoff,
}

/// Why a keep-alive session ended.
enum SessionEnd {
    Stopped,
    LeaseLost(String),
}

impl Worker {
    fn keys(&self) -> Vec<String> {
        self.entries().into_iter().map(|e| e.key).collect()
    }

    fn entries(&self) -> Vec<Encoded> {
        self.entries
            .lock()
            .map(|e| e.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn set_state(&self, state: RegistrationState) {
        crate::metrics::registration_state(&self.services, &state);
        self.state.send_replace(state);
    }

    fn retrying(&self, error: &Error) {
        let attempt = self.backoff.attempts();
        if attempt <= 1 && matches!(*self.state.borrow(), RegistrationState::Registering) {
            // Said once, loudly, at start-up: the server is up but unknown to
            // its clients until etcd answers.
            tracing::error!(services = ?self.services, %error,
                "etcd unreachable at start-up: serving unregistered and retrying \
                 until the start-up deadline");
        }
        tracing::warn!(services = ?self.services, attempt, %error, "etcd registration: retrying");
        self.set_state(RegistrationState::Retrying {
            attempt,
            error: error.to_string(),
        });
    }

    /// Grants a lease and writes every key with it.
    ///
    /// Cancellation-safe: when the future is dropped (deregistration or
    /// shutdown during start-up or re-registration) after the lease was
    /// granted, the lease, and with it any key already written, is revoked
    /// in the background, so clients do not keep routing to a server that
    /// is leaving for up to a TTL.
    async fn register_once(&mut self) -> Result<i64, Error> {
        let ttl = self.ttl_secs;
        let lease = with_timeout("lease grant", self.request_timeout, || {
            let mut c = self.client.clone();
            async move { c.lease_grant(ttl, None).await }
        })
        .await?
        .id();
        let guard = RevokeOnDrop::new(self.client.clone(), lease, self.request_timeout);
        // On error the guard revokes: no lease (and maybe keys, if the write
        // was applied after all) is left behind; the next attempt starts clean.
        put_all(&self.client, &self.entries(), lease, self.request_timeout).await?;
        guard.disarm();
        tracing::info!(services = ?self.services, lease, "registered in etcd");
        self.set_state(RegistrationState::Registered { lease_id: lease });
        Ok(lease)
    }

    /// Keeps the registration alive until stopped, then revokes the lease.
    async fn run(mut self, mut lease: i64, mut stop: watch::Receiver<bool>) -> Result<(), Error> {
        // Whether `lease` is still ours to revoke.
        let mut live = true;
        loop {
            match self.keep_alive(lease, &mut stop).await {
                SessionEnd::Stopped => break,
                SessionEnd::LeaseLost(reason) => {
                    tracing::warn!(services = ?self.services, lease, %reason, "etcd lease lost; registering again");
                    crate::metrics::lease_lost(&self.services);
                    self.set_state(RegistrationState::Lost { reason });
                    match self.reregister(&mut stop).await {
                        Some(l) => lease = l,
                        None => {
                            // Stopped mid-way: the old lease is gone and an
                            // abandoned attempt revokes its own.
                            live = false;
                            break;
                        }
                    }
                }
            }
        }
        let result = if live {
            revoke(&self.client, lease, self.request_timeout).await
        } else {
            Ok(())
        };
        match &result {
            Ok(()) => tracing::info!(services = ?self.services, lease, "deregistered from etcd"),
            Err(e) => tracing::warn!(services = ?self.services, lease, error = %e,
                "deregistration failed; the keys expire with the lease"),
        }
        self.set_state(RegistrationState::Deregistered);
        result
    }

    /// Grants a new lease and writes every key, retrying until it works or
    /// the registration is stopped (`None`).
    async fn reregister(&mut self, stop: &mut watch::Receiver<bool>) -> Option<i64> {
        loop {
            let attempt = tokio::select! {
                biased;
                () = stopped(stop) => return None,
                r = self.register_once() => r,
            };
            match attempt {
                Ok(lease) => {
                    self.backoff.reset();
                    return Some(lease);
                }
                Err(e) => {
                    self.retrying(&e);
                    let delay = self.backoff.next_delay();
                    tokio::select! {
                        () = stopped(stop) => return None,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One lease's life: attach a keep-alive stream, keep it fed and drained,
    /// re-attach when it fails, until the lease is lost or we are stopped.
    async fn keep_alive(&mut self, lease: i64, stop: &mut watch::Receiver<bool>) -> SessionEnd {
        let interval = (self.ttl / 3).max(Duration::from_millis(500));
        let mut first = true;
        loop {
            let attach = with_timeout("lease keep-alive", self.request_timeout, || {
                let mut c = self.client.clone();
                async move { c.lease_keep_alive(lease).await }
            });
            let attached = tokio::select! {
                biased;
                () = stopped(stop) => return SessionEnd::Stopped,
                r = attach => r,
            };
            let (mut keeper, mut stream) = match attached {
                Ok(pair) => pair,
                Err(e) if is_lease_not_found(&e) => return SessionEnd::LeaseLost(e.to_string()),
                Err(e) => {
                    self.retrying(&e);
                    let delay = self.backoff.next_delay();
                    tokio::select! {
                        () = stopped(stop) => return SessionEnd::Stopped,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            if !first {
                tracing::info!(services = ?self.services, lease, "re-attached to the same etcd lease");
                // Keys may have been removed while we were away.
                if self.repair_unless_stopped(lease, stop).await {
                    return SessionEnd::Stopped;
                }
            }
            first = false;
            self.backoff.reset();
            self.set_state(RegistrationState::Registered { lease_id: lease });

            // Attaching already renewed the lease.
            let mut last_ack = Instant::now();
            let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let broken = loop {
                // A stream that stops answering is as dead as one that
                // errors: partitions hang silently. Detected after one and a
                // half keep-alive intervals (half the TTL), so re-attaching
                // to the same lease can still succeed before it expires.
                let silent_deadline = last_ack + interval + interval / 2;
                tokio::select! {
                    biased;
                    () = stopped(stop) => return SessionEnd::Stopped,
                    msg = stream.message() => match msg {
                        Ok(Some(resp)) if resp.ttl() <= 0 => {
                            return SessionEnd::LeaseLost("keep-alive answered TTL 0".into());
                        }
                        Ok(Some(_)) => last_ack = Instant::now(),
                        Ok(None) => break "keep-alive stream ended".to_string(),
                        Err(e) => break format!("keep-alive stream failed: {e}"),
                    },
                    _ = tick.tick() => {
                        if let Err(e) = keeper.keep_alive().await {
                            break format!("keep-alive send failed: {e}");
                        }
                        if self.repair_unless_stopped(lease, stop).await {
                            return SessionEnd::Stopped;
                        }
                    }
                    () = tokio::time::sleep_until(silent_deadline) => {
                        break format!("no keep-alive answer for {:?}", silent_deadline - last_ack);
                    }
                }
            };
            tracing::warn!(services = ?self.services, lease, reason = %broken, "etcd keep-alive broken; re-attaching");
            self.set_state(RegistrationState::Retrying {
                attempt: self.backoff.attempts(),
                error: broken,
            });
        }
    }

    /// Runs [`repair`](Self::repair) unless asked to stop first; true when
    /// stopped. The check can take a whole request timeout against a slow
    /// etcd, and `deregister` must not wait for it.
    async fn repair_unless_stopped(&self, lease: i64, stop: &mut watch::Receiver<bool>) -> bool {
        tokio::select! {
            biased;
            () = stopped(stop) => true,
            () = self.repair(lease) => false,
        }
    }

    /// Writes back any key that is missing, changed, or under another lease.
    ///
    /// The check is a transaction of compares with no operation in either
    /// branch: etcd serves it on its read path (`isTxnReadonly` holds only
    /// when every op is a range), so a healthy registration costs etcd no
    /// Raft proposal and no WAL write between keep-alives, which are not
    /// proposals either. Only when a compare fails does a guarded put follow.
    async fn repair(&self, lease: i64) {
        let entries = self.entries();
        let compares: Vec<Compare> = entries
            .iter()
            .flat_map(|e| {
                [
                    Compare::value(e.key.as_str(), CompareOp::Equal, e.value.clone()),
                    Compare::lease(e.key.as_str(), CompareOp::Equal, lease),
                ]
            })
            .collect();
        let check = Txn::new().when(compares.clone());
        let checked = with_timeout("key check", self.request_timeout, || {
            let mut c = self.client.clone();
            let txn = check.clone();
            async move { c.txn(txn).await }
        });
        match checked.await {
            Ok(resp) if resp.succeeded() => return,
            Ok(_) => {}
            // The keep-alive path notices real outages; this is only a check.
            Err(e) => return tracing::debug!(error = %e, "key check failed"),
        }
        let puts = put_ops(&entries, &PutOptions::new().with_lease(lease));
        let repair = Txn::new().when(compares).or_else(puts);
        let repaired = with_timeout("key repair", self.request_timeout, || {
            let mut c = self.client.clone();
            let txn = repair.clone();
            async move { c.txn(txn).await }
        });
        match repaired.await {
            Ok(resp) if !resp.succeeded() => {
                tracing::warn!(services = ?self.services, lease,
                    "a registered key was deleted or changed by someone else; restored it");
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "key repair failed"),
        }
    }
}

/// A put of every entry, for a transaction.
fn put_ops(entries: &[Encoded], opts: &PutOptions) -> Vec<TxnOp> {
    entries
        .iter()
        .map(|e| TxnOp::put(e.key.as_str(), e.value.clone(), Some(opts.clone())))
        .collect()
}

/// Writes every entry with `lease` in one transaction, warning about keys
/// that were held by another lease.
async fn put_all(
    client: &Client,
    entries: &[Encoded],
    lease: i64,
    timeout: Duration,
) -> Result<(), Error> {
    let opts = PutOptions::new().with_lease(lease).with_prev_key();
    let previous: Vec<Option<KeyValue>> = if let [only] = entries {
        // One key needs no transaction: a plain put is atomic and cheaper.
        let resp = with_timeout("put", timeout, || {
            let mut c = client.clone();
            let (key, value, opts) = (only.key.clone(), only.value.clone(), opts.clone());
            async move { c.put(key, value, Some(opts)).await }
        })
        .await?;
        vec![resp.prev_key().cloned()]
    } else {
        let txn = Txn::new().and_then(put_ops(entries, &opts));
        let resp = with_timeout("put", timeout, || {
            let mut c = client.clone();
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await?;
        resp.op_responses()
            .into_iter()
            .map(|op| match op {
                TxnOpResponse::Put(put) => put.prev_key().cloned(),
                _ => None,
            })
            .collect()
    };
    for prev in previous.into_iter().flatten() {
        if prev.lease() != 0 && prev.lease() != lease {
            tracing::warn!(
                key = %String::from_utf8_lossy(prev.key()),
                old_lease = prev.lease(),
                "overwrote a key held by another lease (a previous process at this address?)"
            );
        }
    }
    Ok(())
}

async fn revoke(client: &Client, lease: i64, timeout: Duration) -> Result<(), Error> {
    let revoked = with_timeout("lease revoke", timeout, || {
        let mut c = client.clone();
        async move { c.lease_revoke(lease).await }
    });
    match revoked.await {
        Ok(_) => Ok(()),
        // Already gone: so are its keys.
        Err(e) if is_lease_not_found(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

fn revoke_in_background(client: Client, lease: i64, timeout: Duration) {
    // A drop outside a runtime (at process exit) leaves the lease to expire.
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let _ = revoke(&client, lease, timeout).await;
        });
    }
}

/// Revokes a freshly granted lease unless disarmed: makes a registration
/// attempt safe to cancel.
struct RevokeOnDrop {
    armed: Option<(Client, i64, Duration)>,
}

impl RevokeOnDrop {
    fn new(client: Client, lease: i64, timeout: Duration) -> Self {
        Self {
            armed: Some((client, lease, timeout)),
        }
    }

    fn disarm(mut self) {
        self.armed = None;
    }
}

impl Drop for RevokeOnDrop {
    fn drop(&mut self) {
        if let Some((client, lease, timeout)) = self.armed.take() {
            tracing::debug!(lease, "registration attempt abandoned; revoking its lease");
            revoke_in_background(client, lease, timeout);
        }
    }
}

/// etcd's "requested lease not found", or etcd-client's check of the first
/// keep-alive answer (TTL <= 0).
fn is_lease_not_found(e: &Error) -> bool {
    match e {
        Error::Etcd { source, .. } => match source {
            // etcd-client's own word for a first answer with TTL 0.
            etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
            // etcd's ErrGRPCLeaseNotFound; no other lease RPC answers NotFound.
            etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::NotFound,
            _ => false,
        },
        _ => false,
    }
}

/// Resolves once the owner asked to stop or went away.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}
