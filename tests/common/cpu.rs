//! Process CPU time, for the idle guards (`tests/idle.rs`) and the `cpu`
//! benchmark.
#![allow(dead_code)]

use std::time::Duration;

/// CPU time (user + system) this process has used so far, from
/// `getrusage(RUSAGE_SELF)`: every thread, microsecond resolution.
pub fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1_000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}
