//! Keys that everything built on one [`Etcd`](crate::Etcd) keeps under one
//! lease: the client keys of coordinated subsetting.
//!
//! A lease costs etcd a keep-alive every TTL/3 and a key check every 30 s;
//! a key under a lease costs it nothing between writes. So a process with
//! 100 Balancers under coordinated subsetting holds one lease with 100 keys,
//! not 100 leases (Go's `concurrency.Session` is shared the same way). The
//! lease is kept by the registration worker (its keep-alive, re-attach,
//! re-grant after loss, key check and back-off under overload); the keys
//! change under it as [`LeaseKey`]s are made and dropped, and the lease is
//! revoked with the last of them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use super::{Registration, Spec, DEFAULT_KEY_CHECK_INTERVAL, DEFAULT_TTL};
use crate::backoff::Backoff;
use crate::schema::{Encoded, NamingSchema};

/// How long one attempt to grant the shared lease retries before the task
/// reports and backs off (the attempt itself retries with back-off).
const ATTEMPT: Duration = Duration::from_secs(30);

/// One process's shared lease: the keys to keep under it, and whether its
/// keeper task runs.
#[derive(Default)]
pub(crate) struct SharedLease {
    state: Mutex<State>,
    /// Bumped on every change of the key set: the keeper's wake-up.
    version: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    keys: BTreeMap<String, Held>,
    running: bool,
    /// The longest request timeout asked for.
    request_timeout: Duration,
}

struct Held {
    entry: Encoded,
    /// What the key stands for, in logs and metrics.
    label: String,
    /// Holders of the same key (two Balancers of one service never share
    /// one; a key dropped and made again in between is counted).
    holders: usize,
}

impl std::fmt::Debug for SharedLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("SharedLease")
            .field("keys", &state.keys.len())
            .field("running", &state.running)
            .finish()
    }
}

impl SharedLease {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `entry` under the shared lease of `client` for as long as the
    /// result lives; `label` names it in logs and metrics.
    pub(crate) fn hold(
        self: &Arc<Self>,
        client: &etcd_client::Client,
        entry: Encoded,
        label: String,
        request_timeout: Duration,
    ) -> LeaseKey {
        let key = entry.key.clone();
        let mut state = self.lock();
        state.request_timeout = state.request_timeout.max(request_timeout);
        state
            .keys
            .entry(key.clone())
            .and_modify(|h| h.holders += 1)
            .or_insert(Held {
                entry,
                label,
                holders: 1,
            });
        if !state.running {
            state.running = true;
            tokio::spawn(keep(client.clone(), self.clone()));
        }
        drop(state);
        self.version.send_modify(|v| *v += 1);
        LeaseKey {
            lease: self.clone(),
            key,
        }
    }

    /// The keys to keep and their labels; `None` (and the keeper marked as
    /// stopped) when there are none.
    fn wanted(&self) -> Option<(Vec<Encoded>, Vec<String>, Duration)> {
        let mut state = self.lock();
        if state.keys.is_empty() {
            state.running = false;
            return None;
        }
        let entries = state.keys.values().map(|h| h.entry.clone()).collect();
        let mut labels: Vec<String> = state.keys.values().map(|h| h.label.clone()).collect();
        labels.sort_unstable();
        labels.dedup();
        Some((entries, labels, state.request_timeout))
    }
}

/// A key kept under the process's shared lease; dropping it deletes the key
/// (and revokes the lease with the last one).
#[must_use = "dropping a LeaseKey deletes the key"]
pub(crate) struct LeaseKey {
    lease: Arc<SharedLease>,
    key: String,
}

impl std::fmt::Debug for LeaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseKey").field("key", &self.key).finish()
    }
}

impl Drop for LeaseKey {
    fn drop(&mut self) {
        let mut state = self.lease.lock();
        if let Some(h) = state.keys.get_mut(&self.key) {
            h.holders -= 1;
            if h.holders == 0 {
                state.keys.remove(&self.key);
            }
        }
        drop(state);
        self.lease.version.send_modify(|v| *v += 1);
    }
}

/// The keeper: registers the key set under one lease, follows its changes,
/// and revokes the lease once the set is empty. Waits on the set's changes
/// (and the registration worker on its timers) in between.
async fn keep(client: etcd_client::Client, lease: Arc<SharedLease>) {
    let mut changes = lease.version.subscribe();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut held: Option<Registration> = None;
    loop {
        changes.borrow_and_update();
        let Some((entries, services, request_timeout)) = lease.wanted() else {
            break;
        };
        match &held {
            None => {
                let spec = Spec {
                    schema: Arc::new(NamingSchema::new()),
                    services,
                    addr: String::new(),
                    id: None,
                    entries,
                    ttl: DEFAULT_TTL,
                    request_timeout,
                    key_check_interval: DEFAULT_KEY_CHECK_INTERVAL,
                };
                match super::start(client.clone(), spec, ATTEMPT).await {
                    Ok(r) => {
                        backoff.reset();
                        held = Some(r);
                        // The set may have changed meanwhile: compared at once.
                        continue;
                    }
                    Err(error) => {
                        let delay = if error.is_permanent() {
                            // Refused outright (no permission): asked
                            // again at most once a minute.
                            crate::backoff::REFUSED_RETRY
                        } else {
                            backoff.next_delay()
                        };
                        tracing::warn!(%error, retry_in = ?delay,
                            "cannot register this process's client keys in etcd");
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                }
            }
            Some(r) => {
                // Written now, or kept by the worker for its next repair.
                if let Err(error) = r.replace_entries(services, entries).await {
                    tracing::debug!(%error, "client keys not written yet");
                }
            }
        }
        if changes.changed().await.is_err() {
            break;
        }
    }
    if let Some(r) = held {
        if let Err(error) = r.deregister().await {
            tracing::debug!(%error, "client keys expire with their lease");
        }
    }
}
