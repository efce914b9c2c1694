//! The worker's timing on tokio's paused clock, against an in-memory etcd
//! that can go down, freeze (requests and keep-alive answers wait until it
//! thaws, like a silent partition) and lose leases. The same paths run
//! against real etcd in `tests/registration.rs` and `tests/partition.rs`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::store::{EtcdResult, KeepAlive, Store};
use super::*;

const KEY: &str = "svc/127.0.0.1:1";

#[derive(Default)]
struct State {
    next_lease: i64,
    /// Lease → (TTL in seconds, expiry).
    leases: HashMap<i64, (i64, Instant)>,
    /// Key → (value, lease).
    keys: BTreeMap<String, (Vec<u8>, i64)>,
    /// Every request fails with `Unavailable`.
    down: bool,
    /// Every request fails with this (a permanent answer).
    refuse: Option<tonic::Code>,
    /// Revokes fail with this (etcd's lease rule: the user may not write
    /// every key bound to the lease).
    refuse_revokes: Option<tonic::Code>,
    /// Puts wait forever.
    stall_puts: bool,
    /// Attaching a keep-alive stream waits forever.
    stall_attaches: bool,
    /// Puts fail with this (grants still work): an overloaded etcd.
    refuse_puts: Option<tonic::Code>,
    /// Every request and keep-alive answer takes this long: an etcd that is
    /// behind, answering everything late.
    slow: Duration,
    /// Grants and puts sent, whether or not they were answered.
    grants_sent: u32,
    puts_sent: u32,
    /// Requests that reached the fake, answered or refused.
    requests: u32,
    grants: u32,
    puts: u32,
    checks: u32,
    restores: u32,
    keep_alives: u32,
    attaches: Vec<Instant>,
    revoked: Vec<i64>,
}

impl State {
    /// Drops expired leases and their keys, as etcd does.
    fn expire(&mut self) {
        let now = Instant::now();
        let dead: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, (_, expiry))| *expiry <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.drop_lease(id);
        }
    }

    fn drop_lease(&mut self, id: i64) {
        self.leases.remove(&id);
        self.keys.retain(|_, (_, lease)| *lease != id);
    }

    /// Renews `lease`; its remaining TTL, 0 when it is gone.
    fn renew(&mut self, lease: i64) -> i64 {
        self.expire();
        self.keep_alives += 1;
        match self.leases.get_mut(&lease) {
            Some((ttl, expiry)) => {
                *expiry = Instant::now() + Duration::from_secs(*ttl as u64);
                *ttl
            }
            None => 0,
        }
    }

    fn intact(&self, entries: &[Encoded], lease: i64) -> bool {
        entries
            .iter()
            .all(|e| self.keys.get(&e.key) == Some(&(e.value.clone(), lease)))
    }
}

/// An in-memory etcd.
#[derive(Clone)]
struct Fake {
    state: Arc<Mutex<State>>,
    frozen: Arc<watch::Sender<bool>>,
}

impl Fake {
    fn new() -> Self {
        Self {
            state: Arc::default(),
            frozen: Arc::new(watch::channel(false).0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    fn freeze(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }

    /// Waits out a freeze, then fails if etcd is down or refusing.
    async fn reach(&self) -> EtcdResult<MutexGuard<'_, State>> {
        let _ = self.frozen.subscribe().wait_for(|f| !f).await;
        self.lag().await;
        let mut state = self.lock();
        state.expire();
        state.requests += 1;
        if state.down {
            return Err(status(tonic::Code::Unavailable));
        }
        if let Some(code) = state.refuse {
            return Err(status(code));
        }
        Ok(state)
    }

    async fn lag(&self) {
        let slow = self.lock().slow;
        if !slow.is_zero() {
            tokio::time::sleep(slow).await;
        }
    }

    fn lease_of(&self, key: &str) -> Option<i64> {
        let mut state = self.lock();
        state.expire();
        state.keys.get(key).map(|(_, lease)| *lease)
    }
}

fn status(code: tonic::Code) -> etcd_client::Error {
    etcd_client::Error::GRpcStatus(tonic::Status::new(code, "fake etcd"))
}

impl Store for Fake {
    type KeepAlive = FakeKeepAlive;

    async fn grant(&self, ttl: i64) -> EtcdResult<i64> {
        self.lock().grants_sent += 1;
        let mut state = self.reach().await?;
        state.grants += 1;
        state.next_lease += 1;
        let id = state.next_lease;
        let expiry = Instant::now() + Duration::from_secs(ttl as u64);
        state.leases.insert(id, (ttl, expiry));
        Ok(id)
    }

    fn put(
        &self,
        entries: &[Encoded],
        lease: i64,
    ) -> impl Future<Output = EtcdResult<Vec<(String, i64)>>> + Send {
        let entries = entries.to_vec();
        async move {
            self.lock().puts_sent += 1;
            if self.lock().stall_puts {
                std::future::pending::<()>().await;
            }
            let mut state = self.reach().await?;
            state.puts += 1;
            if let Some(code) = state.refuse_puts {
                return Err(status(code));
            }
            if !state.leases.contains_key(&lease) {
                return Err(status(tonic::Code::NotFound));
            }
            let mut previous = Vec::new();
            for e in entries {
                if let Some((_, old)) = state.keys.insert(e.key.clone(), (e.value, lease)) {
                    previous.push((e.key, old));
                }
            }
            Ok(previous)
        }
    }

    async fn attach(&self, lease: i64) -> EtcdResult<FakeKeepAlive> {
        if self.lock().stall_attaches {
            std::future::pending::<()>().await;
        }
        let mut state = self.reach().await?;
        state.attaches.push(Instant::now());
        if state.renew(lease) == 0 {
            // What etcd-client says when the first answer has TTL 0.
            return Err(etcd_client::Error::LeaseKeepAliveError(
                "lease not found".into(),
            ));
        }
        Ok(FakeKeepAlive {
            fake: self.clone(),
            lease,
            asked: Default::default(),
        })
    }

    async fn intact(&self, entries: &[Encoded], lease: i64) -> EtcdResult<bool> {
        // Counted when sent: a check etcd is slow to answer is load too.
        self.lock().checks += 1;
        let state = self.reach().await?;
        Ok(state.intact(entries, lease))
    }

    async fn restore(&self, entries: &[Encoded], lease: i64) -> EtcdResult<bool> {
        let mut state = self.reach().await?;
        if state.intact(entries, lease) {
            return Ok(false);
        }
        state.restores += 1;
        for e in entries {
            state.keys.insert(e.key.clone(), (e.value.clone(), lease));
        }
        Ok(true)
    }

    async fn delete(&self, keys: &[String]) -> EtcdResult<()> {
        let mut state = self.reach().await?;
        for k in keys {
            state.keys.remove(k);
        }
        Ok(())
    }

    /// An etcd that answers late is one with a queue.
    async fn behind(&self) -> EtcdResult<bool> {
        Ok(!self.lock().slow.is_zero())
    }

    async fn revoke(&self, lease: i64) -> EtcdResult<()> {
        let mut state = self.reach().await?;
        state.revoked.push(lease);
        if let Some(code) = state.refuse_revokes {
            return Err(status(code));
        }
        if !state.leases.contains_key(&lease) {
            return Err(status(tonic::Code::NotFound));
        }
        state.drop_lease(lease);
        Ok(())
    }
}

struct FakeKeepAlive {
    fake: Fake,
    lease: i64,
    /// When each keep-alive sent and not answered yet is due for an answer
    /// (kept here: the answer comes however often `next` is dropped).
    asked: std::collections::VecDeque<Instant>,
}

impl KeepAlive for FakeKeepAlive {
    async fn send(&mut self) -> EtcdResult<()> {
        let slow = self.fake.lock().slow;
        self.asked.push_back(Instant::now() + slow);
        Ok(())
    }

    async fn next(&mut self) -> EtcdResult<Option<i64>> {
        if self.fake.lock().down {
            // A closed connection fails the stream.
            return Err(status(tonic::Code::Unavailable));
        }
        let Some(&due) = self.asked.front() else {
            // Only a send (after this future is dropped) brings an answer.
            return std::future::pending().await;
        };
        tokio::time::sleep_until(due).await;
        let _ = self.fake.frozen.subscribe().wait_for(|f| !f).await;
        self.asked.pop_front();
        Ok(Some(self.fake.lock().renew(self.lease)))
    }
}

fn spec(ttl: u64) -> Spec {
    let schema: Arc<dyn Schema> = Arc::new(NamingSchema::new());
    let services = vec!["svc".to_owned()];
    let addr = "127.0.0.1:1".to_owned();
    let entries = encode_all(&*schema, &services, &addr, None, &Metadata::new()).unwrap();
    Spec {
        schema,
        services,
        addr,
        id: None,
        entries,
        ttl: Duration::from_secs(ttl),
        request_timeout: Duration::from_secs(5),
        // Every keep-alive tick, as the tests below count them.
        key_check_interval: Duration::from_secs(ttl) / 3,
    }
}

async fn registered(fake: &Fake, ttl: u64) -> Registration {
    start(fake.clone(), spec(ttl), Duration::from_secs(30))
        .await
        .unwrap()
}

/// Runs past the first keep-alive (at most two thirds of a 3 s TTL after
/// the grant), then takes etcd down until the registration says so.
async fn lose_etcd_after_the_first_keep_alive(fake: &Fake, reg: &Registration) {
    run_for(Duration::from_millis(2100)).await;
    fake.lock().down = true;
    let mut states = reg.watch_state();
    states
        .wait_for(|s| matches!(s, RegistrationState::Retrying { .. }))
        .await
        .unwrap();
}

/// Lets the worker run until the clock has moved `by`.
async fn run_for(by: Duration) {
    tokio::time::sleep(by).await;
}

#[tokio::test(start_paused = true)]
async fn steady_state_renews_every_third_of_the_ttl_and_writes_nothing() {
    let fake = Fake::new();
    let reg = registered(&fake, 3).await;
    run_for(Duration::from_millis(10_500)).await;
    let state = fake.lock();
    assert_eq!((state.grants, state.puts, state.restores), (1, 1, 0));
    // One on attaching (1 to 2 s after the grant), then one per second,
    // with a key check on each tick.
    assert!(
        (9..=10).contains(&state.keep_alives),
        "{}",
        state.keep_alives
    );
    assert_eq!(state.checks, state.keep_alives - 1);
    drop(state);
    assert_eq!(reg.lease_id(), Some(1));
}

/// The lease was just granted with its whole TTL, so the first keep-alive
/// waits a keep-alive interval (a third of the TTL) and a random part of
/// another: a fleet registered together neither renews at once (into an
/// etcd still applying its grants) nor in step afterwards.
#[tokio::test(start_paused = true)]
async fn the_first_keep_alive_waits_a_jittered_interval() {
    let mut firsts = Vec::new();
    for _ in 0..20 {
        let fake = Fake::new();
        let _reg = registered(&fake, 3).await;
        let granted = Instant::now();
        run_for(Duration::from_millis(999)).await;
        assert!(
            fake.lock().attaches.is_empty(),
            "attached within an interval"
        );
        run_for(Duration::from_millis(1002)).await;
        let state = fake.lock();
        assert_eq!(state.attaches.len(), 1, "attached by the second interval");
        let at = state.attaches[0] - granted;
        assert!(
            at >= Duration::from_millis(1000) && at <= Duration::from_millis(2000),
            "first keep-alive {at:?} after the grant"
        );
        firsts.push(at);
    }
    let (lo, hi) = (firsts.iter().min(), firsts.iter().max());
    assert!(
        lo.zip(hi)
            .is_some_and(|(lo, hi)| *hi - *lo >= Duration::from_millis(100)),
        "not spread: {firsts:?}"
    );
}

/// etcd gone during the pause before the first keep-alive: nothing notices
/// until the attach, which then says so in the state within one attempt's
/// limit (1.25 s), not after its whole request timeout (5 s).
#[tokio::test(start_paused = true)]
async fn etcd_gone_before_the_first_keep_alive_shows_in_the_state_soon() {
    let fake = Fake::new();
    let reg = registered(&fake, 3).await;
    fake.lock().down = true;
    let t0 = Instant::now();
    let mut states = reg.watch_state();
    states
        .wait_for(|s| matches!(s, RegistrationState::Retrying { .. }))
        .await
        .unwrap();
    // The attach at most two intervals (2 s) after the grant.
    assert!(
        t0.elapsed() <= Duration::from_millis(3300),
        "{:?}",
        t0.elapsed()
    );
}

/// A key check is a read: every keep-alive tick, 10,000 registrations cost
/// etcd as much in checks as in renewals. They run every check interval.
#[tokio::test(start_paused = true)]
async fn keys_are_checked_every_check_interval_not_every_tick() {
    let fake = Fake::new();
    let mut spec = spec(3);
    spec.key_check_interval = Duration::from_secs(30);
    let _reg = start(fake.clone(), spec, Duration::from_secs(30))
        .await
        .unwrap();
    run_for(Duration::from_secs(100)).await;
    let state = fake.lock();
    assert!(state.keep_alives >= 99, "{}", state.keep_alives);
    assert!((3..=4).contains(&state.checks), "{} checks", state.checks);
}

/// A partition shorter than the TTL must not cost the lease: silence is
/// noticed at half the TTL, and the re-attach that waits out the freeze
/// lands before the lease expires, for the shortest TTL etcd allows too.
#[tokio::test(start_paused = true)]
async fn a_freeze_shorter_than_the_ttl_keeps_the_lease() {
    for ttl in [2, 3, 10] {
        let fake = Fake::new();
        let reg = registered(&fake, ttl).await;
        let mut states = reg.watch_state();
        let ttl_d = Duration::from_secs(ttl);
        run_for(ttl_d).await;
        fake.freeze(true);
        // Silence is noticed within half the TTL past the last answer.
        let noticed = tokio::time::timeout(ttl_d / 2 + Duration::from_millis(10), async {
            states
                .wait_for(|s| matches!(s, RegistrationState::Retrying { .. }))
                .await
                .map(drop)
        })
        .await;
        assert!(
            noticed.is_ok(),
            "TTL {ttl}s: silence not noticed within TTL/2"
        );
        run_for(ttl_d * 7 / 10 - ttl_d / 2).await;
        fake.freeze(false);
        run_for(ttl_d).await;
        let state = fake.lock();
        assert_eq!(state.grants, 1, "TTL {ttl}s: the lease was lost");
        assert!(state.attaches.len() >= 2, "TTL {ttl}s: never re-attached");
        drop(state);
        assert_eq!(reg.lease_id(), Some(1), "TTL {ttl}s");
        assert_eq!(fake.lease_of(KEY), Some(1), "TTL {ttl}s");
    }
}

#[tokio::test(start_paused = true)]
async fn a_freeze_longer_than_the_ttl_registers_under_a_new_lease() {
    let fake = Fake::new();
    let reg = registered(&fake, 3).await;
    fake.freeze(true);
    run_for(Duration::from_secs(5)).await;
    fake.freeze(false);
    run_for(Duration::from_secs(2)).await;
    assert_eq!(fake.lock().grants, 2);
    assert_eq!(reg.lease_id(), Some(2));
    assert_eq!(fake.lease_of(KEY), Some(2));
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_is_replaced_within_one_interval() {
    let fake = Fake::new();
    let reg = registered(&fake, 3).await;
    // Past the first keep-alive (at most two intervals after the grant).
    run_for(Duration::from_millis(2100)).await;
    fake.lock().drop_lease(1);
    let t0 = Instant::now();
    let mut states = reg.watch_state();
    states
        .wait_for(|s| *s == RegistrationState::Registered { lease_id: 2 })
        .await
        .unwrap();
    assert!(t0.elapsed() <= Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(fake.lease_of(KEY), Some(2));
}

/// The check interval here is one keep-alive tick.
#[tokio::test(start_paused = true)]
async fn a_deleted_key_is_restored_within_one_check_interval() {
    let fake = Fake::new();
    let _reg = registered(&fake, 3).await;
    // Past the first keep-alive and the first check after it.
    run_for(Duration::from_millis(3100)).await;
    fake.lock().keys.clear();
    run_for(Duration::from_secs(1)).await;
    assert_eq!(fake.lease_of(KEY), Some(1));
    assert_eq!(fake.lock().restores, 1);
}

#[tokio::test(start_paused = true)]
async fn start_up_backs_off_until_its_deadline() {
    let fake = Fake::new();
    fake.lock().down = true;
    let mut spec = spec(3);
    spec.request_timeout = Duration::from_secs(1);
    let t0 = Instant::now();
    let err = start(fake.clone(), spec, Duration::from_secs(5))
        .await
        .unwrap_err();
    let took = t0.elapsed();
    assert!(took <= Duration::from_secs(5), "{took:?}");
    assert!(took >= Duration::from_secs(4), "gave up early: {took:?}");
    let Error::StartupDeadline { last_error, .. } = &err else {
        panic!("{err}");
    };
    assert!(last_error.to_string().contains("fake etcd"), "{err}");
    assert_eq!(fake.lock().grants, 0);
}

#[tokio::test(start_paused = true)]
async fn a_permanent_refusal_ends_start_up_at_once() {
    let fake = Fake::new();
    fake.lock().refuse = Some(tonic::Code::OutOfRange);
    let t0 = Instant::now();
    let err = start(fake.clone(), spec(3), Duration::from_secs(30))
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert!(err.is_permanent(), "{err}");
}

#[tokio::test(start_paused = true)]
async fn deregister_revokes_the_lease() {
    let fake = Fake::new();
    let reg = registered(&fake, 3).await;
    let mut states = reg.watch_state();
    reg.deregister().await.unwrap();
    assert_eq!(fake.lease_of(KEY), None);
    assert_eq!(fake.lock().revoked, [1]);
    assert_eq!(*states.borrow_and_update(), RegistrationState::Deregistered);
}

/// etcd refuses the revoke (a drain bound to the lease is outside the
/// user's write grant): the instance key is deleted at once all the same,
/// so clients stop calling before the server stops serving.
#[tokio::test(start_paused = true)]
async fn a_refused_revoke_still_deletes_the_instance_keys() {
    let fake = Fake::new();
    let reg = registered(&fake, 3).await;
    fake.lock().refuse_revokes = Some(tonic::Code::PermissionDenied);
    reg.deregister().await.unwrap();
    assert_eq!(fake.lock().revoked, [1]);
    assert_eq!(
        fake.lease_of(KEY),
        None,
        "the key stayed until the lease expires"
    );
}

/// The worker is re-registering when told to stop: its lease is granted
/// but the put hangs. `deregister` returns at once, and the abandoned
/// attempt's lease is revoked, so no key can appear under it later.
#[tokio::test(start_paused = true)]
async fn deregister_during_re_registration_leaves_no_lease() {
    let fake = Fake::new();
    let reg = registered(&fake, 3).await;
    fake.lock().stall_puts = true;
    fake.lock().drop_lease(1);
    let mut states = reg.watch_state();
    states
        .wait_for(|s| matches!(s, RegistrationState::Lost { .. }))
        .await
        .unwrap();
    run_for(Duration::from_millis(100)).await;
    assert_eq!(fake.lock().grants, 2, "the new lease is granted");
    let t0 = Instant::now();
    reg.deregister().await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(10),
        "{:?}",
        t0.elapsed()
    );
    run_for(Duration::from_millis(100)).await;
    let state = fake.lock();
    assert_eq!(state.revoked, [2]);
    assert!(state.leases.is_empty() && state.keys.is_empty());
}

#[tokio::test(start_paused = true)]
async fn dropping_the_handle_revokes_the_lease() {
    let fake = Fake::new();
    drop(registered(&fake, 3).await);
    run_for(Duration::from_millis(100)).await;
    assert_eq!(fake.lock().revoked, [1]);
    assert_eq!(fake.lease_of(KEY), None);
}

#[tokio::test(start_paused = true)]
async fn metadata_is_written_now_or_after_an_outage() {
    let fake = Fake::new();
    let reg = registered(&fake, 3).await;
    let value = |fake: &Fake| {
        let state = fake.lock();
        String::from_utf8(state.keys[KEY].0.clone()).unwrap()
    };
    reg.update_metadata(Metadata::new().with("zone", "a"))
        .await
        .unwrap();
    assert!(value(&fake).contains("\"a\""), "{}", value(&fake));

    lose_etcd_after_the_first_keep_alive(&fake, &reg).await;
    let t0 = Instant::now();
    reg.update_metadata(Metadata::new().with("zone", "b"))
        .await
        .unwrap();
    assert!(t0.elapsed() <= Duration::from_secs(6), "{:?}", t0.elapsed());
    fake.lock().down = false;
    run_for(Duration::from_secs(1)).await;
    assert!(value(&fake).contains("\"b\""), "{}", value(&fake));
    assert_eq!(reg.lease_id(), Some(1));
}

#[tokio::test(start_paused = true)]
async fn metadata_updated_during_the_first_attach_is_one_put() {
    let fake = Fake::new();
    let reg = registered(&fake, 3).await;
    // The worker has not attached its keep-alive stream yet, and will not.
    fake.lock().stall_attaches = true;
    reg.update_metadata(Metadata::new().with("zone", "a"))
        .await
        .unwrap();
    let state = fake.lock();
    let value = String::from_utf8(state.keys[KEY].0.clone()).unwrap();
    assert!(value.contains("\"a\""), "written at once: {value}");
    assert_eq!(
        (state.puts, state.checks, state.restores),
        (2, 0, 0),
        "the registration's put and one more, no check and repair"
    );
}

#[tokio::test(start_paused = true)]
async fn an_overloaded_etcd_is_retried_far_less_often() {
    // "too many requests" for a whole 30 s start-up: attempts back off
    // towards 16 s; a refused connection is retried about every second.
    let overloaded = Fake::new();
    overloaded.lock().refuse = Some(tonic::Code::ResourceExhausted);
    let err = start(overloaded.clone(), spec(10), Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(err.is_overload(), "{err}");
    let down = Fake::new();
    down.lock().refuse = Some(tonic::Code::Unavailable);
    let err = start(down.clone(), spec(10), Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(!err.is_overload(), "{err}");
    let (o, d) = (overloaded.lock().requests, down.lock().requests);
    assert!(o <= 8, "{o} attempts against an overloaded etcd in 30 s");
    assert!(d >= 3 * o, "{d} against an unreachable one, {o} overloaded");
}

#[tokio::test(start_paused = true)]
async fn a_put_refused_for_overload_is_retried_under_the_same_lease() {
    let fake = Fake::new();
    fake.lock().refuse_puts = Some(tonic::Code::ResourceExhausted);
    let f = fake.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        f.lock().refuse_puts = None;
    });
    let reg = start(fake.clone(), spec(10), Duration::from_secs(30))
        .await
        .unwrap();
    let state = fake.lock();
    assert_eq!(state.grants, 1, "one lease, put again under it");
    assert!(state.puts >= 2, "{}", state.puts);
    assert!(state.revoked.is_empty());
    drop(state);
    assert_eq!(reg.lease_id(), Some(1));
}

/// An etcd that answers everything 4 s late (renewals too) is slow, not
/// gone: the registration keeps its one keep-alive stream although answers
/// come 7 s apart (past the 5 s silence rule for a TTL of 10 s), does not
/// send its attach again when it stalls, and adds no key checks; once etcd
/// is quick again, checks resume.
#[tokio::test(start_paused = true)]
async fn a_slow_etcd_is_waited_for_not_piled_on() {
    let fake = Fake::new();
    fake.lock().slow = Duration::from_secs(4);
    let reg = registered(&fake, 10).await;
    run_for(Duration::from_secs(60)).await;
    {
        let state = fake.lock();
        assert_eq!(
            state.attaches.len(),
            1,
            "re-attached at {:?}",
            state.attaches
        );
        assert_eq!((state.grants, state.checks, state.restores), (1, 0, 0));
        assert!(state.keep_alives >= 10, "{}", state.keep_alives);
    }
    assert_eq!(reg.lease_id(), Some(1));

    fake.lock().slow = Duration::ZERO;
    run_for(Duration::from_secs(40)).await;
    let state = fake.lock();
    assert!(state.checks >= 1, "key checks resume once etcd is quick");
    assert_eq!(state.attaches.len(), 1);
}

/// The first keep-alive waits up to two thirds of the TTL, but an etcd that
/// answers 4 s late also renews 4 s late: with a TTL of 10 s, a renewal sent
/// after 6 s would land after the lease expired. The wait is cut short by
/// how late etcd answered the put (30 registrations: a jittered wait would
/// lose about one lease in five).
#[tokio::test(start_paused = true)]
async fn the_first_keep_alive_of_a_slow_etcd_lands_in_time() {
    for i in 0..30 {
        let fake = Fake::new();
        fake.lock().slow = Duration::from_secs(4);
        let reg = registered(&fake, 10).await;
        run_for(Duration::from_secs(20)).await;
        assert_eq!(fake.lock().grants, 1, "registration {i} lost its lease");
        assert_eq!(reg.lease_id(), Some(1));
    }
}

/// Once etcd has pushed back, a slow grant or put is queued in it, not lost:
/// each is sent once and waited for. (Sent again on a stall, as when etcd
/// has shown no overload, every copy of a grant becomes a lease.)
#[tokio::test(start_paused = true)]
async fn a_pressed_etcd_gets_each_write_once() {
    let fake = Fake::new();
    fake.lock().refuse = Some(tonic::Code::ResourceExhausted);
    let f = fake.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut state = f.lock();
        state.refuse = None;
        state.slow = Duration::from_secs(2);
    });
    let reg = registered(&fake, 10).await;
    let state = fake.lock();
    // The refused grant, then one that etcd took 2 s to answer.
    assert_eq!((state.grants_sent, state.grants), (2, 1));
    assert_eq!((state.puts_sent, state.puts), (1, 1));
    drop(state);
    assert_eq!(reg.lease_id(), Some(1));
}

/// A grant that stalls in an etcd that is behind is waited for, not sent
/// again, even before any sign of overload (the first attempt of a storm).
#[tokio::test(start_paused = true)]
async fn a_grant_queued_in_an_etcd_that_is_behind_is_sent_once() {
    let fake = Fake::new();
    fake.lock().slow = Duration::from_secs(3);
    let reg = registered(&fake, 10).await;
    let state = fake.lock();
    assert_eq!((state.grants_sent, state.grants), (1, 1));
    assert_eq!((state.puts_sent, state.puts), (1, 1));
    drop(state);
    assert_eq!(reg.lease_id(), Some(1));
}

/// The key set of a shared lease changes under the same lease: a key added
/// or changed is one put, an unchanged one is not written again, a dropped
/// one is deleted — at once, or (etcd away) by the repair after it returns.
#[tokio::test(start_paused = true)]
async fn a_shared_lease_key_set_changes_under_the_same_lease() {
    let fake = Fake::new();
    let reg = registered(&fake, 3).await;
    let entry = |key: &str, value: &str| Encoded {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
    };
    let keys = |fake: &Fake| -> Vec<(String, String, i64)> {
        let state = fake.lock();
        let all = state.keys.iter();
        all.map(|(k, (v, l))| (k.clone(), String::from_utf8(v.clone()).unwrap(), *l))
            .collect()
    };
    let services = || vec!["clients".to_owned()];
    let puts = fake.lock().puts;
    reg.replace_entries(services(), vec![entry("c/a", "1"), entry("c/b", "1")])
        .await
        .unwrap();
    // KEY dropped, a and b added: one put (of both), one delete.
    assert_eq!(fake.lock().puts, puts + 1);
    assert_eq!(
        keys(&fake),
        [("c/a".into(), "1".into(), 1), ("c/b".into(), "1".into(), 1)]
    );
    reg.replace_entries(services(), vec![entry("c/a", "1"), entry("c/b", "2")])
        .await
        .unwrap();
    assert_eq!(
        fake.lock().puts,
        puts + 2,
        "only the changed key is written"
    );
    assert_eq!(keys(&fake)[1].1, "2");

    // Then etcd goes away and b is dropped.
    lose_etcd_after_the_first_keep_alive(&fake, &reg).await;
    reg.replace_entries(services(), vec![entry("c/a", "1")])
        .await
        .unwrap();
    assert_eq!(keys(&fake).len(), 2, "etcd is away: nothing deleted yet");
    fake.lock().down = false;
    run_for(Duration::from_secs(2)).await;
    assert_eq!(keys(&fake), [("c/a".into(), "1".into(), 1)]);
    assert_eq!(reg.lease_id(), Some(1), "the same lease throughout");
}
