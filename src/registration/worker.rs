//! The task that owns a registration: it grants the lease, writes the keys,
//! keeps both alive, takes commands from the [`Registration`](super::Registration)
//! handle, and revokes the lease when it stops.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::store::{KeepAlive, Store};
use super::{encode_all, RegistrationState};
use crate::backoff::Backoff;
use crate::retry::{once, with_timeout};
use crate::schema::{Encoded, Schema};
use crate::{Error, Metadata};

const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// While etcd says it is overloaded ("too many requests", or requests that
/// time out while it answers others), attempts back off much further: a
/// fleet re-registering every second after a wipe kept 10,000 instances
/// from ever converging (13.6 Raft proposals per instance, the storm
/// benchmark). A reachable, idle etcd still sees retries within a second.
const OVERLOAD_BACKOFF_BASE: Duration = Duration::from_millis(500);
const OVERLOAD_BACKOFF_MAX: Duration = Duration::from_secs(16);
/// The keep-alive interval never drops below this, whatever the TTL.
const MIN_INTERVAL: Duration = Duration::from_millis(500);
/// An answer slower than this means etcd is behind (a healthy etcd answers
/// in milliseconds; a leader election stalls requests, it does not slow them).
const SLOW_ANSWER: Duration = Duration::from_secs(1);
/// How long etcd counts as pressed after its last sign of overload.
const PRESSURE_MEMORY: Duration = Duration::from_secs(30);

/// A request from the handle.
pub(super) enum Command {
    /// New metadata for every key; answered once written (or kept for the
    /// next registration while etcd is unreachable).
    Metadata(Metadata, oneshot::Sender<Result<(), Error>>),
    /// A new set of keys under the same lease (the keys a process shares
    /// one lease for, see [`super::shared`]): keys added or changed are
    /// written, keys dropped are deleted; answered like `Metadata`.
    Entries {
        /// What the keys stand for, in logs and metrics.
        services: Vec<String>,
        entries: Vec<Encoded>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
}

/// What the worker needs to know about the instance.
pub(super) struct Spec {
    pub(super) schema: Arc<dyn Schema>,
    pub(super) services: Vec<String>,
    pub(super) addr: String,
    pub(super) id: Option<String>,
    pub(super) entries: Vec<Encoded>,
    pub(super) ttl: Duration,
    pub(super) request_timeout: Duration,
    pub(super) key_check_interval: Duration,
}

pub(super) struct Worker<S> {
    store: S,
    spec: Spec,
    ttl_secs: i64,
    state: watch::Sender<RegistrationState>,
    backoff: Backoff,
    /// The back-off while etcd is overloaded (see [`OVERLOAD_BACKOFF_MAX`]).
    overload: Backoff,
    /// Metadata changed while no lease was attached; the next repair writes it.
    unwritten: bool,
    /// Keys dropped from the set that may still be under the lease (the
    /// delete was not answered); the next repair deletes them. A new lease
    /// forgets them: they went with the old one.
    stale: Vec<String>,
    /// Until when etcd counts as overloaded (see [`Worker::pressed`]).
    pressed_until: Option<Instant>,
    /// When etcd answered the grant of the current lease: its TTL runs from
    /// about then, however long the put took.
    granted: Instant,
    /// How long etcd took to answer the put after that grant: about how late
    /// a renewal sent now would take effect.
    put_took: Duration,
}

/// Why a keep-alive session ended.
enum SessionEnd {
    Stopped,
    LeaseLost(String),
}

impl<S: Store> Worker<S> {
    pub(super) fn new(store: S, spec: Spec, state: watch::Sender<RegistrationState>) -> Self {
        Self {
            store,
            ttl_secs: i64::try_from(spec.ttl.as_secs()).unwrap_or(i64::MAX),
            spec,
            state,
            backoff: Backoff::new(BACKOFF_BASE, BACKOFF_MAX),
            overload: Backoff::new(OVERLOAD_BACKOFF_BASE, OVERLOAD_BACKOFF_MAX),
            unwritten: false,
            stale: Vec::new(),
            pressed_until: None,
            granted: Instant::now(),
            put_took: Duration::ZERO,
        }
    }

    /// Whether etcd showed overload (pushed back, timed out, or answered
    /// slower than [`SLOW_ANSWER`]) in the last [`PRESSURE_MEMORY`]. While
    /// it did, this registration adds nothing that can wait: no key checks,
    /// no keep-alive attach sent again when it stalls, and a keep-alive
    /// stream that goes quiet is waited for until the lease's TTL has run
    /// out rather than half of it (its answers are late, not lost). In a
    /// 10,000-instance storm those three were most of etcd's load.
    fn pressed(&self) -> bool {
        self.pressed_until
            .is_some_and(|until| Instant::now() < until)
    }

    fn press(&mut self) {
        self.pressed_until = Some(Instant::now() + PRESSURE_MEMORY);
    }

    /// Notes what an answer says about etcd's load. Only answers count:
    /// etcd pushing back, or answering late. A request that timed out got
    /// no answer, which a partition explains as well as an overload, and a
    /// partition must keep its quick re-attach (a partition shorter than
    /// the TTL keeps the lease).
    fn observe(&mut self, error: Option<&Error>, took: Duration) {
        let answered = !matches!(error, Some(Error::Timeout { .. }));
        if answered && (error.is_some_and(Error::is_overload) || took >= SLOW_ANSWER) {
            self.press();
        }
    }

    pub(super) fn keys(&self) -> Vec<String> {
        self.spec.entries.iter().map(|e| e.key.clone()).collect()
    }

    /// The first registration, retried until `deadline`; permanent errors
    /// end it at once. Cancellation-safe (see [`register_once`](Self::register_once)).
    pub(super) async fn start(&mut self, deadline: Instant, limit: Duration) -> Result<i64, Error> {
        let timed_out = |last_error| Error::StartupDeadline {
            deadline: limit,
            last_error,
        };
        let mut last = None;
        loop {
            // An attempt in flight at the deadline is cut off there (and
            // revokes what it granted).
            let began = Instant::now();
            let attempt = tokio::time::timeout_at(deadline, self.register_once()).await;
            if let Ok(r) = &attempt {
                self.observe(r.as_ref().err(), began.elapsed());
            }
            match attempt {
                Ok(Ok((lease, granted))) => {
                    self.registered(granted);
                    return Ok(lease);
                }
                Ok(Err(e)) if e.is_permanent() => return Err(e),
                Ok(Err(e)) => {
                    let delay = self.next_delay(&e);
                    let e = Arc::new(e);
                    if Instant::now() + delay >= deadline {
                        return Err(timed_out(e));
                    }
                    self.retrying(e.clone());
                    last = Some(e);
                    tokio::time::sleep(delay).await;
                }
                Err(_) => {
                    return Err(timed_out(last.unwrap_or_else(|| {
                        Arc::new(Error::Timeout {
                            op: "registration",
                            timeout: limit,
                        })
                    })));
                }
            }
        }
    }

    /// A registration attempt succeeded: back-offs start over, and the new
    /// lease's TTL runs from `granted`.
    fn registered(&mut self, granted: Instant) {
        self.stale.clear();
        self.backoff.reset();
        self.overload.reset();
        self.granted = granted;
        self.put_took = granted.elapsed();
    }

    fn set_state(&self, state: RegistrationState) {
        crate::metrics::registration_state(&self.spec.services, &state);
        self.state.send_replace(state);
    }

    fn retrying(&self, error: impl Into<Arc<Error>>) {
        let error = error.into();
        let attempt = self.backoff.attempts();
        let services = &self.spec.services;
        if attempt <= 1 && matches!(*self.state.borrow(), RegistrationState::Registering) {
            // Said once, loudly, at start-up: the server is up but unknown to
            // its clients until etcd answers.
            tracing::error!(?services, %error,
                "etcd unreachable at start-up: serving unregistered and retrying \
                 until the start-up deadline");
        }
        tracing::warn!(?services, attempt, %error, "etcd registration: retrying");
        self.set_state(RegistrationState::Retrying { attempt, error });
    }

    /// Grants a lease and writes every key with it.
    ///
    /// Cancellation-safe: when the future is dropped (deregistration or
    /// shutdown during start-up or re-registration) after the lease was
    /// granted, the lease, and with it any key already written, is revoked
    /// in the background, so clients do not keep routing to a server that
    /// is leaving for up to a TTL. A grant whose answer never arrived leaves
    /// a lease without keys, which expires unseen.
    async fn register_once(&self) -> Result<(i64, Instant), Error> {
        let (ttl, timeout) = (self.ttl_secs, self.spec.request_timeout);
        let lease = self.write("lease grant", || self.store.grant(ttl)).await?;
        let granted = Instant::now();
        let guard = RevokeOnDrop::new(self.store.clone(), lease, timeout);
        // An overloaded etcd refusing the put: the lease is granted, so the
        // put is tried again under it (for up to half its TTL) rather than
        // revoked and granted anew, which costs etcd two more proposals.
        let mut overload = Backoff::new(OVERLOAD_BACKOFF_BASE, self.spec.ttl / 4);
        loop {
            match self.put(lease).await {
                Ok(()) => break,
                Err(e) if e.is_overload() => {
                    let delay = overload.next_delay();
                    if granted.elapsed() + delay >= self.spec.ttl / 2 {
                        // On error the guard revokes: no lease (and maybe
                        // keys, if a write was applied after all) is left.
                        return Err(e);
                    }
                    tracing::debug!(error = %e, retry_in = ?delay, "etcd overloaded; put again under the same lease");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
        guard.disarm();
        tracing::info!(services = ?self.spec.services, lease, "registered in etcd");
        self.set_state(RegistrationState::Registered { lease_id: lease });
        Ok((lease, granted))
    }

    /// The pause before the next registration attempt after `error`: a
    /// minute when etcd refused it for permissions, long and growing while
    /// etcd is overloaded, short otherwise.
    fn next_delay(&mut self, error: &Error) -> Duration {
        if error.is_refused() {
            // The same answer until an operator changes the grants.
            return crate::backoff::refused_retry();
        }
        if error.is_overload() {
            self.overload.next_delay()
        } else {
            self.overload.reset();
            self.backoff.next_delay()
        }
    }

    /// Sends a write that costs etcd a Raft proposal. A proposal dropped in
    /// a leader election never answers, and only sending it again ends the
    /// wait (the test of that case registers 1.5 s after the new leader); a
    /// proposal queued in an etcd that is behind answers late, and a second
    /// grant sent meanwhile is a lease nobody uses. So when the first attempt
    /// stalls, etcd is asked whether it is behind ([`Store::behind`]): if it
    /// is, the same request is waited for; if not, it is sent again as
    /// [`with_timeout`] does. Once etcd is [pressed](Self::pressed), writes
    /// go once without asking.
    async fn write<T, F, Fut>(&self, op: &'static str, mut call: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let timeout = self.spec.request_timeout;
        if self.pressed() {
            return once(op, timeout, call()).await;
        }
        let deadline = crate::time::deadline_after(Instant::now(), timeout);
        let mut first = Box::pin(call());
        let stalled =
            match tokio::time::timeout(crate::retry::attempt_limit(timeout), &mut first).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if crate::retry::worth_another_attempt(&e) => false,
                Ok(Err(source)) => return Err(Error::Etcd { op, source }),
                Err(_) => true,
            };
        if stalled {
            let probe = tokio::time::timeout_at(deadline, self.store.behind()).await;
            if matches!(probe, Ok(Ok(true))) {
                tracing::debug!(
                    op,
                    "etcd is behind; waiting for the write rather than sending it again"
                );
                return match tokio::time::timeout_at(deadline, first).await {
                    Ok(r) => r.map_err(|source| Error::Etcd { op, source }),
                    Err(_) => Err(Error::Timeout { op, timeout }),
                };
            }
        }
        drop(first);
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout { op, timeout });
        }
        with_timeout(op, left, call).await
    }

    /// Writes every entry under `lease`, warning about keys that were held by
    /// another lease.
    async fn put(&self, lease: i64) -> Result<(), Error> {
        self.put_entries(&self.spec.entries, lease).await
    }

    /// Writes `entries` under `lease`, as [`put`](Self::put) does.
    async fn put_entries(&self, entries: &[Encoded], lease: i64) -> Result<(), Error> {
        let previous = self.write("put", || self.store.put(entries, lease)).await?;
        for (key, old_lease) in previous {
            if old_lease != 0 && old_lease != lease {
                tracing::warn!(%key, old_lease,
                    "overwrote a key held by another lease (a previous process at this address?)");
            }
        }
        Ok(())
    }

    /// Keeps the registration alive until stopped, then revokes the lease.
    pub(super) async fn run(
        mut self,
        mut lease: i64,
        mut stop: watch::Receiver<bool>,
        mut commands: mpsc::Receiver<Command>,
    ) -> Result<(), Error> {
        // Whether `lease` is still ours to revoke.
        let mut live = true;
        loop {
            match self.keep_alive(lease, &mut stop, &mut commands).await {
                SessionEnd::Stopped => break,
                SessionEnd::LeaseLost(reason) => {
                    tracing::warn!(services = ?self.spec.services, lease, %reason,
                        "etcd lease lost; registering again");
                    crate::metrics::lease_lost(&self.spec.services);
                    self.set_state(RegistrationState::Lost { reason });
                    match Box::pin(self.reregister(&mut stop, &mut commands)).await {
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
            match Box::pin(revoke(&self.store, lease, self.spec.request_timeout)).await {
                // etcd revokes a lease only for a user who may write every
                // key bound to it, and an operator's drain is bound to this
                // one: without that grant, the own keys still go now (the
                // instance leaves discovery before it stops serving) and the
                // rest expires with the lease.
                Err(e) if e.is_refused() => {
                    tracing::warn!(services = ?self.spec.services, lease, error = %e,
                        "etcd refused to revoke the lease (a key bound to it, such as a drain, \
                         is outside this user's write grant; see `tonic-etcd rbac`); \
                         deleting the instance keys, the rest expires with the lease");
                    let keys = self.keys();
                    with_timeout("delete keys", self.spec.request_timeout, || {
                        self.store.delete(&keys)
                    })
                    .await
                }
                other => other,
            }
        } else {
            Ok(())
        };
        let services = &self.spec.services;
        match &result {
            Ok(()) => tracing::info!(?services, lease, "deregistered from etcd"),
            Err(e) => tracing::warn!(?services, lease, error = %e,
                "deregistration failed; the keys expire with the lease"),
        }
        self.set_state(RegistrationState::Deregistered);
        result
    }

    /// Grants a new lease and writes every key, retrying until it works or
    /// the registration is stopped (`None`).
    async fn reregister(
        &mut self,
        stop: &mut watch::Receiver<bool>,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Option<i64> {
        loop {
            let began = Instant::now();
            let attempt = tokio::select! {
                biased;
                () = stopped(stop) => return None,
                r = Box::pin(self.register_once()) => r,
            };
            self.observe(attempt.as_ref().err(), began.elapsed());
            match attempt {
                Ok((lease, granted)) => {
                    self.registered(granted);
                    return Some(lease);
                }
                Err(e) => {
                    let delay = self.next_delay(&e);
                    self.retrying(e);
                    if !self.pause(delay, None, stop, commands).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Waits `delay` while answering commands (new metadata is written under
    /// `lease`, or without one waits for the next registration); false when
    /// stopped.
    async fn pause(
        &mut self,
        delay: Duration,
        lease: Option<i64>,
        stop: &mut watch::Receiver<bool>,
        commands: &mut mpsc::Receiver<Command>,
    ) -> bool {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                biased;
                () = stopped(stop) => return false,
                cmd = commands.recv() => match cmd {
                    Some(cmd) => Box::pin(self.command(cmd, lease, stop)).await,
                    None => return false,
                },
                () = tokio::time::sleep_until(until) => return true,
            }
        }
    }

    /// Carries out a command; with a lease, new metadata is written at once.
    async fn command(
        &mut self,
        cmd: Command,
        lease: Option<i64>,
        stop: &mut watch::Receiver<bool>,
    ) {
        let (result, reply) = match cmd {
            Command::Metadata(metadata, reply) => {
                let spec = &self.spec;
                let encoded = encode_all(
                    &*spec.schema,
                    &spec.services,
                    &spec.addr,
                    spec.id.as_deref(),
                    &metadata,
                );
                let result = match encoded {
                    Err(e) => Err(e),
                    Ok(entries) => {
                        self.spec.entries = entries;
                        let all = self.spec.entries.clone();
                        let written = self.write_now(&all, lease, stop).await;
                        if lease.is_some() && written.is_ok() {
                            // Every entry is written: nothing left for a repair.
                            self.unwritten = false;
                        }
                        written
                    }
                };
                (result, reply)
            }
            Command::Entries {
                services,
                entries,
                reply,
            } => {
                let changed: Vec<Encoded> = entries
                    .iter()
                    .filter(|e| !self.spec.entries.contains(e))
                    .cloned()
                    .collect();
                self.stale.extend(
                    self.spec
                        .entries
                        .iter()
                        .filter(|old| !entries.iter().any(|e| e.key == old.key))
                        .map(|old| old.key.clone()),
                );
                self.stale.retain(|k| !entries.iter().any(|e| &e.key == k));
                self.spec.entries = entries;
                self.spec.services = services;
                let mut result = self.write_now(&changed, lease, stop).await;
                if let (Some(_), Ok(())) = (lease, &result) {
                    result = self.delete_stale().await;
                }
                (result, reply)
            }
        };
        let _ = reply.send(result);
    }

    /// Writes `entries` under `lease` now; without a lease (or when the
    /// write fails) the next registration or repair writes every entry.
    async fn write_now(
        &mut self,
        entries: &[Encoded],
        lease: Option<i64>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let Some(lease) = lease else {
            // Written by the next registration, or by the repair after
            // re-attaching.
            self.unwritten = true;
            return Ok(());
        };
        if entries.is_empty() {
            return Ok(());
        }
        let written = tokio::select! {
            biased;
            () = stopped(stop) => Err(Error::TaskGone("registration")),
            r = self.put_entries(entries, lease) => r,
        };
        // Not written now: the next repair writes it.
        self.unwritten |= written.is_err();
        written
    }

    /// Deletes the keys dropped from the set; those not deleted stay for
    /// the next repair.
    async fn delete_stale(&mut self) -> Result<(), Error> {
        if self.stale.is_empty() {
            return Ok(());
        }
        let (stale, timeout) = (&self.stale, self.spec.request_timeout);
        with_timeout("delete", timeout, || self.store.delete(stale)).await?;
        self.stale.clear();
        Ok(())
    }

    /// One lease's life: attach a keep-alive stream, keep it fed and drained,
    /// re-attach when it fails, until the lease is lost or we are stopped.
    async fn keep_alive(
        &mut self,
        lease: i64,
        stop: &mut watch::Receiver<bool>,
        commands: &mut mpsc::Receiver<Command>,
    ) -> SessionEnd {
        let interval = (self.spec.ttl / 3).max(MIN_INTERVAL);
        let mut first = true;
        // The lease was just granted with its whole TTL: attaching (which
        // renews it) waits one keep-alive interval after the grant, then a
        // random part of another, so that a fleet registered together
        // neither renews into its own write storm nor in step afterwards.
        // In etcd 3.4 every keep-alive answer copies the writes not yet
        // committed to its backend (a read transaction for the header's
        // revision), and a renewal waits until etcd has applied all it
        // committed: 10,000 renewals sent during the storm of grants and
        // puts took a third of etcd's CPU, starved its apply loop and let
        // leases expire (5 of 8 storm phases cascaded with the first
        // renewal within one interval, none of 8 with this; the storm
        // benchmark). Counted from the grant: a slow put has used up part of
        // the TTL already. And no later than leaves a keep-alive interval of
        // the lease once the renewal takes effect, if etcd answers it as
        // late as it answered the put (an etcd 4 s behind otherwise let a
        // lease sent its first renewal at two thirds of the TTL expire).
        let latest = (self.granted + interval * 2)
            .checked_sub(self.put_took)
            .unwrap_or(self.granted);
        let first_renewal = (self.granted + crate::backoff::jitter(interval * 2)).min(latest);
        let wait = first_renewal.saturating_duration_since(Instant::now());
        if !self.pause(wait, Some(lease), stop, commands).await {
            return SessionEnd::Stopped;
        }
        loop {
            let store = self.store.clone();
            let timeout = self.spec.request_timeout;
            // Boxed, like every request below: this task lives as long as
            // the registration, and inlining each request's future would
            // make its steady state as large as all of them together.
            let mut attach: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
                if self.pressed() {
                    // Stalled because etcd is behind: a second stream only
                    // adds to its queue.
                    Box::pin(once("lease keep-alive", timeout, store.attach(lease)))
                } else {
                    Box::pin(with_timeout("lease keep-alive", timeout, move || {
                        let store = store.clone();
                        async move { store.attach(lease).await }
                    }))
                };
            let began = Instant::now();
            // Commands are answered meanwhile: attaching can take a whole
            // request timeout against an unreachable etcd. The first attach
            // follows a registration that etcd just answered, so new
            // metadata is written at once under the lease (one put; deferred,
            // it took a key check and a guarded put after the attach, twice
            // the floor in the propagation benchmark); a re-attach after a
            // broken stream may face an etcd that is away, so it defers.
            let write_under = first.then_some(lease);
            // An attach that has no answer after one attempt's limit says so
            // in the state at once, not after the whole request timeout: the
            // first attach comes after a quiet pause in which nothing noticed
            // an etcd that went away.
            let limit = crate::retry::attempt_limit(timeout);
            let unanswered = tokio::time::sleep_until(began + limit);
            tokio::pin!(unanswered);
            let mut said = false;
            let attached = loop {
                tokio::select! {
                    biased;
                    () = stopped(stop) => return SessionEnd::Stopped,
                    r = &mut attach => break r,
                    cmd = commands.recv() => match cmd {
                        Some(cmd) => Box::pin(self.command(cmd, write_under, stop)).await,
                        None => return SessionEnd::Stopped,
                    },
                    () = &mut unanswered, if !said => {
                        said = true;
                        self.set_state(RegistrationState::Retrying {
                            attempt: self.backoff.attempts(),
                            error: Arc::new(Error::Timeout { op: "lease keep-alive", timeout: limit }),
                        });
                    }
                }
            };
            self.observe(attached.as_ref().err(), began.elapsed());
            let mut session = match attached {
                Ok(session) => session,
                Err(e) if e.is_lease_not_found() => return SessionEnd::LeaseLost(e.to_string()),
                Err(e) => {
                    // etcd refusing renewals while it catches up: back off
                    // further, but not past half an interval, so the lease
                    // is renewed as soon as etcd can.
                    let delay = if e.is_refused() {
                        self.next_delay(&e)
                    } else {
                        self.next_delay(&e).min(interval / 2)
                    };
                    self.retrying(e);
                    if !self.pause(delay, None, stop, commands).await {
                        return SessionEnd::Stopped;
                    }
                    continue;
                }
            };
            let renewed = Instant::now();
            if !first {
                tracing::info!(services = ?self.spec.services, lease, "re-attached to the same etcd lease");
            }
            // Keys may have been removed while we were away, or have new
            // metadata to carry.
            if (!first || self.unwritten)
                && self.repair_until(lease, renewed + interval, stop).await
            {
                return SessionEnd::Stopped;
            }
            first = false;
            self.backoff.reset();
            self.set_state(RegistrationState::Registered { lease_id: lease });

            // Attaching already renewed the lease.
            let mut last_ack = renewed;
            // When each unanswered keep-alive was sent: etcd answers them in
            // order, so an answer's delay is measured from the oldest. A
            // stream that stops answering ends at the silence rule, so this
            // stays a few entries long.
            let mut sent = std::collections::VecDeque::with_capacity(4);
            let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first check of a session is spread over one check interval
            // (a re-attach has just checked, the first attach follows the put).
            let check_every = self.spec.key_check_interval;
            let mut next_check = renewed + crate::backoff::jitter(check_every);
            let broken = loop {
                // A stream that stops answering is as dead as one that
                // errors: partitions hang silently. Detected after one and a
                // half keep-alive intervals (half the TTL), so re-attaching
                // to the same lease can still succeed before it expires;
                // but while etcd is known to be behind, its answers are late,
                // and a new stream would join the same queue: waited for
                // until the TTL has run out since the last answer.
                let silent_deadline = if self.pressed() {
                    last_ack + self.spec.ttl
                } else {
                    last_ack + interval + interval / 2
                };
                tokio::select! {
                    biased;
                    () = stopped(stop) => return SessionEnd::Stopped,
                    msg = session.next() => match msg {
                        Ok(Some(ttl)) if ttl <= 0 => {
                            return SessionEnd::LeaseLost("keep-alive answered TTL 0".into());
                        }
                        Ok(Some(_)) => {
                            last_ack = Instant::now();
                            if let Some(at) = sent.pop_front() {
                                self.observe(None, last_ack.saturating_duration_since(at));
                            }
                        }
                        Ok(None) => break Error::StreamEnded("lease keep-alive"),
                        Err(source) => break Error::Etcd { op: "lease keep-alive", source },
                    },
                    cmd = commands.recv() => match cmd {
                        Some(cmd) => Box::pin(self.command(cmd, Some(lease), stop)).await,
                        None => return SessionEnd::Stopped,
                    },
                    at = tick.tick() => {
                        if let Err(source) = session.send().await {
                            break Error::Etcd { op: "lease keep-alive send", source };
                        }
                        if sent.len() >= 8 {
                            sent.pop_front();
                        }
                        sent.push_back(Instant::now());
                        // Bounded so that a check stuck on a frozen etcd
                        // cannot hide the silence of the keep-alive stream.
                        // Skipped while etcd is behind: a deleted key is
                        // rare, the load of 10,000 checks is not.
                        if at >= next_check && !self.pressed() {
                            next_check = at + check_every;
                            if self.repair_until(lease, silent_deadline, stop).await {
                                return SessionEnd::Stopped;
                            }
                        }
                    }
                    () = tokio::time::sleep_until(silent_deadline) => {
                        break Error::Timeout {
                            op: "lease keep-alive answer",
                            timeout: silent_deadline - last_ack,
                        };
                    }
                }
            };
            tracing::warn!(services = ?self.spec.services, lease, reason = %broken,
                "etcd keep-alive broken; re-attaching");
            self.set_state(RegistrationState::Retrying {
                attempt: self.backoff.attempts(),
                error: Arc::new(broken),
            });
        }
    }

    /// Runs [`repair`](Self::repair) until `deadline` unless asked to stop
    /// first; true when stopped. The check can take a whole request timeout
    /// against a slow etcd, and neither `deregister` nor the keep-alive may
    /// wait for it; an unfinished check runs again next tick.
    async fn repair_until(
        &mut self,
        lease: i64,
        deadline: Instant,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        tokio::select! {
            biased;
            () = stopped(stop) => true,
            _ = tokio::time::timeout_at(deadline, Box::pin(self.repair(lease))) => false,
        }
    }

    /// Writes back any key that is missing, changed, or under another lease,
    /// or that lacks metadata updated while etcd was away. The check costs
    /// etcd no write; only when it fails does a guarded put follow.
    async fn repair(&mut self, lease: i64) {
        if let Err(e) = self.delete_stale().await {
            return tracing::debug!(error = %e, "deleting dropped keys failed");
        }
        let (entries, timeout) = (&self.spec.entries, self.spec.request_timeout);
        match with_timeout("key check", timeout, || self.store.intact(entries, lease)).await {
            Ok(true) => return self.unwritten = false,
            Ok(false) => {}
            // The keep-alive path notices real outages; this is only a check.
            Err(e) => return tracing::debug!(error = %e, "key check failed"),
        }
        let services = &self.spec.services;
        match with_timeout("key repair", timeout, || self.store.restore(entries, lease)).await {
            Ok(true) if self.unwritten => {
                tracing::info!(
                    ?services,
                    lease,
                    "wrote the metadata updated while etcd was away"
                );
            }
            Ok(true) => tracing::warn!(
                ?services,
                lease,
                "a registered key was deleted or changed by someone else; restored it"
            ),
            Ok(false) => {}
            Err(e) => return tracing::debug!(error = %e, "key repair failed"),
        }
        self.unwritten = false;
    }
}

async fn revoke<S: Store>(store: &S, lease: i64, timeout: Duration) -> Result<(), Error> {
    match with_timeout("lease revoke", timeout, || store.revoke(lease)).await {
        Ok(()) => Ok(()),
        // Already gone: so are its keys.
        Err(e) if e.is_lease_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Revokes a freshly granted lease unless disarmed: makes a registration
/// attempt safe to cancel.
struct RevokeOnDrop<S: Store> {
    armed: Option<(S, i64, Duration)>,
}

impl<S: Store> RevokeOnDrop<S> {
    fn new(store: S, lease: i64, timeout: Duration) -> Self {
        Self {
            armed: Some((store, lease, timeout)),
        }
    }

    fn disarm(mut self) {
        self.armed = None;
    }
}

impl<S: Store> Drop for RevokeOnDrop<S> {
    fn drop(&mut self) {
        let Some((store, lease, timeout)) = self.armed.take() else {
            return;
        };
        tracing::debug!(lease, "registration attempt abandoned; revoking its lease");
        // A drop outside a runtime (at process exit) leaves the lease to expire.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = revoke(&store, lease, timeout).await;
            });
        }
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
