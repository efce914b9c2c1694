//! Saturating time arithmetic for user-supplied durations, and the one way
//! this crate waits for a state with a deadline.
//!
//! `Instant + Duration` panics on overflow, so a caller that means "forever"
//! (`Duration::MAX`) would crash the process. Every duration option is capped
//! at [`FOREVER`] when it is set, and every deadline is computed with
//! [`deadline_after`].

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// A century: longer than any process lives, short enough to add to an
/// `Instant` and to multiply by small factors without overflow.
pub(crate) const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// tokio's timer fires on 1 ms ticks: a sleep never ends a wait finer than
/// this, and two deadlines within it may fire in either order.
pub(crate) const TIMER_TICK: Duration = Duration::from_millis(1);

/// `d`, capped at [`FOREVER`].
pub(crate) fn cap(d: Duration) -> Duration {
    d.min(FOREVER)
}

/// `now + d`, saturating at `now + FOREVER`.
pub(crate) fn deadline_after(now: Instant, d: Duration) -> Instant {
    now.checked_add(cap(d)).unwrap_or(now)
}

/// How [`wait_until`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waited {
    /// The value satisfied the condition.
    Ready,
    /// The deadline passed first.
    TimedOut,
    /// The task publishing the value is gone.
    Gone,
}

/// Waits until `rx`'s value satisfies `ready` (checked on the current value
/// first), until `deadline`.
pub(crate) async fn wait_until<T>(
    rx: &mut watch::Receiver<T>,
    deadline: Instant,
    ready: impl FnMut(&T) -> bool,
) -> Waited {
    match tokio::time::timeout_at(deadline, rx.wait_for(ready)).await {
        Ok(Ok(_)) => Waited::Ready,
        Ok(Err(_)) => Waited::Gone,
        Err(_) => Waited::TimedOut,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturates() {
        let now = Instant::now();
        assert_eq!(cap(Duration::MAX), FOREVER);
        assert!(deadline_after(now, Duration::MAX) > now + Duration::from_secs(365 * 24 * 3600));
        assert_eq!(
            deadline_after(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn wait_until_ends_three_ways() {
        let (tx, mut rx) = watch::channel(0);
        let soon = Instant::now() + Duration::from_secs(1);
        assert_eq!(
            wait_until(&mut rx, soon, |v| *v == 1).await,
            Waited::TimedOut
        );
        assert_eq!(Instant::now(), soon);
        tx.send_replace(1);
        let later = Instant::now() + Duration::from_secs(1);
        assert_eq!(wait_until(&mut rx, later, |v| *v == 1).await, Waited::Ready);
        drop(tx);
        assert_eq!(wait_until(&mut rx, later, |v| *v == 2).await, Waited::Gone);
    }
}
