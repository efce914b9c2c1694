//! How every etcd request of this crate is retried.
//!
//! * The whole request has a deadline (the `etcd_request_timeout` /
//!   `request_timeout` options).
//! * Each attempt has a shorter limit of its own, a quarter of the deadline
//!   and at least 1 s: during a leader election etcd can drop a proposal
//!   silently, and the request then waits for its whole timeout (etcd's
//!   "request timed out" comes after 7 s). Retrying the attempt recovers
//!   about as soon as the new leader is in place.
//! * `Unavailable` (a dead member stays in etcd-client's rotation, so about
//!   1/N of calls fail that way until it is back) and a stalled attempt are
//!   retried with a short back-off while the deadline allows.
//! * An overloaded etcd ("too many requests", "waiting for the applied index
//!   took too long", `RESOURCE_EXHAUSTED`) is **not** retried here: the
//!   caller backs off far longer (registration: 0.5 s to 16 s). Retrying
//!   those every 10 to 200 ms was most of the load in the storm benchmark
//!   (96,000 keep-alive retries in one minute of a 10,000-instance storm).
//! * [`once`] makes one attempt: registration sends its grants and puts
//!   that way once etcd has shown overload, because a stalled write is then
//!   queued, not dropped, and each grant sent again became a lease nobody
//!   used (40,000 in that storm). Without that sign a stall is more likely
//!   a proposal dropped in a leader election, which only re-sending ends.
//!
//! Every request this crate makes is safe to repeat: writes put the same
//! value (an attempt cut off may still have been applied), a repeated lease
//! grant leaves at most an unused lease that expires, reads are reads.

use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::Error;

/// The shortest limit on one attempt.
const MIN_ATTEMPT: Duration = Duration::from_secs(1);

/// Runs an etcd request `op` within `timeout`, retrying as described in the
/// [module docs](self).
pub(crate) async fn with_timeout<T, F, Fut>(
    op: &'static str,
    timeout: Duration,
    mut call: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = crate::time::deadline_after(Instant::now(), timeout);
    let per_attempt = attempt_limit(timeout);
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(200));
    loop {
        let attempt_deadline =
            crate::time::deadline_after(Instant::now(), per_attempt).min(deadline);
        let error = match tokio::time::timeout_at(attempt_deadline, call()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if worth_another_attempt(&e) => Some(e),
            Ok(Err(e)) => return Err(Error::Etcd { op, source: e }),
            // The attempt stalled (a dropped proposal, a member cut off).
            Err(_) => None,
        };
        let delay = backoff.next_delay();
        if Instant::now() + delay >= deadline {
            return Err(match error {
                Some(source) => Error::Etcd { op, source },
                None => Error::Timeout { op, timeout },
            });
        }
        match &error {
            Some(e) => tracing::debug!(op, error = %e, "etcd member unavailable; retrying"),
            None => tracing::debug!(op, ?per_attempt, "etcd attempt stalled; retrying"),
        }
        tokio::time::sleep(delay).await;
    }
}

/// The limit on one attempt of a request allowed `timeout` in all.
pub(crate) fn attempt_limit(timeout: Duration) -> Duration {
    (timeout / 4).max(MIN_ATTEMPT).min(timeout)
}

/// A member that is away (sent again, the request may reach another), not
/// one that is behind.
pub(crate) fn worth_another_attempt(e: &etcd_client::Error) -> bool {
    is_unavailable(e) && !is_overload(e)
}

/// One attempt of an etcd write within `timeout` (see the [module docs](self)).
pub(crate) async fn once<T, Fut>(op: &'static str, timeout: Duration, call: Fut) -> Result<T, Error>
where
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(Error::Etcd { op, source }),
        Err(_) => Err(Error::Timeout { op, timeout }),
    }
}

/// etcd pushing back: it is up and answering, but behind. etcd 3.4 and 3.5
/// send "too many requests" with code `Unknown` when applying falls 5,000
/// entries behind committing, and refuse lease renewals with `Unavailable`
/// "waiting for the applied index took too long" while it catches up.
pub(crate) fn is_overload(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::ResourceExhausted
                || s.message().contains("too many requests")
                || s.message().contains("waiting for the applied index")
        }
        _ => false,
    }
}

fn is_unavailable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::Unavailable,
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_stalled_attempt_is_retried_within_the_deadline() {
        let attempts = AtomicU32::new(0);
        let start = Instant::now();
        let r = with_timeout("op", Duration::from_secs(5), || {
            let n = attempts.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    // Dropped proposal: never answers.
                    std::future::pending::<()>().await;
                }
                Ok::<_, etcd_client::Error>(n)
            }
        })
        .await;
        assert_eq!(r.unwrap(), 1);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1250) && took < Duration::from_millis(1500),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stalls_until_the_deadline_time_out_and_other_errors_do_not_retry() {
        let start = Instant::now();
        let r = with_timeout("op", Duration::from_secs(3), || async {
            std::future::pending::<Result<(), etcd_client::Error>>().await
        })
        .await;
        assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
        assert!(start.elapsed() <= Duration::from_secs(3));

        let attempts = AtomicU32::new(0);
        let r = with_timeout("op", Duration::from_secs(3), || {
            attempts.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(etcd_client::Error::InvalidArgs("bad".into())) }
        })
        .await;
        assert!(matches!(r, Err(Error::Etcd { .. })));
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_overloaded_etcd_is_left_to_the_callers_back_off() {
        for (code, message) in [
            (tonic::Code::Unknown, "etcdserver: too many requests"),
            (
                tonic::Code::Unavailable,
                "etcdserver: request timed out, waiting for the applied index took too long",
            ),
            (tonic::Code::ResourceExhausted, "h2 protocol error"),
        ] {
            let attempts = AtomicU32::new(0);
            let r = with_timeout("op", Duration::from_secs(5), || {
                attempts.fetch_add(1, Ordering::SeqCst);
                async move {
                    Err::<(), _>(etcd_client::Error::GRpcStatus(tonic::Status::new(
                        code, message,
                    )))
                }
            })
            .await;
            let err = r.unwrap_err();
            assert!(err.is_overload(), "{err}");
            assert_eq!(attempts.load(Ordering::SeqCst), 1, "{message}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_made_once_is_not_sent_again_when_it_stalls() {
        let start = Instant::now();
        let r = once("lease grant", Duration::from_secs(5), async {
            std::future::pending::<Result<(), etcd_client::Error>>().await
        })
        .await;
        assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
}
