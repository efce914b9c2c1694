//! The watch task's timing on tokio's paused clock, against an in-memory
//! etcd with a revision history, compaction, progress notifications, data
//! loss and outages. The same paths run against real etcd in
//! `tests/discovery.rs` and `tests/partition.rs`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::source::{EtcdResult, Header, Page};
use super::*;
use crate::schema::NamingSchema;

const IDLE: Duration = Duration::from_secs(10);
const REQUEST: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Etcd {
    revision: i64,
    cluster_id: u64,
    keys: BTreeMap<Vec<u8>, Entry>,
    history: Vec<Event>,
    compacted: i64,
    /// Every request fails with `Unavailable`.
    down: bool,
    /// Progress requests are answered.
    answers_progress: bool,
    /// Pages of more keys than this are refused as too large to decode.
    max_page: Option<usize>,
    pages: Vec<i64>,
    /// Open watch streams (start revision, sender).
    streams: Vec<mpsc::UnboundedSender<EtcdResult<Reply>>>,
    watches: Vec<(Instant, i64)>,
    progress_requests: Vec<Instant>,
    /// Lists are refused for permissions: the user lacks the grant.
    refuse_lists: bool,
    /// Watch creates are refused for permissions until the source
    /// reauthenticates (etcd 3.4 and a stream with an expired token), or
    /// always when `refuse_lists` is set too.
    stale_token: bool,
    reauthentications: u32,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Etcd>>);

fn denied() -> etcd_client::Error {
    etcd_client::Error::GRpcStatus(tonic::Status::permission_denied(
        "etcdserver: permission denied",
    ))
}

fn unavailable() -> etcd_client::Error {
    etcd_client::Error::GRpcStatus(tonic::Status::unavailable("fake etcd down"))
}

impl Fake {
    fn new() -> Self {
        let fake = Self::default();
        fake.lock().cluster_id = 7;
        fake.lock().answers_progress = true;
        fake
    }

    fn lock(&self) -> MutexGuard<'_, Etcd> {
        self.0.lock().unwrap()
    }

    fn header(etcd: &Etcd) -> Header {
        Header {
            revision: etcd.revision,
            cluster_id: etcd.cluster_id,
        }
    }

    /// Puts (or deletes, without an address) a naming entry.
    fn write(&self, key: &str, addr: Option<&str>) {
        let value =
            addr.map(|a| format!(r#"{{"Op":0,"Addr":"{a}","Metadata":null}}"#).into_bytes());
        self.write_raw(key.as_bytes(), value);
    }

    /// Puts (or deletes, without a value) any key, and tells every watch.
    fn write_raw(&self, key: &[u8], value: Option<Vec<u8>>) {
        let mut etcd = self.lock();
        etcd.revision += 1;
        let mut entry = Entry {
            key: key.to_vec(),
            value: Vec::new(),
            mod_revision: etcd.revision,
            create_revision: etcd.revision,
            lease: 0,
        };
        let event = match value {
            Some(value) => {
                entry.value = value;
                etcd.keys.insert(entry.key.clone(), entry.clone());
                Event::Put(entry)
            }
            None => {
                etcd.keys.remove(&entry.key);
                Event::Delete(entry)
            }
        };
        etcd.history.push(event.clone());
        let header = Some(Self::header(&etcd));
        let reply = || Reply {
            header,
            events: vec![event.clone()],
            ..Reply::default()
        };
        etcd.streams.retain(|s| s.send(Ok(reply())).is_ok());
    }

    fn put(&self, addr: &str) {
        self.write(&format!("svc/{addr}"), Some(addr));
    }

    fn delete(&self, addr: &str) {
        self.write(&format!("svc/{addr}"), None);
    }

    fn compact(&self) {
        let mut etcd = self.lock();
        etcd.compacted = etcd.revision;
    }

    /// etcd loses its data and comes back with the same keys at a low
    /// revision, as after a restore from an old snapshot.
    fn wipe_to(&self, revision: i64, addrs: &[&str]) {
        self.break_streams();
        let mut etcd = self.lock();
        etcd.keys.clear();
        etcd.history.clear();
        etcd.revision = revision;
        etcd.compacted = 0;
        drop(etcd);
        for a in addrs {
            self.put(a);
        }
    }

    fn break_streams(&self) {
        let mut etcd = self.lock();
        for s in etcd.streams.drain(..) {
            let _ = s.send(Err(unavailable()));
        }
    }
}

impl Source for Fake {
    type Watch = FakeWatch;

    async fn page(
        &self,
        from: Vec<u8>,
        end: Vec<u8>,
        limit: i64,
        _revision: i64,
    ) -> EtcdResult<Page> {
        let mut etcd = self.lock();
        if etcd.down {
            return Err(unavailable());
        }
        etcd.pages.push(limit);
        if etcd.refuse_lists {
            return Err(denied());
        }
        if etcd.max_page.is_some_and(|max| limit as usize > max) {
            return Err(etcd_client::Error::GRpcStatus(tonic::Status::out_of_range(
                "decoded message length too large",
            )));
        }
        let mut entries: Vec<Entry> = etcd.keys.range(from..end).map(|(_, e)| e.clone()).collect();
        let more = entries.len() > limit as usize;
        entries.truncate(limit as usize);
        Ok(Page {
            header: Self::header(&etcd),
            entries,
            more,
        })
    }

    async fn watch(&self, _prefix: String, start: i64) -> EtcdResult<FakeWatch> {
        let mut etcd = self.lock();
        if etcd.down {
            return Err(unavailable());
        }
        etcd.watches.push((Instant::now(), start));
        let (tx, rx) = mpsc::unbounded_channel();
        let header = Some(Self::header(&etcd));
        if etcd.stale_token {
            // As etcd 3.4 refuses a create: created and cancelled at once.
            let _ = tx.send(Ok(Reply {
                header,
                created: true,
                canceled: true,
                cancel_reason: "etcdserver: permission denied".into(),
                ..Reply::default()
            }));
            return Ok(FakeWatch {
                fake: self.clone(),
                tx,
                rx,
            });
        }
        let _ = tx.send(Ok(Reply {
            header,
            created: true,
            ..Reply::default()
        }));
        if start <= etcd.compacted {
            let _ = tx.send(Ok(Reply {
                header,
                canceled: true,
                compact_revision: etcd.compacted,
                ..Reply::default()
            }));
        } else {
            let backlog: Vec<Event> = etcd
                .history
                .iter()
                .filter(
                    |e| matches!(e, Event::Put(k) | Event::Delete(k) if k.mod_revision >= start),
                )
                .cloned()
                .collect();
            for event in backlog {
                let _ = tx.send(Ok(Reply {
                    header,
                    events: vec![event],
                    ..Reply::default()
                }));
            }
            etcd.streams.push(tx.clone());
        }
        Ok(FakeWatch {
            fake: self.clone(),
            tx,
            rx,
        })
    }

    async fn reauthenticate(&self) {
        self.reauthenticated();
    }
}

impl Fake {
    fn reauthenticated(&self) {
        let mut etcd = self.lock();
        etcd.reauthentications += 1;
        etcd.stale_token = false;
    }
}

struct FakeWatch {
    fake: Fake,
    tx: mpsc::UnboundedSender<EtcdResult<Reply>>,
    rx: mpsc::UnboundedReceiver<EtcdResult<Reply>>,
}

impl WatchStream for FakeWatch {
    async fn next(&mut self) -> EtcdResult<Option<Reply>> {
        match self.rx.recv().await {
            Some(r) => r.map(Some),
            None => Ok(None),
        }
    }

    async fn request_progress(&mut self) -> EtcdResult<()> {
        let mut etcd = self.fake.lock();
        etcd.progress_requests.push(Instant::now());
        if etcd.answers_progress {
            let _ = self.tx.send(Ok(Reply {
                header: Some(Fake::header(&etcd)),
                ..Reply::default()
            }));
        }
        Ok(())
    }
}

fn start(fake: &Fake) -> Watched {
    spawn(
        fake.clone(),
        Arc::new(NamingSchema::new()),
        WatchConfig {
            prefix: "svc/".into(),
            service: Some("svc".into()),
            request_timeout: REQUEST,
            idle: IDLE,
        },
    )
}

fn addrs(w: &Watched) -> Vec<String> {
    let mut a: Vec<String> = w
        .snapshot()
        .into_iter()
        .map(|(_, i)| i.addr.clone())
        .collect();
    a.sort();
    a
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

/// The next change `w` reads: `+addr` or `-addr`.
async fn next(w: &Watched) -> String {
    let change = tokio::time::timeout(
        Duration::from_secs(1),
        std::future::poll_fn(|cx| w.poll_change(cx)),
    )
    .await
    .expect("a change");
    match change {
        ViewChange::Upsert(_, i) => format!("+{}", i.addr),
        ViewChange::Remove(_, i) => format!("-{}", i.addr),
    }
}

/// Changes `w` has ready now, without waiting.
fn ready_changes(w: &Watched) -> usize {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut n = 0;
    while w.poll_change(&mut cx).is_ready() {
        n += 1;
    }
    n
}

/// Consumers of one view (Discovers, Balancers, Catalogs of one prefix)
/// each read every change exactly once from the one listing and watch; a
/// consumer that joins later starts from what the view holds; one that
/// leaves takes nothing from the others; the last one stops the task.
#[tokio::test(start_paused = true)]
async fn consumers_of_one_view_each_read_every_change_once() {
    let fake = Fake::new();
    fake.put("a:1");
    fake.put("b:1");
    let first = start(&fake);
    settle().await;
    let second = first.running().join();
    for w in [&first, &second] {
        let mut got = vec![next(w).await, next(w).await];
        got.sort();
        assert_eq!(got, ["+a:1", "+b:1"]);
        assert_eq!(ready_changes(w), 0, "each once");
    }
    fake.put("c:1");
    fake.delete("a:1");
    fake.put("b:1"); // an identical value: nothing
    settle().await;
    for w in [&first, &second] {
        assert_eq!([next(w).await, next(w).await], ["+c:1", "-a:1"]);
        assert_eq!(ready_changes(w), 0);
    }
    // A late consumer: what the view holds now, as inserts.
    let third = second.running().join();
    let mut got = vec![next(&third).await, next(&third).await];
    got.sort();
    assert_eq!(got, ["+b:1", "+c:1"]);
    drop(first);
    fake.delete("b:1");
    settle().await;
    for w in [&second, &third] {
        assert_eq!(next(w).await, "-b:1");
    }
    assert_eq!(fake.lock().pages.len(), 1, "one listing for all three");
    assert_eq!(fake.lock().watches.len(), 1, "one watch");
    drop((second, third));
    settle().await;
    fake.put("d:1");
    assert!(
        fake.lock().streams.is_empty(),
        "the last consumer stopped the task"
    );
}

#[tokio::test(start_paused = true)]
async fn lists_then_follows_from_the_next_revision() {
    let fake = Fake::new();
    fake.put("a:1");
    let w = start(&fake);
    settle().await;
    assert_eq!(addrs(&w), ["a:1"]);
    assert_eq!(
        fake.lock().watches[0].1,
        2,
        "watch starts after the listed revision"
    );
    fake.put("b:1");
    fake.delete("a:1");
    settle().await;
    assert_eq!(addrs(&w), ["b:1"]);
}

/// A quiet watch is asked for progress after the idle time; one that
/// answers stays, one that does not is replaced after the request timeout.
#[tokio::test(start_paused = true)]
async fn a_quiet_watch_is_asked_for_progress_and_replaced_if_silent() {
    let fake = Fake::new();
    fake.put("a:1");
    let w = start(&fake);
    settle().await;
    let t0 = Instant::now();
    tokio::time::sleep(IDLE * 3 + Duration::from_secs(1)).await;
    {
        let etcd = fake.lock();
        assert_eq!(etcd.watches.len(), 1, "an answering watch is kept");
        let asked: Vec<Duration> = etcd.progress_requests.iter().map(|t| *t - t0).collect();
        assert_eq!(asked.len(), 3, "{asked:?}");
        assert!(
            asked[0] >= IDLE - Duration::from_millis(2) && asked[0] <= IDLE,
            "{asked:?}"
        );
    }

    fake.lock().answers_progress = false;
    let silent_from = *fake.lock().progress_requests.last().unwrap();
    tokio::time::sleep(IDLE * 2 + REQUEST).await;
    let etcd = fake.lock();
    assert!(etcd.watches.len() >= 2, "a silent watch is replaced");
    let replaced = etcd.watches[1].0 - silent_from;
    // Silent for the idle time, then the request timeout after asking,
    // then at most the first back-off.
    assert!(
        replaced >= IDLE + REQUEST && replaced <= IDLE + REQUEST + Duration::from_millis(200),
        "replaced {replaced:?} after the last answer"
    );
    // Resumed where the progress answers said the view was.
    assert_eq!(etcd.watches[1].1, etcd.revision + 1);
    drop(etcd);
    assert_eq!(addrs(&w), ["a:1"]);
    assert_eq!(w.status().borrow().reconnects, 1);
}

/// Through etcd's gRPC proxy progress requests go unanswered: a quiet
/// watch that never answered one is kept, and checked with a one-key read
/// each quiet period (no further progress requests); when the reads fail,
/// it is replaced.
#[tokio::test(start_paused = true)]
async fn a_watch_that_never_answers_progress_is_checked_by_reads() {
    let fake = Fake::new();
    fake.lock().answers_progress = false;
    fake.put("a:1");
    let w = start(&fake);
    settle().await;
    let reads_before = fake.lock().pages.len();
    tokio::time::sleep((IDLE + REQUEST) * 10).await;
    {
        let etcd = fake.lock();
        assert_eq!(etcd.watches.len(), 1, "the quiet watch is kept");
        assert_eq!(etcd.progress_requests.len(), 1, "asked once, then read");
        let reads = &etcd.pages[reads_before..];
        assert!(reads.len() >= 9, "a read each quiet period: {reads:?}");
        assert!(reads.iter().all(|limit| *limit == 1), "one-key reads");
    }
    fake.put("b:1");
    settle().await;
    assert_eq!(addrs(&w), ["a:1", "b:1"], "events still arrive");
    // The proxy (or etcd behind it) is gone: the next check fails.
    fake.lock().down = true;
    tokio::time::sleep(IDLE + REQUEST).await;
    fake.lock().down = false;
    fake.put("c:1");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        fake.lock().watches.len() >= 2,
        "a failed check replaces the watch"
    );
    assert_eq!(addrs(&w), ["a:1", "b:1", "c:1"]);
}

#[tokio::test(start_paused = true)]
async fn a_broken_watch_resumes_without_losing_or_repeating_events() {
    let fake = Fake::new();
    fake.put("a:1");
    let w = start(&fake);
    settle().await;
    fake.break_streams();
    fake.lock().down = true;
    fake.put("b:1");
    fake.delete("a:1");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        addrs(&w),
        ["a:1"],
        "the last known endpoints stay while etcd is down"
    );
    let status = w.status().borrow().clone();
    assert!(status.last_error.is_some());
    fake.lock().down = false;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(addrs(&w), ["b:1"]);
    assert!(w.status().borrow().last_error.is_none());
    let etcd = fake.lock();
    assert_eq!(
        etcd.watches.last().unwrap().1,
        2,
        "resumed after the last applied revision"
    );
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_up_to_a_second() {
    let fake = Fake::new();
    fake.put("a:1");
    let _w = start(&fake);
    settle().await;
    fake.lock().down = true;
    fake.break_streams();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    fake.lock().down = false;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let etcd = fake.lock();
    let back = etcd.watches.last().unwrap().0 - t0;
    assert!(
        back >= Duration::from_secs(20) && back <= Duration::from_secs(21),
        "{back:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_compacted_revision_is_relisted_and_only_the_difference_applied() {
    let fake = Fake::new();
    fake.put("a:1");
    fake.put("b:1");
    let w = start(&fake);
    settle().await;
    fake.lock().down = true;
    fake.break_streams();
    fake.put("c:1");
    fake.delete("b:1");
    fake.compact();
    fake.lock().down = false;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(addrs(&w), ["a:1", "c:1"]);
    assert_eq!(w.status().borrow().resyncs, 1);
}

/// etcd restored from an older snapshot (or wiped and refilled) answers a
/// resumed watch at a revision below the one the view applied: the view
/// lists again instead of waiting in silence for revisions that will mean
/// something else.
#[tokio::test(start_paused = true)]
async fn a_revision_regression_is_relisted() {
    let fake = Fake::new();
    for i in 0..20 {
        fake.put(&format!("old:{i}"));
        fake.delete(&format!("old:{i}"));
    }
    fake.put("a:1");
    let w = start(&fake);
    settle().await;
    fake.wipe_to(0, &["a:1", "b:1"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(addrs(&w), ["a:1", "b:1"]);
    assert_eq!(w.status().borrow().resyncs, 1);
    // Followed from the new history on.
    fake.put("c:1");
    settle().await;
    assert_eq!(addrs(&w), ["a:1", "b:1", "c:1"]);
}

#[tokio::test(start_paused = true)]
async fn another_cluster_is_relisted() {
    let fake = Fake::new();
    fake.put("a:1");
    let w = start(&fake);
    settle().await;
    {
        let mut etcd = fake.lock();
        etcd.cluster_id = 8;
        etcd.keys.clear();
    }
    fake.put("z:1");
    fake.break_streams();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(addrs(&w), ["z:1"]);
}

#[tokio::test(start_paused = true)]
async fn an_undecodable_or_non_utf8_key_touches_no_other_entry() {
    let fake = Fake::new();
    fake.put("a:1");
    let w = start(&fake);
    settle().await;
    fake.write("svc/\u{fffd}", Some("b:1"));
    settle().await;
    assert_eq!(addrs(&w), ["a:1", "b:1"]);
    // A PUT and a DELETE of a key that is not UTF-8 and whose lossy form
    // is the valid key above.
    fake.write_raw(b"svc/\xff", Some(b"x".to_vec()));
    fake.write_raw(b"svc/\xff", None);
    fake.write("svc/c:1", Some("not json"));
    settle().await;
    assert_eq!(addrs(&w), ["a:1", "b:1"]);
    assert_eq!(w.status().borrow().skipped, 3);
}

#[tokio::test(start_paused = true)]
async fn a_page_too_large_to_decode_is_read_in_smaller_pages() {
    let fake = Fake::new();
    for i in 0..3000 {
        fake.put(&format!("10.0.{}.{}:1", i / 256, i % 256));
    }
    fake.lock().max_page = Some(1000);
    let w = start(&fake);
    settle().await;
    assert_eq!(w.snapshot().len(), 3000);
    let pages = fake.lock().pages.clone();
    // Halved until it fits, then kept for the rest of the listing.
    assert_eq!(
        pages,
        [5000, 2500, 1250, 625, 625, 625, 625, 625],
        "{pages:?}"
    );
}

#[test]
fn only_a_decode_limit_shrinks_pages() {
    let status = |code, msg: &str| Error::Etcd {
        op: "list",
        source: etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg)),
    };
    assert!(too_large(&status(
        tonic::Code::OutOfRange,
        "Error, decoded message length too large: found 300 bytes, the limit is: 200 bytes"
    )));
    assert!(too_large(&status(
        tonic::Code::ResourceExhausted,
        "too big"
    )));
    // etcd's word for a compacted revision: the listing starts over.
    assert!(!too_large(&status(
        tonic::Code::OutOfRange,
        "etcdserver: mvcc: required revision has been compacted"
    )));
}

/// The service config watch (`crate::config_store::watch`) on the same
/// in-memory etcd: a key that only starts with the config's is not it, a
/// refused document keeps the config in force, an outage keeps it too and a
/// change made meanwhile is read on recovery, a compacted watch reads again,
/// and a delete brings the builder's back.
#[tokio::test(start_paused = true)]
async fn a_service_config_survives_outages_and_refuses_what_does_not_validate() {
    use crate::config_store::{self, ConfigSource, ServiceConfigStatus};
    let timeout =
        |secs: u32| format!(r#"{{"methodConfig":[{{"name":[{{}}],"timeout":"{secs}s"}}]}}"#);
    let key = "_tonic-etcd/service-config/svc";
    let fake = Fake::new();
    fake.write_raw(key.as_bytes(), Some(timeout(1).into_bytes()));
    let (tx, rx) = watch::channel(ServiceConfigStatus::builder(Arc::default()));
    let task = tokio::spawn(config_store::watch(
        fake.clone(),
        config_store::WatchConfig {
            key: key.into(),
            default: Arc::default(),
            request_timeout: REQUEST,
            idle: IDLE,
        },
        tx,
    ));
    let secs = || {
        let s = rx.borrow();
        s.config
            .method_configs
            .first()
            .and_then(|m| m.timeout)
            .map(|t| t.as_secs())
    };
    settle().await;
    assert!(rx.borrow().synced);
    assert_eq!(secs(), Some(1));
    assert!(matches!(
        rx.borrow().source,
        ConfigSource::Etcd { revision: 1, .. }
    ));

    fake.write_raw(format!("{key}2").as_bytes(), Some(b"not json".to_vec()));
    settle().await;
    assert!(rx.borrow().rejected.is_none(), "svc2's config is not svc's");

    fake.write_raw(key.as_bytes(), Some(b"{".to_vec()));
    settle().await;
    assert_eq!(secs(), Some(1), "refused whole");
    assert_eq!(rx.borrow().rejected.as_ref().map(|r| r.revision), Some(3));

    // An outage keeps the config in force; what changed meanwhile is read
    // on recovery.
    fake.lock().down = true;
    fake.break_streams();
    fake.write_raw(key.as_bytes(), Some(timeout(2).into_bytes()));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(secs(), Some(1));
    assert!(rx.borrow().last_error.is_some());
    fake.lock().down = false;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(secs(), Some(2));
    assert!(rx.borrow().last_error.is_none() && rx.borrow().rejected.is_none());

    // A watch whose revision was compacted reads the key again.
    fake.compact();
    fake.break_streams();
    fake.write_raw(key.as_bytes(), Some(timeout(3).into_bytes()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(secs(), Some(3));

    fake.write_raw(key.as_bytes(), None);
    settle().await;
    assert_eq!(rx.borrow().source, ConfigSource::Builder);
    assert_eq!(secs(), None);
    task.abort();
}

/// A user without the grant: the view asks again once a minute, not every
/// second, and reports the refusal naming the grant.
#[tokio::test(start_paused = true)]
async fn a_refused_view_asks_etcd_again_once_a_minute() {
    let fake = Fake::new();
    fake.lock().refuse_lists = true;
    let w = start(&fake);
    tokio::time::sleep(Duration::from_secs(300)).await;
    let lists = fake.lock().pages.len();
    // At 0 s, then every 60 to 66 s.
    assert!((5..=6).contains(&lists), "{lists} lists in 300 s");
    let status = w.status().borrow().clone();
    let error = status.last_error.expect("the refusal shown");
    assert!(
        matches!(&*error, Error::Refused { access: "read", key, .. } if key == "svc/"),
        "{error}"
    );
    // The grant added: taken up at the next minute.
    fake.put("a:1");
    fake.lock().refuse_lists = false;
    tokio::time::sleep(Duration::from_secs(67)).await;
    assert_eq!(addrs(&w), ["a:1"]);
}

/// etcd 3.4 refuses a watch whose stream token expired with the same
/// "permission denied" as a missing grant. The prefix was just listed, so
/// the view reopens the stream with a fresh token once, at once; a watch
/// refused again after that is a refusal (once a minute).
#[tokio::test(start_paused = true)]
async fn a_watch_refused_for_its_stream_token_reopens_the_stream_once() {
    let fake = Fake::new();
    fake.put("a:1");
    fake.lock().stale_token = true;
    let w = start(&fake);
    tokio::time::sleep(Duration::from_secs(2)).await;
    fake.put("b:1");
    settle().await;
    assert_eq!(addrs(&w), ["a:1", "b:1"], "resumed within 2 s");
    assert_eq!(fake.lock().reauthentications, 1);

    // A refusal that stays after the reopen (and the reopen before it was
    // answered by a delivery, so the next one is a refusal at once).
    fake.break_streams();
    fake.lock().stale_token = true;
    fake.lock().refuse_lists = true;
    tokio::time::sleep(Duration::from_secs(50)).await;
    let etcd = fake.lock();
    assert!(etcd.reauthentications <= 2, "{}", etcd.reauthentications);
    let creates = etcd.watches.len();
    assert!(creates <= 4, "{creates} creates: a refusal in a loop");
}
