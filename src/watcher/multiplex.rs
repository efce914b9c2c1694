//! One etcd Watch stream for every watch of one [`Etcd`](crate::Etcd).
//!
//! Each `watch()` of etcd-client opens a gRPC stream of its own, and a
//! stream costs etcd far more than a watcher on it (its watch-memory
//! benchmark: about 18 KB per stream, 350 B per watcher; its design target
//! is O(100k) streams but O(10M) watchers). etcd's Go client puts every
//! watch of one client on one stream (`clientv3/watch.go`); so does this.
//!
//! A task of its own reads the stream and routes each response by watch id
//! to its watch's queue, so the stream is drained whether or not a watch's
//! owner reads (an unread watch makes h2 close the connection that every
//! other etcd call shares). Creates are sent one at a time and each answer
//! is matched to the create in flight, as Go's client does: etcd answers a
//! refused create without a usable id. A progress answer (watch id -1) is
//! for the whole stream and goes to every created watch; progress requests
//! are coalesced, so a thousand quiet watches ask etcd once.
//!
//! Each watch keeps its own revision, compaction handling and back-off (the
//! view's task owns them). When the stream breaks every watch on it ends
//! with the error; each re-creates itself from its own revision after its
//! own back-off, and the first to do so opens the next stream. The stream
//! closes when its last watch is dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{Client, WatchOptions};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;

use super::source::{reply, EtcdResult, Event, Header, Reply, WatchStream, MAX_DECODE};

/// How long opening the stream may take before its watches are told it
/// failed (each then retries after its back-off).
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// A progress request unanswered for this long may be sent again: etcd
/// 3.5.8 and later answer only when every watcher on the stream is synced,
/// and etcd's gRPC proxy never answers, so an answer can be owed forever.
const PROGRESS_RESEND: Duration = Duration::from_secs(1);

/// The id etcd gives a response that belongs to no single watch (a
/// progress answer for the whole stream).
const STREAM_WIDE: i64 = -1;

/// Every watch of one etcd client, on one stream at a time.
pub(crate) struct Multiplexer {
    client: Client,
    /// The running stream task's commands; `None` when no stream is open.
    /// Watches are added only under this lock, and the task clears it
    /// under the lock before it ends, so no watch is sent to a task that
    /// will not serve it.
    link: Arc<Mutex<Option<Link>>>,
    next: AtomicU64,
    /// The liveness reads of this client's quiet watches (`watcher::check_alive`).
    reads: ReadGate,
}

/// One liveness read at a time per client, and its outcome reused within a
/// quiet period: the watches of a client share its connection, so one read
/// answers for all of them. `Err` holds the failure's message.
pub(crate) type ReadGate = tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>;

/// The open stream: its task's commands, and when it last heard from etcd.
struct Link {
    commands: UnboundedSender<Command>,
    heard: Arc<Heard>,
}

/// When a stream last received anything: proof, for every watch on it,
/// that the stream is alive.
#[derive(Debug, Default)]
struct Heard(Mutex<Option<Instant>>);

impl Heard {
    fn mark(&self) {
        *lock(&self.0) = Some(Instant::now());
    }

    fn within(&self, age: Duration) -> bool {
        lock(&self.0).is_some_and(|at| at.elapsed() <= age)
    }
}

impl std::fmt::Debug for Multiplexer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let open = lock(&self.link)
            .as_ref()
            .is_some_and(|l| !l.commands.is_closed());
        f.debug_struct("Multiplexer").field("open", &open).finish()
    }
}

enum Command {
    Watch {
        local: u64,
        request: Create,
        replies: UnboundedSender<EtcdResult<Reply>>,
    },
    Cancel(u64),
    Progress,
    /// Close the stream: the client has a fresh token, and the stream
    /// still carries the one it was opened with.
    Reopen,
}

/// A create: every key under a prefix, from a revision on.
type Create = (Vec<u8>, i64);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Multiplexer {
    pub(crate) fn new(client: Client) -> Self {
        Self {
            client,
            link: Arc::default(),
            next: AtomicU64::new(0),
            reads: ReadGate::default(),
        }
    }

    /// Adds a watch of every key under `prefix` from `start` to the open
    /// stream, opening one if there is none. Its first reply is the
    /// answer to its create.
    pub(crate) fn watch(&self, prefix: Vec<u8>, start: i64) -> SharedWatch {
        let local = self.next.fetch_add(1, Ordering::Relaxed);
        let (replies, rx) = unbounded_channel();
        let mut link = lock(&self.link);
        let (commands, heard) = match &*link {
            Some(l) if !l.commands.is_closed() => (l.commands.clone(), l.heard.clone()),
            _ => {
                let (commands, rx) = unbounded_channel();
                let heard = Arc::new(Heard::default());
                let task = run(self.client.clone(), self.link.clone(), rx, heard.clone());
                tokio::spawn(task);
                *link = Some(Link {
                    commands: commands.clone(),
                    heard: heard.clone(),
                });
                (commands, heard)
            }
        };
        // A task that is gone drops `replies`: the watch reads as ended
        // and is retried.
        let _ = commands.send(Command::Watch {
            local,
            request: (prefix, start),
            replies,
        });
        SharedWatch {
            local,
            replies: rx,
            commands,
            heard,
        }
    }

    pub(crate) fn reads(&self) -> &ReadGate {
        &self.reads
    }

    /// Refreshes the client's token and closes the open stream, so that
    /// the watches resume on one opened with the fresh token. etcd 3.4
    /// refuses a create whose stream token has expired with the same
    /// "permission denied" as a missing grant (3.5 says "invalid auth
    /// token", handled in the stream task); a view calls this when etcd
    /// refused its watch although the user could read the prefix.
    pub(crate) async fn reauthenticate(&self) {
        let _ = tokio::time::timeout(OPEN_TIMEOUT, self.client.clone().refresh_token()).await;
        if let Some(link) = &*lock(&self.link) {
            let _ = link.commands.send(Command::Reopen);
        }
    }
}

/// One watch on the shared stream; dropping it cancels the watch at etcd.
#[derive(Debug)]
pub(crate) struct SharedWatch {
    local: u64,
    replies: UnboundedReceiver<EtcdResult<Reply>>,
    commands: UnboundedSender<Command>,
    heard: Arc<Heard>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Watch { local, .. } => write!(f, "Watch({local})"),
            Self::Cancel(local) => write!(f, "Cancel({local})"),
            Self::Progress => f.write_str("Progress"),
            Self::Reopen => f.write_str("Reopen"),
        }
    }
}

impl Drop for SharedWatch {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Cancel(self.local));
    }
}

impl WatchStream for SharedWatch {
    async fn next(&mut self) -> EtcdResult<Option<Reply>> {
        self.replies.recv().await.transpose()
    }

    async fn request_progress(&mut self) -> EtcdResult<()> {
        self.commands
            .send(Command::Progress)
            .map_err(|_| etcd_client::Error::WatchError("the watch stream is closed".into()))
    }

    /// Anything the shared stream received (for any watch) shows it alive.
    fn heard_within(&self, age: Duration) -> bool {
        self.heard.within(age)
    }
}

/// Which watch each response belongs to: the stream task's state, kept
/// apart from its I/O so that the routing rules are unit-tested.
///
/// Watches of the same prefix share one etcd watcher when they can, as
/// etcd's gRPC proxy coalesces them: a watch that starts at revision `R`
/// joins a created etcd watch of its prefix that has delivered nothing at
/// or after `R` (every event it will ever need is still to come there),
/// and is handed only events from `R` on. One that needs history the
/// shared watcher has passed gets a watcher of its own.
#[derive(Default)]
struct Router {
    watches: HashMap<u64, Routed>,
    /// etcd's watchers on this stream, by etcd's watch id.
    shared: HashMap<i64, Shared>,
    /// Watches whose create waits for the one in flight to be answered.
    queue: VecDeque<u64>,
    /// The watch whose create etcd has not answered yet. It stays here
    /// when that watch is dropped meanwhile: the answer is still its.
    creating: Option<u64>,
}

struct Routed {
    replies: UnboundedSender<EtcdResult<Reply>>,
    prefix: Vec<u8>,
    /// The first revision it wants.
    start: i64,
    /// Its create is yet to be sent.
    unsent: bool,
    /// etcd's id of the watcher it reads, once created or joined.
    id: Option<i64>,
}

/// One etcd watcher and the watches it feeds.
struct Shared {
    prefix: Vec<u8>,
    /// Every event up to this revision has been delivered.
    delivered: i64,
    cluster_id: u64,
    watches: Vec<u64>,
}

/// What the stream must send after a router step.
#[derive(Debug, Default, PartialEq)]
struct Send {
    /// Cancel this etcd watch (nobody reads it).
    cancel: Option<i64>,
    /// The next create, of this watch.
    create: Option<u64>,
}

impl Router {
    /// Adds a watch of `prefix` from `start`; `Some` when a create is to be
    /// sent now.
    fn add(
        &mut self,
        local: u64,
        (prefix, start): Create,
        replies: UnboundedSender<EtcdResult<Reply>>,
    ) -> Option<u64> {
        self.watches.insert(
            local,
            Routed {
                replies,
                prefix,
                start,
                unsent: true,
                id: None,
            },
        );
        if !self.join(local) {
            self.queue.push_back(local);
        }
        self.next_create()
    }

    /// Joins `local` to a created etcd watcher of its prefix that has not
    /// passed its start, if there is one.
    fn join(&mut self, local: u64) -> bool {
        let Some(watch) = self.watches.get_mut(&local) else {
            return false;
        };
        let joinable = self
            .shared
            .iter_mut()
            .find(|(_, w)| w.prefix == watch.prefix && w.delivered < watch.start);
        let Some((&id, shared)) = joinable else {
            return false;
        };
        shared.watches.push(local);
        watch.unsent = false;
        watch.id = Some(id);
        // What etcd's answer to its own create would have said: created at
        // the revision it starts after, by this cluster.
        let _ = watch.replies.send(Ok(Reply {
            created: true,
            header: Some(Header {
                revision: watch.start.saturating_sub(1),
                cluster_id: shared.cluster_id,
            }),
            ..Reply::default()
        }));
        true
    }

    /// The create to send next, if none is in flight. A queued watch that
    /// can join a watcher created meanwhile joins it instead.
    fn next_create(&mut self) -> Option<u64> {
        if self.creating.is_some() {
            return None;
        }
        while let Some(local) = self.queue.pop_front() {
            if self.watches.contains_key(&local) && !self.join(local) {
                self.creating = Some(local);
                return Some(local);
            }
        }
        None
    }

    /// The create request of `local`, taken to be sent.
    fn take_request(&mut self, local: u64) -> Option<Create> {
        let watch = self.watches.get_mut(&local)?;
        std::mem::take(&mut watch.unsent).then(|| (watch.prefix.clone(), watch.start))
    }

    /// Removes a dropped watch; `Some(id)`: cancel that etcd watcher, which
    /// nobody reads any more.
    fn remove(&mut self, local: u64) -> Option<i64> {
        let id = self.watches.remove(&local)?.id?;
        let shared = self.shared.get_mut(&id)?;
        shared.watches.retain(|&l| l != local);
        if !shared.watches.is_empty() {
            return None;
        }
        self.shared.remove(&id);
        Some(id)
    }

    /// Routes one response.
    fn route(&mut self, reply: Reply, watch_id: i64) -> Send {
        let mut send = Send::default();
        if reply.created {
            let local = self.creating.take();
            match local.and_then(|l| self.watches.get_mut(&l).map(|w| (l, w))) {
                Some((local, watch)) => {
                    let refused = reply.canceled;
                    if !refused {
                        watch.id = Some(watch_id);
                        self.shared.insert(
                            watch_id,
                            Shared {
                                prefix: watch.prefix.clone(),
                                delivered: watch.start.saturating_sub(1),
                                cluster_id: reply.header.map_or(0, |h| h.cluster_id),
                                watches: vec![local],
                            },
                        );
                    }
                    let _ = watch.replies.send(Ok(reply));
                    if refused {
                        self.watches.remove(&local);
                    }
                }
                // Dropped before etcd created it: cancel it now.
                None if !reply.canceled => send.cancel = Some(watch_id),
                None => {}
            }
            send.create = self.next_create();
        } else if watch_id == STREAM_WIDE && !reply.canceled {
            // Progress for the whole stream: only to created watches (a
            // watch's first reply is its create's).
            let revision = reply.header.map_or(0, |h| h.revision);
            for shared in self.shared.values_mut() {
                shared.delivered = shared.delivered.max(revision);
            }
            for watch in self.watches.values().filter(|w| w.id.is_some()) {
                if let Some(reply) = from_start(&reply, watch.start) {
                    let _ = watch.replies.send(Ok(reply));
                }
            }
        } else if let Some(shared) = self.shared.get_mut(&watch_id) {
            let revision = match reply.events.iter().map(event_revision).max() {
                Some(last) => last,
                None => reply.header.map_or(0, |h| h.revision),
            };
            shared.delivered = shared.delivered.max(revision);
            let canceled = reply.canceled;
            for local in &shared.watches {
                let Some(watch) = self.watches.get(local) else {
                    continue;
                };
                if let Some(reply) = from_start(&reply, watch.start) {
                    let _ = watch.replies.send(Ok(reply));
                }
            }
            if canceled {
                if let Some(shared) = self.shared.remove(&watch_id) {
                    for local in shared.watches {
                        self.watches.remove(&local);
                    }
                }
            }
        }
        // Anything else belongs to a watcher already cancelled.
        send
    }

    /// Ends every watch with `error` (the stream broke).
    fn fail(&mut self, error: &str) {
        for (_, watch) in self.watches.drain() {
            let _ = watch.replies.send(Err(stream_error(error)));
        }
        self.shared.clear();
        self.queue.clear();
        self.creating = None;
    }

    fn is_empty(&self) -> bool {
        self.watches.is_empty()
    }

    /// etcd watchers open on this stream.
    #[cfg(test)]
    fn watchers(&self) -> usize {
        self.shared.len()
    }
}

fn event_revision(event: &Event) -> i64 {
    let (Event::Put(kv) | Event::Delete(kv)) = event;
    kv.mod_revision
}

/// `reply` as a watch that starts at `start` sees it: without the events
/// before `start`, and not at all when that leaves an event response empty
/// (it would read as a progress notification), nor when it is a progress
/// notification from before the watch's own listing (etcd computed it
/// before the watch joined; the watch would read etcd as gone back in time).
fn from_start(reply: &Reply, start: i64) -> Option<Reply> {
    let progress = reply.events.is_empty() && !reply.canceled;
    let revision = reply.header.map_or(0, |h| h.revision);
    if progress && revision > 0 && revision < start - 1 {
        return None;
    }
    if reply.events.iter().all(|e| event_revision(e) >= start) {
        return Some(reply.clone());
    }
    let events: Vec<Event> = reply
        .events
        .iter()
        .filter(|e| event_revision(e) >= start)
        .cloned()
        .collect();
    (!events.is_empty()).then(|| Reply {
        events,
        ..reply.clone()
    })
}

fn stream_error(error: &str) -> etcd_client::Error {
    etcd_client::Error::WatchError(format!("the shared watch stream failed: {error}"))
}

/// etcd 3.5 says why it refused a create; these reasons concern the
/// stream's token, not the watch, so Go's client opens a new stream with a
/// fresh token. (etcd 3.4 says "permission denied" for both.)
fn stale_auth(reason: &str) -> bool {
    reason.contains("invalid auth token") || reason.contains("auth store is old")
}

/// The stream task: opens the stream with the first watch's create, then
/// routes until the stream breaks or its last watch is gone.
async fn run(
    client: Client,
    link: Arc<Mutex<Option<Link>>>,
    mut commands: UnboundedReceiver<Command>,
    heard: Arc<Heard>,
) {
    let mut router = Router::default();
    // The spawner sends a watch before anyone else can reach this task; the
    // first one added is the first create.
    let first = loop {
        match commands.recv().await {
            Some(Command::Watch {
                local,
                request,
                replies,
            }) => {
                if let Some(first) = router.add(local, request, replies) {
                    break first;
                }
            }
            Some(_) => {}
            None => return,
        }
    };
    let Some((prefix, start)) = router.take_request(first) else {
        return close(&link, commands, router, "no create to send").await;
    };
    let mut watch_client = client.watch_client().max_decoding_message_size(MAX_DECODE);
    let open = watch_client.watch(prefix, Some(options(start)));
    let stream = match tokio::time::timeout(OPEN_TIMEOUT, open).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return close(&link, commands, router, &e.to_string()).await,
        Err(_) => return close(&link, commands, router, "no answer within 5s").await,
    };
    let (mut sender, mut responses) = stream.split();
    let mut progress_asked: Option<Instant> = None;
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else { return };
                let result = match command {
                    Command::Watch { local, request, replies } => {
                        match router.add(local, request, replies) {
                            Some(local) => send_create(&mut sender, &mut router, local).await,
                            None => Ok(()),
                        }
                    }
                    Command::Cancel(local) => {
                        let result = match router.remove(local) {
                            Some(id) => sender.cancel(id).await,
                            None => Ok(()),
                        };
                        if router.is_empty() && idle_close(&link, &commands) {
                            return;
                        }
                        result
                    }
                    Command::Reopen => {
                        return close(&link, commands, router, "reopened with a fresh token").await;
                    }
                    Command::Progress => {
                        if progress_asked.is_some_and(|at| at.elapsed() < PROGRESS_RESEND) {
                            Ok(())
                        } else {
                            progress_asked = Some(Instant::now());
                            sender.request_progress().await
                        }
                    }
                };
                if let Err(e) = result {
                    return close(&link, commands, router, &e.to_string()).await;
                }
            }
            response = responses.message() => {
                let response = match response {
                    Ok(Some(response)) => {
                        heard.mark();
                        response
                    }
                    Ok(None) => return close(&link, commands, router, "etcd ended it").await,
                    Err(e) => return close(&link, commands, router, &e.to_string()).await,
                };
                let watch_id = response.watch_id();
                let reply = reply(response);
                if watch_id == STREAM_WIDE && !reply.created {
                    progress_asked = None;
                }
                let auth = reply.canceled && stale_auth(&reply.cancel_reason);
                let reason = reply.cancel_reason.clone();
                let send = router.route(reply, watch_id);
                if auth {
                    tracing::info!(%reason, "etcd refused a watch for the stream's token; \
                        refreshing it and opening a new stream");
                    let _ = tokio::time::timeout(OPEN_TIMEOUT, client.refresh_token()).await;
                    return close(&link, commands, router, &reason).await;
                }
                let mut result = Ok(());
                if let Some(id) = send.cancel {
                    result = sender.cancel(id).await;
                }
                if let (Ok(()), Some(local)) = (&result, send.create) {
                    result = send_create(&mut sender, &mut router, local).await;
                }
                if let Err(e) = result {
                    return close(&link, commands, router, &e.to_string()).await;
                }
                if router.is_empty() && idle_close(&link, &commands) {
                    return;
                }
            }
        }
    }
}

async fn send_create(
    sender: &mut etcd_client::WatchRequestSender,
    router: &mut Router,
    local: u64,
) -> EtcdResult<()> {
    match router.take_request(local) {
        Some((prefix, start)) => sender.watch(prefix, Some(options(start))).await,
        None => Ok(()),
    }
}

/// No fragments: etcd splits them on event boundaries, not revision
/// boundaries, and etcd-client does not say which response is a fragment,
/// so a stream lost mid-revision would resume past the rest of it. Whole
/// responses keep every revision in one piece; the decode limit is raised
/// instead (`MAX_DECODE`). Progress notifications keep a quiet watch's
/// revision recent, so a resume is less likely to meet a compaction.
fn options(start: i64) -> WatchOptions {
    WatchOptions::new()
        .with_prefix()
        .with_start_revision(start)
        .with_progress_notify()
}

/// Closes an idle stream unless a watch is on its way to it.
fn idle_close(link: &Mutex<Option<Link>>, commands: &UnboundedReceiver<Command>) -> bool {
    let mut link = lock(link);
    if !commands.is_empty() {
        return false;
    }
    *link = None;
    true
}

/// Ends the stream: every watch on it, and every watch sent to it before
/// the link was cleared, ends with `error`.
async fn close(
    link: &Mutex<Option<Link>>,
    mut commands: UnboundedReceiver<Command>,
    mut router: Router,
    error: &str,
) {
    *lock(link) = None;
    tracing::debug!(%error, "etcd watch stream closed");
    router.fail(error);
    // Nothing adds a watch once the link is cleared.
    commands.close();
    while let Some(command) = commands.recv().await {
        if let Command::Watch { replies, .. } = command {
            let _ = replies.send(Err(stream_error(error)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watcher::source::Entry;

    fn router_with(n: u64) -> (Router, Vec<UnboundedReceiver<EtcdResult<Reply>>>) {
        let mut router = Router::default();
        let mut rxs = Vec::new();
        for local in 0..n {
            let (tx, rx) = unbounded_channel();
            // Distinct prefixes: each gets an etcd watcher of its own.
            router.add(local, (local.to_string().into_bytes(), 1), tx);
            rxs.push(rx);
        }
        (router, rxs)
    }

    fn created_at(revision: i64) -> Reply {
        Reply {
            created: true,
            header: Some(Header {
                revision,
                cluster_id: 1,
            }),
            ..Reply::default()
        }
    }

    fn revisions(replies: &[Reply]) -> Vec<i64> {
        replies
            .iter()
            .flat_map(|r| r.events.iter().map(event_revision))
            .collect()
    }

    #[test]
    fn a_watch_of_the_same_prefix_joins_the_etcd_watcher_and_sees_only_its_revisions() {
        let mut router = Router::default();
        let (tx0, mut rx0) = unbounded_channel();
        assert_eq!(router.add(0, (b"p/".to_vec(), 10), tx0), Some(0));
        router.route(created_at(9), 3);
        router.route(event(12), 3);
        // Listed at 14: events 13 and 14 may still be on their way.
        let (tx1, mut rx1) = unbounded_channel();
        assert_eq!(router.add(1, (b"p/".to_vec(), 15), tx1), None, "joined");
        assert_eq!(router.watchers(), 1);
        let joined = drain(&mut rx1);
        assert!(
            joined[0].created
                && joined[0].header.map(|h| (h.revision, h.cluster_id)) == Some((14, 1))
        );
        router.route(event(13), 3);
        let mut both = event(14);
        if let Some(Event::Put(e)) = event(15).events.pop() {
            both.events.push(Event::Put(e));
        }
        router.route(both, 3);
        assert_eq!(revisions(&drain(&mut rx0)), [12, 13, 14, 15]);
        assert_eq!(
            revisions(&drain(&mut rx1)),
            [15],
            "nothing before its start"
        );
        // The etcd watcher lives while anyone reads it.
        assert_eq!(router.remove(0), None);
        router.route(event(16), 3);
        assert_eq!(revisions(&drain(&mut rx1)), [16]);
        assert_eq!(router.remove(1), Some(3));
        assert_eq!(router.watchers(), 0);
    }

    #[test]
    fn progress_from_before_a_joined_watch_listed_is_not_handed_to_it() {
        let mut router = Router::default();
        let (tx0, mut rx0) = unbounded_channel();
        router.add(0, (b"p/".to_vec(), 10), tx0);
        router.route(created_at(9), 3);
        // Listed at 14 and joined while progress answers taken at 12 are
        // on their way (one for the stream, one for the watcher).
        let (tx1, mut rx1) = unbounded_channel();
        assert_eq!(router.add(1, (b"p/".to_vec(), 15), tx1), None);
        let at = |revision| Reply {
            header: Some(Header {
                revision,
                cluster_id: 1,
            }),
            ..Reply::default()
        };
        router.route(at(12), STREAM_WIDE);
        router.route(at(12), 3);
        let progress = |rx: &mut UnboundedReceiver<EtcdResult<Reply>>| {
            drain(rx)
                .iter()
                .filter(|r| !r.created)
                .filter_map(|r| r.header.map(|h| h.revision))
                .collect::<Vec<_>>()
        };
        assert_eq!(progress(&mut rx0), [12, 12]);
        assert_eq!(
            progress(&mut rx1),
            Vec::<i64>::new(),
            "12 < its listing at 14"
        );
        // A later one reaches both.
        router.route(at(14), STREAM_WIDE);
        assert_eq!(progress(&mut rx1), [14]);
    }

    #[test]
    fn watches_queued_behind_the_first_create_of_their_prefix_join_it() {
        let mut router = Router::default();
        let mut rxs = Vec::new();
        for local in 0..3 {
            let (tx, rx) = unbounded_channel();
            router.add(local, (b"p/".to_vec(), 10 + local as i64), tx);
            rxs.push(rx);
        }
        let send = router.route(created_at(9), 3);
        assert_eq!(send.create, None, "both queued watches joined");
        assert_eq!(router.watchers(), 1);
        for rx in &mut rxs {
            assert!(drain(rx)[0].created);
        }
    }

    #[test]
    fn a_watch_that_needs_history_the_watcher_passed_gets_its_own() {
        let mut router = Router::default();
        let (tx0, _rx0) = unbounded_channel();
        router.add(0, (b"p/".to_vec(), 10), tx0);
        router.route(created_at(9), 3);
        router.route(event(12), 3);
        let (tx1, _rx1) = unbounded_channel();
        assert_eq!(
            router.add(1, (b"p/".to_vec(), 12), tx1),
            Some(1),
            "12 was delivered"
        );
        let (tx2, _rx2) = unbounded_channel();
        assert_eq!(
            router.add(2, (b"q/".to_vec(), 20), tx2),
            None,
            "queued behind 1"
        );
        assert_eq!(router.route(created_at(12), 4).create, Some(2));
        assert_eq!(router.watchers(), 2);
    }

    #[test]
    fn a_compaction_ends_every_watch_on_the_watcher() {
        let mut router = Router::default();
        let (tx0, mut rx0) = unbounded_channel();
        let (tx1, mut rx1) = unbounded_channel();
        router.add(0, (b"p/".to_vec(), 10), tx0);
        router.route(created_at(9), 3);
        router.add(1, (b"p/".to_vec(), 10), tx1);
        let cancel = Reply {
            canceled: true,
            compact_revision: 42,
            ..Reply::default()
        };
        router.route(cancel, 3);
        for rx in [&mut rx0, &mut rx1] {
            assert_eq!(drain(rx).last().map(|r| r.compact_revision), Some(42));
        }
        assert!(router.is_empty() && router.watchers() == 0);
    }

    /// etcd as the router sees it: the revision, and each watcher's events
    /// not yet sent (a create is answered at once; its history and later
    /// puts are sent when `flush` says, so joins happen with events still
    /// on their way).
    #[derive(Default)]
    struct FakeEtcd {
        revision: i64,
        pending: Vec<VecDeque<i64>>,
    }

    impl FakeEtcd {
        fn answer(&mut self, router: &mut Router, mut create: Option<u64>) {
            while let Some(local) = create {
                let Some((_, start)) = router.take_request(local) else {
                    return;
                };
                let id = self.pending.len() as i64;
                self.pending.push((start..=self.revision).collect());
                create = router.route(created_at(self.revision), id).create;
            }
        }

        fn put(&mut self) {
            self.revision += 1;
            for queue in &mut self.pending {
                queue.push_back(self.revision);
            }
        }

        fn flush(&mut self, router: &mut Router) {
            for (id, queue) in self.pending.iter_mut().enumerate() {
                for rev in queue.drain(..) {
                    router.route(event(rev), id as i64);
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(128))]

        /// Whatever the order of puts, deliveries, joins and progress, each
        /// watch gets exactly the events from its start revision on, in
        /// order, once.
        #[test]
        fn every_watch_gets_exactly_the_events_from_its_start(
            ops in proptest::collection::vec((0u8..4, 0i64..4), 1..80),
        ) {
            let mut router = Router::default();
            let mut etcd = FakeEtcd::default();
            let mut watches = Vec::new();
            for (op, back) in ops {
                match op {
                    // A watch that listed a little while ago.
                    0 => {
                        let local = watches.len() as u64;
                        let start = (etcd.revision + 1 - back).max(1);
                        let (tx, rx) = unbounded_channel();
                        let create = router.add(local, (b"p/".to_vec(), start), tx);
                        watches.push((start, rx, Vec::new()));
                        etcd.answer(&mut router, create);
                    }
                    1 => etcd.put(),
                    2 => etcd.flush(&mut router),
                    // etcd 3.4 answers progress before pending events.
                    _ => {
                        let progress = Reply {
                            header: Some(Header { revision: etcd.revision, cluster_id: 1 }),
                            ..Reply::default()
                        };
                        router.route(progress, STREAM_WIDE);
                    }
                }
            }
            etcd.flush(&mut router);
            for (start, rx, seen) in &mut watches {
                seen.extend(revisions(&drain(rx)));
                let want: Vec<i64> = (*start..=etcd.revision).collect();
                proptest::prop_assert_eq!(&*seen, &want, "start {}", start);
            }
        }
    }

    fn created(canceled: bool) -> Reply {
        Reply {
            created: true,
            canceled,
            ..Reply::default()
        }
    }

    fn event(rev: i64) -> Reply {
        Reply {
            header: Some(Header {
                revision: rev,
                cluster_id: 1,
            }),
            events: vec![Event::Put(Entry {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                mod_revision: rev,
                create_revision: rev,
                lease: 0,
            })],
            ..Reply::default()
        }
    }

    fn drain(rx: &mut UnboundedReceiver<EtcdResult<Reply>>) -> Vec<Reply> {
        let mut out = Vec::new();
        while let Ok(r) = rx.try_recv() {
            out.push(r.expect("an Ok reply"));
        }
        out
    }

    #[test]
    fn creates_go_one_at_a_time_and_answers_match_them_in_order() {
        let mut router = Router::default();
        let (tx0, mut rx0) = unbounded_channel();
        let (tx1, mut rx1) = unbounded_channel();
        assert_eq!(router.add(0, (b"a/".to_vec(), 1), tx0), Some(0));
        assert_eq!(
            router.add(1, (b"b/".to_vec(), 1), tx1),
            None,
            "one create in flight"
        );
        let send = router.route(created(false), 7);
        assert_eq!(send.create, Some(1));
        assert_eq!(router.route(created(false), 8).create, None);
        router.route(event(10), 8);
        router.route(event(11), 7);
        assert_eq!(drain(&mut rx0).len(), 2, "created + its event");
        let r1 = drain(&mut rx1);
        assert!(r1[0].created && r1[1].events.len() == 1);
    }

    #[test]
    fn a_refused_create_goes_to_its_watch_and_the_next_create_follows() {
        let (mut router, mut rxs) = router_with(2);
        let send = router.route(created(true), STREAM_WIDE);
        assert_eq!(send.create, Some(1));
        let r0 = drain(&mut rxs[0]);
        assert!(r0.len() == 1 && r0[0].canceled);
        assert!(!router.watches.contains_key(&0));
        // A later response with the refused watch's id reaches nobody.
        router.route(created(false), 0);
        router.route(event(5), 0);
        assert_eq!(drain(&mut rxs[1]).len(), 2);
    }

    #[test]
    fn progress_for_the_stream_reaches_every_created_watch_only() {
        let (mut router, mut rxs) = router_with(3);
        router.route(created(false), 0);
        router.route(created(false), 1);
        // Watch 2's create is in flight.
        let progress = Reply {
            header: Some(Header {
                revision: 9,
                cluster_id: 1,
            }),
            ..Reply::default()
        };
        router.route(progress, STREAM_WIDE);
        assert_eq!(drain(&mut rxs[0]).len(), 2);
        assert_eq!(drain(&mut rxs[1]).len(), 2);
        assert!(
            drain(&mut rxs[2]).is_empty(),
            "no reply before its create's answer"
        );
    }

    #[test]
    fn a_watch_dropped_before_its_create_is_answered_is_cancelled_then() {
        let (mut router, _rxs) = router_with(2);
        assert_eq!(router.remove(0), None, "no id to cancel yet");
        let send = router.route(created(false), 4);
        assert_eq!(
            send,
            Send {
                cancel: Some(4),
                create: Some(1)
            }
        );
    }

    #[test]
    fn a_dropped_created_watch_is_cancelled_and_its_late_events_go_nowhere() {
        let (mut router, mut rxs) = router_with(2);
        router.route(created(false), 3);
        router.route(created(false), 4);
        assert_eq!(router.remove(0), Some(3));
        router.route(event(6), 3);
        assert_eq!(drain(&mut rxs[1]).len(), 1);
        assert!(!router.is_empty());
        assert_eq!(router.remove(1), Some(4));
        assert!(router.is_empty());
    }

    #[test]
    fn a_compaction_cancel_ends_only_its_watch() {
        let (mut router, mut rxs) = router_with(2);
        router.route(created(false), 0);
        router.route(created(false), 1);
        let cancel = Reply {
            canceled: true,
            compact_revision: 42,
            ..Reply::default()
        };
        router.route(cancel, 0);
        let r0 = drain(&mut rxs[0]);
        assert_eq!(r0.last().map(|r| r.compact_revision), Some(42));
        assert!(!router.watches.contains_key(&0));
        router.route(event(50), 1);
        assert_eq!(drain(&mut rxs[1]).len(), 2);
    }

    #[test]
    fn a_broken_stream_ends_every_watch_with_its_error() {
        let (mut router, mut rxs) = router_with(3);
        router.route(created(false), 0);
        router.fail("connection reset");
        for rx in &mut rxs {
            let last = std::iter::from_fn(|| rx.try_recv().ok()).last();
            let err = last.expect("a reply").expect_err("an error");
            assert!(err.to_string().contains("connection reset"), "{err}");
        }
        assert!(router.is_empty() && router.creating.is_none());
    }
}
