//! One endpoint's connector task: connect, join the rotation, leave it
//! when the connection ends or the endpoint is ejected, drained or
//! unhealthy, reconnect with back-off.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::endpoint::{connect, Ready};
use super::reconcile::PoolConfig;
use super::{AbortOnDrop, ConnectError, EndpointState, Shared};
use crate::backoff::Backoff;
use crate::Instance;

/// A connection that lived this long was healthy: the next failure starts
/// the back-off from its base again. A server that completes the handshake
/// and then drops every connection is retried at the back-off rate.
const HEALTHY_LIFETIME: Duration = Duration::from_secs(1);

/// Keeps one endpoint connected while it is registered: connect, join the
/// rotation, leave it the moment the connection ends, reconnect with
/// back-off. While connected it also leaves the rotation when ejected by
/// outlier detection (and comes back when the ejection ends) or reported
/// unhealthy by active health checking. Returns when the endpoint is
/// removed (its sender dropped); the connection then closes once the calls
/// still on it finish.
pub(super) async fn maintain(
    key: String,
    shared: Arc<Shared>,
    cfg: Arc<PoolConfig>,
    mut instance: watch::Receiver<Arc<Instance>>,
) {
    let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_max);
    let mut ejections = Ejections::default();
    loop {
        let current = instance.borrow_and_update().clone();
        shared.set_state(&key, EndpointState::Connecting, &current, None);
        let connected = tokio::select! {
            r = connect(&key, &shared.target, current.clone(), &cfg.conn, shared.policy.clone()) => r,
            () = removed(&mut instance) => return shared.forget(&key),
        };
        match connected {
            Ok(conn) => {
                let since = Instant::now();
                tracing::debug!(addr = %current.addr, "endpoint connected");
                let why = match serve(&shared, &cfg, conn, &mut instance, &mut ejections).await {
                    Served::Removed => return shared.forget(&key),
                    Served::Lost(why) => why,
                };
                if since.elapsed() >= HEALTHY_LIFETIME {
                    backoff.reset();
                }
                let why = why.unwrap_or_else(|| "the connection closed".into());
                tracing::info!(addr = %current.addr, service = %shared.service, %why,
                    "connection lost; endpoint out of rotation until it reconnects");
                // Callers that find no endpoint are told why.
                shared.connection_lost(&current.addr, &why);
            }
            Err(error) => {
                tracing::debug!(addr = %current.addr, %error, "connect failed");
                crate::metrics::connect_failure(&shared.target);
                shared.connect_failed(&key, &current.addr, ConnectError::from(error));
            }
        }
        // A changed registration (a new value in etcd: new metadata, or a
        // server that registered again with a different value) is news:
        // try it at once rather than at the end of a pause that may have
        // grown to the cap.
        let delay = backoff.next_delay();
        tokio::select! {
            changed = instance.changed() => match changed {
                Ok(()) => tracing::debug!(addr = %current.addr, "registration changed: reconnecting now"),
                Err(_) => return shared.forget(&key),
            },
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// An endpoint's ejection history, kept across reconnects.
#[derive(Default)]
struct Ejections {
    /// Ejections in a row (the next one lasts longer).
    streak: u32,
    /// When the last one ended.
    ended: Option<Instant>,
}

/// How a live connection's service ended.
enum Served {
    /// The endpoint left etcd.
    Removed,
    /// The connection ended (with why, when it failed).
    Lost(Option<String>),
}

/// Runs one live connection: in and out of the rotation as its health and
/// ejections say, until the endpoint is removed or the connection ends.
async fn serve(
    shared: &Arc<Shared>,
    cfg: &PoolConfig,
    mut conn: super::endpoint::Connection,
    instance: &mut watch::Receiver<Arc<Instance>>,
    ejections: &mut Ejections,
) -> Served {
    let ep = conn.ready.clone();
    let policy = &shared.policy;
    ep.set_instance(instance.borrow_and_update().clone());
    // Without health checking there is no health task and nothing to wait
    // for: the branch below is disabled, never polled on a closed channel
    // (a dropped sender makes `changed()` ready at once, forever).
    let (health_tx, mut healthy) = watch::channel(cfg.health_check.is_none());
    let mut watching_health = cfg.health_check.is_some();
    let mut is_healthy = *healthy.borrow_and_update();
    let _health = cfg.health_check.as_ref().map(|service| {
        AbortOnDrop(tokio::spawn(super::health::watch(
            ep.clone(),
            service.clone(),
            health_tx,
        )))
    });
    // Weighted round robin's out-of-band reports, while configured.
    let _reports = AbortOnDrop(tokio::spawn(super::orca::follow(
        ep.clone(),
        cfg.service_config.clone(),
    )));
    let mut ejected_until: Option<Instant> = None;
    let mut in_rotation = false;
    let mut state = None;
    let removed = loop {
        let now_state = match (ejected_until.is_some(), is_healthy) {
            _ if crate::overrides::is_drained(&ep.instance()) => EndpointState::Drained,
            (true, _) => EndpointState::Ejected,
            (false, false) => EndpointState::Unhealthy,
            (false, true) => EndpointState::Ready,
        };
        // The state first: whoever sees the endpoint in rotation (a caller
        // of `wait_for_ready`) also sees it as ready in `endpoints()`.
        if state != Some(now_state) {
            state = Some(now_state);
            shared.set_state(&ep.key, now_state, &ep.instance(), Some(&ep));
        }
        let want = now_state == EndpointState::Ready;
        if want != in_rotation {
            in_rotation = want;
            if want {
                shared.add(ep.clone());
            } else {
                shared.remove(&ep);
            }
        }
        let ejection_over = tokio::time::sleep_until(ejected_until.unwrap_or_else(Instant::now));
        tokio::select! {
            changed = instance.changed() => match changed {
                Ok(()) => {
                    let relocated = ep.set_instance(instance.borrow_and_update().clone());
                    // The registry holds the metadata the ring is built
                    // from (a weight, an operator's weight override): it
                    // takes the new instance, and the cached ring goes.
                    shared.set_state(&ep.key, now_state, &ep.instance(), Some(&ep));
                    if relocated && in_rotation {
                        shared.reorder();
                    }
                }
                Err(_) => break Served::Removed,
            },
            ended = &mut conn.driver => break Served::Lost(ended.ok().flatten()),
            () = ep.closed.notified() => break Served::Lost(None),
            () = ep.outliers.eject.notified(), if ejected_until.is_none() => {
                ejected_until = eject(shared, &ep, ejections);
                ep.outliers.clear();
            }
            () = ejection_over, if ejected_until.is_some() => {
                ejected_until = None;
                ejections.ended = Some(Instant::now());
                policy.ejected.fetch_sub(1, Ordering::Relaxed);
                ep.outliers.on_probation();
                tracing::info!(addr = %ep.addr(), service = %shared.service, "ejection over");
            }
            changed = healthy.changed(), if watching_health => {
                let now_healthy = match changed {
                    Ok(()) => *healthy.borrow_and_update(),
                    Err(_) => {
                        // The health task ended (UNIMPLEMENTED): healthy for
                        // good, and no more waiting on its channel.
                        watching_health = false;
                        true
                    }
                };
                if now_healthy != is_healthy {
                    is_healthy = now_healthy;
                    tracing::debug!(addr = %ep.addr(), healthy = is_healthy, "health changed");
                }
            }
        }
    };
    if ejected_until.is_some() {
        policy.ejected.fetch_sub(1, Ordering::Relaxed);
    }
    if in_rotation {
        shared.remove(&ep);
    }
    ep.retire();
    // On removal the driver runs on until in-flight calls finish and the last
    // handle to the connection is dropped.
    removed
}

/// Ejects `ep` if the budget allows: at most `max_ejection_percent` of the
/// connected endpoints, never the last one. Returns when the ejection ends.
fn eject(shared: &Shared, ep: &Ready, ejections: &mut Ejections) -> Option<Instant> {
    let policy = &shared.policy;
    let outlier = &policy.outlier;
    let in_rotation = shared.ready().len();
    let admitted = policy
        .ejected
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |ejected| {
            let connected = in_rotation + ejected;
            let max = connected * outlier.max_ejection_percent as usize / 100;
            (ejected < max && in_rotation > 1).then_some(ejected + 1)
        })
        .is_ok();
    if !admitted {
        tracing::debug!(addr = %ep.addr(), "outlier, but the ejection budget is spent");
        return None;
    }
    let forgiven = ejections
        .ended
        .is_some_and(|t| t.elapsed() >= outlier.base_ejection_time.saturating_mul(10));
    if forgiven {
        ejections.streak = 0;
    }
    ejections.streak = ejections.streak.saturating_add(1);
    let time = outlier.ejection_time_for(ejections.streak);
    tracing::warn!(addr = %ep.addr(), service = %shared.service, ejection = ejections.streak,
        seconds = time.as_secs_f64(), "endpoint ejected: its calls fail");
    crate::metrics::ejection(&shared.target);
    Some(crate::time::deadline_after(Instant::now(), time))
}

/// Resolves when the pool drops the endpoint. Metadata updates seen meanwhile
/// are not lost: the newest instance is read when the connection is made.
async fn removed(instance: &mut watch::Receiver<Arc<Instance>>) {
    while instance.changed().await.is_ok() {}
}
