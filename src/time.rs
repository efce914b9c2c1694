//! Saturating time arithmetic for user-supplied durations.
//!
//! `Instant + Duration` panics on overflow, so a caller that means "forever"
//! (`Duration::MAX`) would crash the process. Every duration option is capped
//! at [`FOREVER`] when it is set, and every deadline is computed with
//! [`deadline_after`].

use std::time::Duration;

use tokio::time::Instant;

/// A century: longer than any process lives, short enough to add to an
/// `Instant` and to multiply by small factors without overflow.
pub(crate) const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `d`, capped at [`FOREVER`].
pub(crate) fn cap(d: Duration) -> Duration {
    d.min(FOREVER)
}

/// `now + d`, saturating at `now + FOREVER`.
pub(crate) fn deadline_after(now: Instant, d: Duration) -> Instant {
    now.checked_add(cap(d)).unwrap_or(now)
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
}
