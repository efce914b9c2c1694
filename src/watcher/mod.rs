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
//! The consumer side is a coalescing queue of changed keys: a key that
//! changes many times before it is read yields one change, memory stays
//! bounded by the number of keys, and a PUT of an identical value yields
//! nothing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::retry::with_timeout;
use crate::schema::{NamingSchema, Schema};
use crate::{Error, Instance};
use source::{Entry, Event, Reply, Source, WatchStream};

pub(crate) mod source;

const PAGE_SIZE: i64 = 1000;
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

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Arc<Instance>>,
    /// What the consumer has been told.
    known: HashMap<String, Arc<Instance>>,
    dirty: VecDeque<String>,
    dirty_set: HashSet<String>,
    waker: Option<Waker>,
    /// Changes since the last publish, for metrics.
    inserted: u64,
    removed: u64,
}

impl State {
    fn mark(&mut self, key: &str) {
        if self.dirty_set.insert(key.to_owned()) {
            self.dirty.push_back(key.to_owned());
        }
    }

    fn upsert(&mut self, key: &str, instance: Instance) {
        if self.entries.get(key).is_some_and(|cur| **cur == instance) {
            return;
        }
        self.entries.insert(key.to_owned(), Arc::new(instance));
        self.inserted += 1;
        self.mark(key);
    }

    fn remove(&mut self, key: &str) {
        if self.entries.remove(key).is_some() {
            self.removed += 1;
            self.mark(key);
        }
    }
}

/// The view shared between the task and its consumer.
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

    /// Ends a batch of changes: wakes the consumer, updates the status.
    fn publish(&self, mut state: MutexGuard<'_, State>) {
        let endpoints = state.entries.len();
        crate::metrics::changes(&self.prefix, state.inserted, state.removed);
        (state.inserted, state.removed) = (0, 0);
        let waker = if state.dirty.is_empty() {
            None
        } else {
            state.waker.take()
        };
        drop(state);
        if let Some(w) = waker {
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

    /// The next change for the consumer, or `Pending` with the waker stored.
    pub(crate) fn poll_change(&self, cx: &mut Context<'_>) -> Poll<ViewChange> {
        let mut state = self.lock();
        while let Some(key) = state.dirty.pop_front() {
            state.dirty_set.remove(&key);
            let current = state.entries.get(&key).cloned();
            let told = state.known.get(&key);
            match (current, told) {
                (Some(cur), Some(old)) if Arc::ptr_eq(&cur, old) => {}
                (Some(cur), _) => {
                    state.known.insert(key.clone(), cur.clone());
                    return Poll::Ready(ViewChange::Upsert(key, cur));
                }
                (None, Some(_)) => {
                    if let Some(old) = state.known.remove(&key) {
                        return Poll::Ready(ViewChange::Remove(key, old));
                    }
                }
                (None, None) => {}
            }
        }
        if !state
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Every entry in the view now, and every change up to now marked as
    /// told to the consumer: its stream goes on from here.
    pub(crate) fn snapshot_and_catch_up(&self) -> Vec<(String, Arc<Instance>)> {
        let mut state = self.lock();
        state.known = state.entries.clone();
        state.dirty.clear();
        state.dirty_set.clear();
        state
            .entries
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Every entry in the view now.
    pub(crate) fn snapshot(&self) -> Vec<(String, Arc<Instance>)> {
        self.lock()
            .entries
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub(crate) fn status(&self) -> watch::Receiver<WatchStatus> {
        self.status.subscribe()
    }
}

/// The running view: dropping it stops the task and cancels the etcd watch.
#[derive(Debug)]
pub(crate) struct Watched {
    pub(crate) view: Arc<View>,
    task: JoinHandle<()>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the task that keeps a view of `cfg.prefix`.
pub(crate) fn spawn<S: Source>(source: S, schema: Arc<dyn Schema>, cfg: WatchConfig) -> Watched {
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
            cluster_id: 0,
        }
        .run(),
    );
    Watched { view, task }
}

struct Task<S> {
    source: S,
    schema: Arc<dyn Schema>,
    cfg: WatchConfig,
    view: Arc<View>,
    backoff: Backoff,
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
                    self.failed(e).await;
                    self.view.update_status(|s| s.reconnects += 1);
                    crate::metrics::reconnect(&self.cfg.prefix);
                }
            }
        }
    }

    async fn failed(&mut self, error: Error) {
        let delay = self.backoff.next_delay();
        tracing::warn!(prefix = %self.cfg.prefix, %error, retry_in = ?delay,
            "etcd watch failed; keeping the last known endpoints");
        self.view
            .update_status(|s| s.last_error = Some(Arc::new(error)));
        tokio::time::sleep(delay).await;
    }

    /// Lists the prefix at one revision and makes the view equal to it.
    async fn list(&mut self) -> Result<i64, Error> {
        let Listed {
            kvs,
            revision,
            cluster_id,
        } = list_prefix(&self.source, &self.cfg.prefix, self.cfg.request_timeout).await?;
        self.cluster_id = cluster_id;
        let mut fresh = HashMap::with_capacity(kvs.len());
        let mut skipped = 0;
        for kv in &kvs {
            let Some(key) = utf8_key(kv) else {
                skipped += 1;
                continue;
            };
            match self.decode(kv) {
                Decoded::Entry(instance) => {
                    fresh.insert(key.to_owned(), instance);
                }
                Decoded::Skipped => skipped += 1,
                Decoded::Foreign => {}
            }
        }
        let count = fresh.len();
        let mut state = self.view.lock();
        let gone: Vec<String> = state
            .entries
            .keys()
            .filter(|k| !fresh.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            state.remove(&key);
        }
        for (key, instance) in fresh {
            state.upsert(&key, instance);
        }
        self.view.publish(state);
        self.view.update_status(|s| {
            s.synced = true;
            s.skipped += skipped;
            s.last_error = None;
        });
        crate::metrics::skipped(&self.cfg.prefix, skipped);
        self.backoff.reset();
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
        let mut asked_progress = false;
        loop {
            let wait = if asked_progress {
                self.cfg.request_timeout
            } else {
                self.cfg.idle
            };
            let resp = match tokio::time::timeout(wait, stream.next()).await {
                Err(_) if asked_progress => {
                    // Silent through the idle time and a progress request.
                    return SessionEnd::Failed(Error::Timeout {
                        op: "watch progress",
                        timeout: self.cfg.idle + self.cfg.request_timeout,
                    });
                }
                Err(_) => {
                    asked_progress = true;
                    if let Err(e) = stream.request_progress().await {
                        return SessionEnd::Failed(Error::Etcd {
                            op: "watch progress request",
                            source: e,
                        });
                    }
                    continue;
                }
                Ok(Err(source)) => {
                    return SessionEnd::Failed(Error::Etcd {
                        op: "watch",
                        source,
                    })
                }
                Ok(Ok(None)) => return SessionEnd::Failed(Error::StreamEnded("watch")),
                Ok(Ok(Some(resp))) => resp,
            };
            asked_progress = false;
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

/// A prefix as listed: every key with its value, the revision it was read
/// at, and the cluster that answered.
pub(crate) struct Listed {
    pub(crate) kvs: Vec<Entry>,
    pub(crate) revision: i64,
    pub(crate) cluster_id: u64,
}

/// Every key under `prefix` with its value, read in pages at one revision
/// (linearizable), and that revision.
pub(crate) async fn list_prefix<S: Source>(
    source: &S,
    prefix: &str,
    timeout: Duration,
) -> Result<Listed, Error> {
    let prefix = prefix.as_bytes().to_vec();
    let end = prefix_end(&prefix);
    // etcd has no empty key: every key is the range from "\0" to "\0".
    let mut from = if prefix.is_empty() { vec![0] } else { prefix };
    let mut revision = 0;
    let mut cluster_id = 0;
    let mut kvs: Vec<Entry> = Vec::new();
    loop {
        let page = with_timeout("list", timeout, || {
            source.page(from.clone(), end.clone(), PAGE_SIZE, revision)
        })
        .await?;
        if revision == 0 {
            revision = page.header.revision;
            cluster_id = page.header.cluster_id;
        }
        if let Some(last) = page.entries.last() {
            from.clone_from(&last.key);
            from.push(0);
        }
        kvs.extend(page.entries);
        if !page.more {
            return Ok(Listed {
                kvs,
                revision,
                cluster_id,
            });
        }
    }
}

/// The end of the key range `[prefix, end)` that holds every key starting
/// with `prefix` (etcd's convention: `\0` for the empty prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
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

    fn drain(view: &View) -> Vec<ViewChange> {
        let waker = futures_noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = Vec::new();
        while let Poll::Ready(c) = view.poll_change(&mut cx) {
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
        {
            let mut s = view.lock();
            s.upsert("k1", inst("h:1"));
            s.upsert("k1", inst("h:2"));
            s.upsert("k2", inst("h:3"));
            view.publish(s);
        }
        let changes = drain(&view);
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
        let changes = drain(&view);
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
}

#[cfg(test)]
mod fake_tests;
