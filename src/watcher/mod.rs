//! The etcd view of a key prefix, kept current by a task of its own.
//!
//! Both [`Discover`](crate::discovery::Discover) (one service) and
//! [`Catalog`](crate::catalog::Catalog) (every service under a namespace) are
//! built on this. The task:
//!
//! * lists the prefix (a linearizable, paginated `Get` at one revision), then
//!   watches from that revision + 1, so no event between the two is lost;
//! * drains the watch whether or not anyone reads the view (an unread watch
//!   makes h2 close the connection every other etcd call shares);
//! * resumes from the last seen revision + 1 after any failure, with back-off
//!   and jitter; when that revision was compacted it lists again and applies
//!   only the difference;
//! * asks for a progress notification when the watch has been quiet, and
//!   treats a watch that does not answer as dead (partitions hang silently);
//! * keeps the last known entries while etcd is unreachable (fail static).
//!
//! The consumer side is a coalescing queue of changed keys per consumer: a
//! key that changes many times before it is read yields one change, memory
//! stays bounded by the number of keys, and a PUT of an identical value
//! yields nothing. A view has any number of consumers (see
//! [`Etcd::view`](crate::Etcd)): each reads every change once, a new one
//! starts from the entries the view holds, and the task stops with the
//! last one.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backoff::{Backoff, Refusals};
use crate::retry::with_timeout;
use crate::schema::{NamingSchema, Schema};
use crate::{Error, Instance};
use source::{Entry, Event, Reply, Source, WatchStream};

pub(crate) mod multiplex;
pub(crate) mod source;

/// Keys per page of a listing. etcd (3.4 and 3.5) walks its index over the
/// whole rest of the range for every page, so small pages make a large
/// listing quadratic; measured on 10,000 endpoints, 5,000 per page is about
/// 1.6 times one unpaged read, 1,000 per page 2.2 times. A page too large
/// for the decode limit (huge values) is retried with half as many keys.
const PAGE_SIZE: i64 = 5_000;
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What the view's task is doing, for readiness checks and monitoring.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct WatchStatus {
    /// The first listing has completed.
    pub synced: bool,
    /// Entries in the view now.
    pub endpoints: usize,
    /// Keys skipped because they could not be decoded (counted per event).
    pub skipped: u64,
    /// Times the watch was re-established after a failure.
    pub reconnects: u64,
    /// Times the prefix was listed again because the watched revision was compacted.
    pub resyncs: u64,
    /// The last failure, while it lasts, with its `source()` chain.
    pub last_error: Option<Arc<Error>>,
}

/// Errors compare by their message.
impl PartialEq for WatchStatus {
    fn eq(&self, other: &Self) -> bool {
        let message = |s: &Self| s.last_error.as_ref().map(ToString::to_string);
        (
            self.synced,
            self.endpoints,
            self.skipped,
            self.reconnects,
            self.resyncs,
        ) == (
            other.synced,
            other.endpoints,
            other.skipped,
            other.reconnects,
            other.resyncs,
        ) && message(self) == message(other)
    }
}

impl Eq for WatchStatus {}

pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const DEFAULT_IDLE: Duration = Duration::from_secs(10);

/// Options shared by every etcd view ([`Discover`], [`Catalog`](crate::Catalog)).
#[derive(Debug, Clone)]
pub(crate) struct ViewOptions {
    pub(crate) schema: Arc<dyn Schema>,
    pub(crate) request_timeout: Duration,
    pub(crate) idle: Duration,
}

impl Default for ViewOptions {
    fn default() -> Self {
        Self {
            schema: Arc::new(NamingSchema::new()),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            idle: DEFAULT_IDLE,
        }
    }
}

impl ViewOptions {
    pub(crate) fn check(&self) -> Result<(), Error> {
        if self.request_timeout.is_zero() || self.idle.is_zero() {
            return Err(Error::InvalidConfig(
                "request_timeout and idle_timeout must be above zero".into(),
            ));
        }
        Ok(())
    }
}

/// Tunables shared by Discover and Catalog.
#[derive(Debug, Clone)]
pub(crate) struct WatchConfig {
    pub(crate) prefix: String,
    /// Only entries of this service (Discover); `None` for every service.
    pub(crate) service: Option<String>,
    pub(crate) request_timeout: Duration,
    /// Quiet time after which the watch is asked for progress.
    pub(crate) idle: Duration,
}

/// One change to the view, as the consumer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ViewChange {
    Upsert(String, Arc<Instance>),
    Remove(String, Arc<Instance>),
}

/// One key in etcd: its entry, and the listing that last saw it.
#[derive(Debug)]
struct Slot {
    current: Arc<Instance>,
    listing: u64,
}

/// What one consumer of a view was told, and what it has yet to read.
#[derive(Debug, Default)]
struct Consumer {
    /// Per key: what the consumer was told (`None`: nothing, or that it
    /// went), and whether the key is in `dirty`. A key leaves the map once
    /// it is neither.
    seen: HashMap<String, (Option<Arc<Instance>>, bool)>,
    /// Keys whose entry changed since the consumer last looked, each once.
    dirty: VecDeque<String>,
    waker: Option<Waker>,
}

impl Consumer {
    fn queue(&mut self, key: &str) {
        match self.seen.get_mut(key) {
            Some((_, true)) => {}
            Some((_, queued)) => {
                *queued = true;
                self.dirty.push_back(key.to_owned());
            }
            None => {
                self.seen.insert(key.to_owned(), (None, true));
                self.dirty.push_back(key.to_owned());
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Entries in etcd now.
    slots: HashMap<String, Slot>,
    /// Counts listings, to find the keys a new listing no longer holds.
    listing: u64,
    /// Everyone reading the view (Discovers, Balancers, Catalogs of one
    /// prefix share it), by id.
    consumers: HashMap<u64, Consumer>,
    next_consumer: u64,
    /// Changes since the last publish, for metrics.
    inserted: u64,
    removed: u64,
}

impl State {
    /// Sets `key`'s entry (unless identical) and marks the key as seen by
    /// the current listing.
    fn upsert(&mut self, key: &str, instance: Instance) {
        let listing = self.listing;
        match self.slots.get_mut(key) {
            Some(slot) => {
                slot.listing = listing;
                if *slot.current == instance {
                    return;
                }
                slot.current = Arc::new(instance);
            }
            None => {
                let slot = Slot {
                    current: Arc::new(instance),
                    listing,
                };
                self.slots.insert(key.to_owned(), slot);
            }
        }
        self.inserted += 1;
        self.queue(key);
    }

    fn remove(&mut self, key: &str) {
        if self.slots.remove(key).is_some() {
            self.removed += 1;
            self.queue(key);
        }
    }

    /// Removes every entry the current listing did not see.
    fn remove_unlisted(&mut self) {
        let listing = self.listing;
        let gone: Vec<String> = self
            .slots
            .iter()
            .filter(|(_, slot)| slot.listing != listing)
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            self.remove(&key);
        }
    }

    fn queue(&mut self, key: &str) {
        for c in self.consumers.values_mut() {
            c.queue(key);
        }
    }
}

/// The view shared between the task and its consumers.
#[derive(Debug)]
pub(crate) struct View {
    /// The watched prefix, labelling metrics.
    prefix: String,
    state: Mutex<State>,
    status: watch::Sender<WatchStatus>,
}

impl View {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain data; a panic elsewhere leaves it consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends a batch of changes: wakes the consumers, updates the status.
    fn publish(&self, mut state: MutexGuard<'_, State>) {
        let endpoints = state.slots.len();
        crate::metrics::changes(&self.prefix, state.inserted, state.removed);
        (state.inserted, state.removed) = (0, 0);
        let wakers: Vec<Waker> = state
            .consumers
            .values_mut()
            .filter(|c| !c.dirty.is_empty())
            .filter_map(|c| c.waker.take())
            .collect();
        drop(state);
        for w in wakers {
            w.wake();
        }
        self.status.send_if_modified(|s| {
            let changed = s.endpoints != endpoints;
            s.endpoints = endpoints;
            changed
        });
        crate::metrics::endpoints(&self.prefix, endpoints);
    }

    fn update_status(&self, f: impl FnOnce(&mut WatchStatus)) {
        self.status.send_modify(f);
    }

    /// A new consumer: every entry in the view now is its first changes,
    /// in key order (as a listing gives them to the first one).
    fn join(&self) -> u64 {
        let mut state = self.lock();
        let state = &mut *state;
        let mut consumer = Consumer::default();
        let mut keys: Vec<&String> = state.slots.keys().collect();
        keys.sort_unstable();
        for key in keys {
            consumer.queue(key);
        }
        let id = state.next_consumer;
        state.next_consumer += 1;
        state.consumers.insert(id, consumer);
        id
    }

    fn leave(&self, id: u64) {
        self.lock().consumers.remove(&id);
    }

    /// Consumer `id`'s next change, or `Pending` with the waker stored.
    fn poll_change(&self, id: u64, cx: &mut Context<'_>) -> Poll<ViewChange> {
        let mut state = self.lock();
        let State {
            slots, consumers, ..
        } = &mut *state;
        let Some(c) = consumers.get_mut(&id) else {
            return Poll::Pending;
        };
        while let Some(key) = c.dirty.pop_front() {
            let Some((told, queued)) = c.seen.get_mut(&key) else {
                continue;
            };
            *queued = false;
            let current = slots.get(&key).map(|s| &s.current);
            let change = match (current, &*told) {
                // Unchanged, or removed and put back as it was before the
                // consumer looked: nothing happened, as far as it can tell.
                (Some(cur), Some(old)) if Arc::ptr_eq(cur, old) || cur == old => None,
                (Some(cur), _) => {
                    *told = Some(cur.clone());
                    Some(ViewChange::Upsert(key.clone(), cur.clone()))
                }
                (None, Some(_)) => told.take().map(|old| ViewChange::Remove(key.clone(), old)),
                (None, None) => None,
            };
            if told.is_none() {
                c.seen.remove(&key);
            }
            if let Some(change) = change {
                return Poll::Ready(change);
            }
        }
        if !c.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            c.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Every entry in the view now, and every change up to now marked as
    /// told to consumer `id`: its stream goes on from here.
    fn snapshot_and_catch_up(&self, id: u64) -> Vec<(String, Arc<Instance>)> {
        let mut state = self.lock();
        let state = &mut *state;
        if let Some(c) = state.consumers.get_mut(&id) {
            c.dirty.clear();
            c.seen = state
                .slots
                .iter()
                .map(|(k, slot)| (k.clone(), (Some(slot.current.clone()), false)))
                .collect();
        }
        Self::entries(state)
    }

    /// Every entry in the view now.
    fn snapshot(&self) -> Vec<(String, Arc<Instance>)> {
        Self::entries(&self.lock())
    }

    fn entries(state: &State) -> Vec<(String, Arc<Instance>)> {
        state
            .slots
            .iter()
            .map(|(k, slot)| (k.clone(), slot.current.clone()))
            .collect()
    }
}

/// A view and the task that keeps it: dropping the last handle stops the
/// task and cancels the etcd watch.
#[derive(Debug)]
pub(crate) struct Running {
    view: Arc<View>,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Running {
    /// A new consumer of the view, starting from what it holds now.
    pub(crate) fn join(self: &Arc<Self>) -> Watched {
        Watched {
            id: self.view.join(),
            running: self.clone(),
        }
    }
}

/// One consumer's handle on a running view (Discovers, Balancers and
/// Catalogs of one prefix on one [`Etcd`](crate::Etcd) share the view:
/// one listing, one watch, one task). Dropping the last handle stops it.
#[derive(Debug)]
pub(crate) struct Watched {
    running: Arc<Running>,
    id: u64,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.running.view.leave(self.id);
    }
}

impl Watched {
    /// This consumer's next change, or `Pending` with the waker stored.
    pub(crate) fn poll_change(&self, cx: &mut Context<'_>) -> Poll<ViewChange> {
        self.running.view.poll_change(self.id, cx)
    }

    /// Every entry in the view now, and every change up to now marked as
    /// told to this consumer: its stream goes on from here.
    pub(crate) fn snapshot_and_catch_up(&self) -> Vec<(String, Arc<Instance>)> {
        self.running.view.snapshot_and_catch_up(self.id)
    }

    /// Every entry in the view now.
    pub(crate) fn snapshot(&self) -> Vec<(String, Arc<Instance>)> {
        self.running.view.snapshot()
    }

    /// What the view's task is doing.
    pub(crate) fn status(&self) -> watch::Receiver<WatchStatus> {
        self.running.view.status.subscribe()
    }

    /// The running view, for the registry of shared views.
    pub(crate) fn running(&self) -> &Arc<Running> {
        &self.running
    }
}

/// Starts the task that keeps a view of `cfg.prefix`, with one consumer.
pub(crate) fn spawn<S: Source>(source: S, schema: Arc<dyn Schema>, cfg: WatchConfig) -> Watched {
    crate::metrics::describe();
    let view = Arc::new(View {
        prefix: cfg.prefix.clone(),
        state: Mutex::new(State::default()),
        status: watch::channel(WatchStatus::default()).0,
    });
    let task = tokio::spawn(
        Task {
            source,
            schema,
            cfg,
            view: view.clone(),
            backoff: Backoff::new(BACKOFF_BASE, BACKOFF_MAX),
            refusals: Refusals::default(),
            reauthenticated: false,
            cluster_id: 0,
        }
        .run(),
    );
    Arc::new(Running { view, task }).join()
}

struct Task<S> {
    source: S,
    schema: Arc<dyn Schema>,
    cfg: WatchConfig,
    view: Arc<View>,
    backoff: Backoff,
    /// Whether etcd's refusal of this view was said already.
    refusals: Refusals,
    /// Whether a refused watch has had its stream reopened with a fresh
    /// token since the view last delivered: once per run of refusals.
    reauthenticated: bool,
    /// The cluster the view was listed from.
    cluster_id: u64,
}

/// Why a watch session ended.
enum SessionEnd {
    /// The start revision was compacted: list again.
    Compacted(i64),
    /// etcd is behind what the view has applied, or is another cluster: it
    /// lost its data (or the address now leads elsewhere). A watch from the
    /// old revision would wait in silence for a revision etcd may reach
    /// much later, or never; list again.
    Regressed(String),
    /// Anything else: resume from the last revision after a back-off.
    Failed(Error),
}

impl<S: Source> Task<S> {
    async fn run(mut self) {
        // The last revision whose events are all applied; None: list first.
        let mut revision: Option<i64> = None;
        loop {
            let mut last = match revision {
                Some(r) => r,
                None => match self.list().await {
                    Ok(r) => r,
                    Err(e) => {
                        self.failed(e).await;
                        continue;
                    }
                },
            };
            match self.watch(&mut last).await {
                SessionEnd::Compacted(compact) => {
                    tracing::info!(prefix = %self.cfg.prefix, revision = last, compact,
                        "watched revision was compacted; listing again");
                    self.view.update_status(|s| s.resyncs += 1);
                    crate::metrics::resync(&self.cfg.prefix);
                    revision = None;
                    // Guards against a list/compact race turning into a hot loop.
                    tokio::time::sleep(self.backoff.next_delay()).await;
                }
                SessionEnd::Regressed(why) => {
                    tracing::warn!(prefix = %self.cfg.prefix, revision = last, %why,
                        "etcd lost data or changed; listing again");
                    self.view.update_status(|s| s.resyncs += 1);
                    crate::metrics::resync(&self.cfg.prefix);
                    revision = None;
                    tokio::time::sleep(self.backoff.next_delay()).await;
                }
                SessionEnd::Failed(e) => {
                    revision = Some(last);
                    if e.is_refused() && !std::mem::replace(&mut self.reauthenticated, true) {
                        // The user could read the prefix (it was listed),
                        // so the stream's token is likely the one refused.
                        tracing::info!(prefix = %self.cfg.prefix, error = %e,
                            "etcd refused a watch of a prefix this user reads; \
                             refreshing the token and reopening the stream");
                        self.source.reauthenticate().await;
                        tokio::time::sleep(self.backoff.next_delay()).await;
                    } else {
                        self.failed(e).await;
                    }
                    self.view.update_status(|s| s.reconnects += 1);
                    crate::metrics::reconnect(&self.cfg.prefix);
                }
            }
        }
    }

    async fn failed(&mut self, error: Error) {
        let error = error.naming_grant("read", &self.cfg.prefix);
        let delay = if error.is_refused() {
            let keeping = "the last known endpoints";
            self.refusals.refused(&self.cfg.prefix, &error, keeping)
        } else {
            let delay = self.backoff.next_delay();
            tracing::warn!(prefix = %self.cfg.prefix, %error, retry_in = ?delay,
                "etcd watch failed; keeping the last known endpoints");
            delay
        };
        self.view
            .update_status(|s| s.last_error = Some(Arc::new(error)));
        tokio::time::sleep(delay).await;
    }

    /// Lists the prefix at one revision and makes the view equal to it.
    async fn list(&mut self) -> Result<i64, Error> {
        // Decoded page by page while the next page is read, and before
        // taking the lock the consumer shares.
        let mut fresh = Vec::new();
        let mut skipped = 0;
        let Listed {
            revision,
            cluster_id,
        } = list_prefix(
            &self.source,
            &self.cfg.prefix,
            self.cfg.request_timeout,
            |page| {
                fresh.reserve(page.len());
                for kv in page {
                    if utf8_key(&kv).is_none() {
                        skipped += 1;
                        continue;
                    }
                    match self.decode(&kv) {
                        Decoded::Entry(instance) => {
                            if let Ok(key) = String::from_utf8(kv.key) {
                                fresh.push((key, instance));
                            }
                        }
                        Decoded::Skipped => skipped += 1,
                        Decoded::Foreign => {}
                    }
                }
            },
        )
        .await?;
        self.cluster_id = cluster_id;
        let count = fresh.len();
        let mut state = self.view.lock();
        state.listing += 1;
        for (key, instance) in fresh {
            state.upsert(&key, instance);
        }
        state.remove_unlisted();
        self.view.publish(state);
        self.view.update_status(|s| {
            s.synced = true;
            s.skipped += skipped;
            s.last_error = None;
        });
        crate::metrics::skipped(&self.cfg.prefix, skipped);
        self.backoff.reset();
        self.refusals.clear();
        tracing::debug!(prefix = %self.cfg.prefix, revision, count, "listed");
        Ok(revision)
    }

    /// Watches from `*last + 1`, applying events and advancing `*last`.
    async fn watch(&mut self, last: &mut i64) -> SessionEnd {
        let start = *last + 1;
        let watched = with_timeout("watch", self.cfg.request_timeout, || {
            self.source.watch(self.cfg.prefix.clone(), start)
        });
        let mut stream = match watched.await {
            Ok(s) => s,
            Err(e) => return SessionEnd::Failed(e),
        };
        let mut liveness = Liveness::default();
        loop {
            let next = next_reply(
                &mut stream,
                &self.source,
                &self.cfg.prefix,
                &mut liveness,
                self.cfg.idle,
                self.cfg.request_timeout,
            );
            let resp = match next.await {
                Ok(resp) => resp,
                Err(e) => return SessionEnd::Failed(e),
            };
            if resp.canceled {
                if resp.compact_revision > 0 {
                    return SessionEnd::Compacted(resp.compact_revision);
                }
                let reason = format!("canceled by etcd: {}", resp.cancel_reason);
                return SessionEnd::Failed(Error::Etcd {
                    op: "watch",
                    source: etcd_client::Error::WatchError(reason),
                });
            }
            if let Some(why) = self.regressed(&resp, *last) {
                return SessionEnd::Regressed(why);
            }
            if resp.created {
                continue;
            }
            // Only a session that delivers something counts as recovered; a
            // watch that is created and then fails keeps backing off.
            self.backoff.reset();
            self.refusals.clear();
            self.reauthenticated = false;
            self.view
                .status
                .send_if_modified(|s| s.last_error.take().is_some());
            if resp.events.is_empty() {
                // A progress notification: every event up to its revision
                // has been delivered, so resuming from there loses nothing
                // and is less likely to hit a compacted revision.
                if let Some(h) = resp.header {
                    *last = (*last).max(h.revision);
                }
                continue;
            }
            self.apply(&resp.events, last);
        }
    }

    /// Whether a created or progress response shows etcd behind the view's
    /// revision, or another cluster. (Event responses carry revisions above
    /// the start revision by construction.)
    fn regressed(&self, resp: &Reply, last: i64) -> Option<String> {
        if !resp.events.is_empty() {
            return None;
        }
        let header = resp.header?;
        if self.cluster_id != 0 && header.cluster_id != 0 && header.cluster_id != self.cluster_id {
            return Some(format!(
                "cluster id {:x} instead of {:x}",
                header.cluster_id, self.cluster_id
            ));
        }
        // 0 on some responses (cancellations): no information.
        if header.revision > 0 && header.revision < last {
            return Some(format!(
                "etcd is at revision {}, the view had applied {last}",
                header.revision
            ));
        }
        None
    }

    fn apply(&self, events: &[Event], last: &mut i64) {
        let mut skipped = 0;
        let mut state = self.view.lock();
        for event in events {
            let (Event::Put(kv) | Event::Delete(kv)) = event;
            *last = (*last).max(kv.mod_revision);
            // Skipped in a DELETE too (see `utf8_key`).
            let Some(key) = utf8_key(kv) else {
                skipped += 1;
                continue;
            };
            match event {
                Event::Delete(_) => state.remove(key),
                Event::Put(_) => match self.decode(kv) {
                    Decoded::Entry(instance) => state.upsert(key, instance),
                    // A key that was valid and no longer decodes is no
                    // longer an endpoint; others are untouched.
                    Decoded::Skipped => {
                        skipped += 1;
                        state.remove(key);
                    }
                    Decoded::Foreign => {}
                },
            }
        }
        self.view.publish(state);
        if skipped > 0 {
            self.view.update_status(|s| s.skipped += skipped);
            crate::metrics::skipped(&self.cfg.prefix, skipped);
        }
    }

    /// Decodes `kv` (whose key is UTF-8: see `utf8_key`).
    fn decode(&self, kv: &Entry) -> Decoded {
        // A namespace-wide view sees this crate's own keys too (whatever
        // the schema): not instances, not mistakes.
        if self.cfg.service.is_none() && crate::schema::is_reserved(&kv.key, &self.cfg.prefix) {
            return Decoded::Foreign;
        }
        match self.schema.decode(&kv.key, &kv.value) {
            Ok(instance) => match &self.cfg.service {
                Some(s) if *s != instance.service => {
                    // A nested service (`svc/sub/...`): not ours, not an error.
                    Decoded::Foreign
                }
                _ => Decoded::Entry(instance),
            },
            // Without a namespace every key in etcd is under the prefix: one
            // that does not decode is another application's.
            Err(_) if self.cfg.prefix.is_empty() => Decoded::Foreign,
            Err(error) => {
                tracing::warn!(
                    key = %String::from_utf8_lossy(&kv.key[..kv.key.len().min(256)]),
                    %error,
                    "skipping an etcd entry that does not decode"
                );
                Decoded::Skipped
            }
        }
    }
}

/// How one watch stream shows it is alive when it is quiet.
///
/// etcd answers a progress request on the stream; etcd's gRPC proxy
/// (`etcd grpc-proxy`) does not, so there a quiet stream would read as dead
/// every `idle + request_timeout` and be restarted for nothing. A stream
/// that has never answered one is checked with a linearizable one-key read
/// of its prefix instead (proof of the connection and of a quorum behind
/// it), and from then on only with reads; a stream that answered before and
/// falls silent is dead, as a partitioned member's is.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    progress: Progress,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Not asked yet.
    #[default]
    Unknown,
    /// This stream answers progress requests.
    Answered,
    /// It does not (a proxy): quiet periods are checked with a read.
    Unanswered,
}

/// The next response of a watch of `prefix`. When it has been quiet for
/// `idle`, checks that it is alive (see [`Liveness`]), and gives up when
/// that check fails or goes unanswered for `request_timeout`: a partition
/// leaves a watch silent, not closed.
pub(crate) async fn next_reply<S: Source>(
    stream: &mut S::Watch,
    source: &S,
    prefix: &str,
    liveness: &mut Liveness,
    idle: Duration,
    request_timeout: Duration,
) -> Result<Reply, Error> {
    let mut asked_progress = false;
    loop {
        let wait = if asked_progress {
            request_timeout
        } else {
            idle
        };
        if let Ok(next) = tokio::time::timeout(wait, stream.next()).await {
            return match next {
                Err(source) => Err(Error::Etcd {
                    op: "watch",
                    source,
                }),
                Ok(None) => Err(Error::StreamEnded("watch")),
                Ok(Some(resp)) => {
                    let progress = resp.events.is_empty() && !resp.created && !resp.canceled;
                    if asked_progress && progress && liveness.progress == Progress::Unknown {
                        liveness.progress = Progress::Answered;
                    }
                    Ok(resp)
                }
            };
        }
        // Quiet for `wait`.
        match (liveness.progress, asked_progress) {
            (Progress::Answered, true) => {
                return Err(Error::Timeout {
                    op: "watch progress",
                    timeout: idle + request_timeout,
                })
            }
            (Progress::Unknown | Progress::Answered, false) => {
                asked_progress = true;
                stream
                    .request_progress()
                    .await
                    .map_err(|source| Error::Etcd {
                        op: "watch progress request",
                        source,
                    })?;
            }
            (Progress::Unknown | Progress::Unanswered, _) => {
                // On a shared stream, anything it received for another
                // watch answers for this one.
                if !stream.heard_within(idle) {
                    check_alive(source, prefix, request_timeout, idle).await?;
                }
                if liveness.progress == Progress::Unknown {
                    tracing::info!(%prefix, "etcd does not answer watch progress requests \
                        (an etcd gRPC proxy?); checking quiet watches with a read instead");
                    liveness.progress = Progress::Unanswered;
                }
                asked_progress = false;
            }
        }
    }
}

/// Checks with a read that the connection under a quiet watch is alive.
/// The watches of one client share its connection: one read at a time
/// answers for all of them, and its outcome stands for `age` (a quiet
/// period), so a thousand quiet watches cost one read per period.
async fn check_alive<S: Source>(
    source: &S,
    prefix: &str,
    timeout: Duration,
    age: Duration,
) -> Result<(), Error> {
    let Some(gate) = source.read_gate() else {
        return check_by_read(source, prefix, timeout).await;
    };
    let mut last = gate.lock().await;
    if let Some((at, outcome)) = &*last {
        if at.elapsed() <= age {
            return outcome.clone().map_err(|e| Error::Etcd {
                op: "watch liveness read",
                source: etcd_client::Error::WatchError(e),
            });
        }
    }
    let outcome = check_by_read(source, prefix, timeout).await;
    let at = tokio::time::Instant::now();
    *last = Some((
        at,
        outcome.as_ref().map(|_| ()).map_err(ToString::to_string),
    ));
    outcome
}

/// A linearizable read of one key of `prefix`, within `timeout`.
async fn check_by_read<S: Source>(
    source: &S,
    prefix: &str,
    timeout: Duration,
) -> Result<(), Error> {
    let from = prefix.as_bytes().to_vec();
    let end = prefix_end(&from);
    let read = source.page(from, end, 1, 0);
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(source)) => Err(Error::Etcd {
            op: "watch liveness read",
            source,
        }),
        Err(_) => Err(Error::Timeout {
            op: "watch liveness read",
            timeout,
        }),
    }
}

/// `kv`'s key as UTF-8, or `None` (with a warning): keys are bytes, and one
/// that is not UTF-8 is skipped everywhere, so it can never stand for (or
/// remove) a valid key.
fn utf8_key(kv: &Entry) -> Option<&str> {
    let key = std::str::from_utf8(&kv.key).ok();
    if key.is_none() {
        tracing::warn!(
            key = %String::from_utf8_lossy(&kv.key[..kv.key.len().min(256)]),
            "skipping an etcd key that is not UTF-8"
        );
    }
    key
}

enum Decoded {
    /// A valid entry.
    Entry(Instance),
    Skipped,
    Foreign,
}

/// Where a listing was read: its revision and the cluster that answered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Listed {
    pub(crate) revision: i64,
    pub(crate) cluster_id: u64,
}

/// Reads every key under `prefix` in pages at one revision (linearizable),
/// handing each page to `each` while the next one is on its way.
pub(crate) async fn list_prefix<S: Source>(
    source: &S,
    prefix: &str,
    timeout: Duration,
    mut each: impl FnMut(Vec<Entry>),
) -> Result<Listed, Error> {
    let prefix = prefix.as_bytes().to_vec();
    let end = prefix_end(&prefix);
    let limit = AtomicI64::new(PAGE_SIZE);
    let fetch = |from: Vec<u8>, revision: i64| {
        let (end, limit) = (&end, &limit);
        async move {
            loop {
                let n = limit.load(Ordering::Relaxed);
                let page = with_timeout("list", timeout, || {
                    source.page(from.clone(), end.clone(), n, revision)
                })
                .await;
                match page {
                    Err(e) if n > 1 && too_large(&e) => {
                        tracing::debug!(error = %e, keys = n / 2, "listing page too large; halving it");
                        limit.store(n / 2, Ordering::Relaxed);
                    }
                    other => return other,
                }
            }
        }
    };
    // etcd has no empty key: every key is the range from "\0" to "\0".
    let from = if prefix.is_empty() { vec![0] } else { prefix };
    let mut page = fetch(from, 0).await?;
    let listed = Listed {
        revision: page.header.revision,
        cluster_id: page.header.cluster_id,
    };
    loop {
        let entries = std::mem::take(&mut page.entries);
        let next_from = match entries.last() {
            Some(last) if page.more => {
                let mut from = last.key.clone();
                from.push(0);
                from
            }
            _ => {
                each(entries);
                return Ok(listed);
            }
        };
        let (next, ()) = tokio::join!(fetch(next_from, listed.revision), async { each(entries) });
        page = next?;
    }
}

/// A response over the client's decode limit, or the server's send limit.
/// tonic reports the former as `OutOfRange`, the code etcd also uses for a
/// compacted revision, so its own words tell them apart: a listing whose
/// revision was compacted must start over, not shrink its pages.
fn too_large(e: &Error) -> bool {
    let Error::Etcd {
        source: etcd_client::Error::GRpcStatus(s),
        ..
    } = e
    else {
        return false;
    };
    match s.code() {
        tonic::Code::ResourceExhausted => true,
        tonic::Code::OutOfRange => s.message().contains("message length too large"),
        _ => false,
    }
}

/// The end of the key range `[prefix, end)` that holds every key starting
/// with `prefix` (etcd's convention: `\0` for the empty prefix).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_the_prefix() {
        assert_eq!(prefix_end(b"svc/"), b"svc0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b""), b"\0");
    }

    fn inst(addr: &str) -> Instance {
        Instance::new("s", addr)
    }

    fn drain(view: &View, id: u64) -> Vec<ViewChange> {
        let waker = futures_noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = Vec::new();
        while let Poll::Ready(c) = view.poll_change(id, &mut cx) {
            out.push(c);
        }
        out
    }

    fn futures_noop_waker() -> Waker {
        Waker::noop().clone()
    }

    #[test]
    fn the_queue_coalesces_and_ignores_identical_puts() {
        let view = View {
            prefix: "p/".into(),
            state: Mutex::new(State::default()),
            status: watch::channel(WatchStatus::default()).0,
        };
        let id = view.join();
        {
            let mut s = view.lock();
            s.upsert("k1", inst("h:1"));
            s.upsert("k1", inst("h:2"));
            s.upsert("k2", inst("h:3"));
            view.publish(s);
        }
        let changes = drain(&view, id);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(matches!(&changes[0], ViewChange::Upsert(k, i) if k == "k1" && i.addr == "h:2"));
        {
            let mut s = view.lock();
            s.upsert("k1", inst("h:2")); // identical: nothing
            s.upsert("k2", inst("h:9"));
            s.remove("k2"); // changed then removed before read: one Remove
            s.upsert("k3", inst("h:4"));
            s.remove("k3"); // never told, now gone: nothing
            view.publish(s);
        }
        let changes = drain(&view, id);
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(matches!(&changes[0], ViewChange::Remove(k, _) if k == "k2"));
        assert_eq!(
            *view.status.borrow(),
            WatchStatus {
                endpoints: 1,
                ..Default::default()
            }
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(256))]

        /// Any interleaving of changes, consumers joining and leaving, and
        /// consumers reading (or not): once a consumer has read what is
        /// queued for it, what it was told is exactly the view's entries;
        /// it is never told an entry it already has, nor a removal of one
        /// it was not told; and the view holds no consumer state for keys
        /// a consumer neither knows nor has queued.
        #[test]
        fn every_consumer_converges_on_the_view_without_repeats(
            ops in proptest::collection::vec((0u8..6, 0u8..5, 0u8..3), 1..120),
        ) {
            let view = View {
                prefix: "p/".into(),
                state: Mutex::new(State::default()),
                status: watch::channel(WatchStatus::default()).0,
            };
            // Each consumer's own record of what it was told.
            let mut told: Vec<(u64, HashMap<String, String>)> = vec![(view.join(), HashMap::new())];
            let read = |id: u64, mine: &mut HashMap<String, String>| -> Result<(), proptest::test_runner::TestCaseError> {
                for change in drain(&view, id) {
                    match change {
                        ViewChange::Upsert(k, i) => {
                            proptest::prop_assert_ne!(mine.get(&k), Some(&i.addr), "told again: {}", k);
                            mine.insert(k, i.addr.clone());
                        }
                        ViewChange::Remove(k, _) => {
                            proptest::prop_assert!(mine.remove(&k).is_some(), "removal of an untold key {}", k);
                        }
                    }
                }
                Ok(())
            };
            for (op, key, value) in ops {
                let key = format!("k{key}");
                match op {
                    0 | 1 => {
                        let mut s = view.lock();
                        s.upsert(&key, inst(&format!("h:{value}")));
                        view.publish(s);
                    }
                    2 => {
                        let mut s = view.lock();
                        s.remove(&key);
                        view.publish(s);
                    }
                    3 => told.push((view.join(), HashMap::new())),
                    4 if told.len() > 1 => {
                        let (id, _) = told.remove(usize::from(value) % told.len());
                        view.leave(id);
                    }
                    _ => {
                        let n = told.len();
                        let (id, mine) = &mut told[usize::from(value) % n];
                        read(*id, mine)?;
                    }
                }
            }
            let entries: HashMap<String, String> = view
                .snapshot()
                .into_iter()
                .map(|(k, i)| (k, i.addr.clone()))
                .collect();
            for (id, mine) in &mut told {
                read(*id, mine)?;
                proptest::prop_assert_eq!(&*mine, &entries);
            }
            let state = view.lock();
            for c in state.consumers.values() {
                proptest::prop_assert!(c.dirty.is_empty());
                proptest::prop_assert_eq!(c.seen.len(), entries.len(), "no state for forgotten keys");
            }
        }
    }
}

#[cfg(test)]
mod fake_tests;
