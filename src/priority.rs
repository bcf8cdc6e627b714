//! Scheduling priority of the daemon's pipeline threads.
//!
//! Every device request passes, one at a time, through three threads that
//! serve all requests in turn: the HTTP thread ("api"), the FHIR cache's
//! writer ("fhir-writer") and the audit log's writer ("audit-writer"). On
//! a busy two-core box, while one of them waits on the run queue behind an
//! API worker (of which there are dozens), every request queued at it
//! waits too, and each wait shows in every device's latency. So the daemon
//! runs these three `[daemon] pipeline_priority_boost` nice levels ahead
//! of its other threads (default 10), measured in BENCHMARKS.md.
//!
//! Raising a thread's priority needs `RLIMIT_NICE` (the packaged systemd
//! unit sets `LimitNICE=-10`) or `CAP_SYS_NICE`. Without either, the
//! threads keep the process's priority and the daemon logs that once; it
//! serves the same, only with a longer tail under load.
//!
//! Invariants: only threads that call [`pipeline_thread`] change, and only
//! after [`set_pipeline_boost`] (the daemon, before it starts them); the
//! CLI's threads never change; priority is never lowered below the
//! process's own.

use std::sync::Once;
use std::sync::atomic::{AtomicI32, Ordering};

/// Nice levels by which pipeline threads run ahead of the process; 0
/// (the default outside the daemon) leaves them alone.
static BOOST: AtomicI32 = AtomicI32::new(0);

/// What [`pipeline_thread`] did to the calling thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// No boost is set: the thread is unchanged.
    Unchanged,
    /// The thread now runs at this nice value.
    Nice(i32),
    /// The system refused (no `RLIMIT_NICE` or `CAP_SYS_NICE` for it):
    /// the thread is unchanged.
    NotPermitted,
}

/// Sets the boost that later [`pipeline_thread`] calls apply (the
/// daemon's `[daemon] pipeline_priority_boost`, 0..=20).
pub fn set_pipeline_boost(levels: u8) {
    BOOST.store(i32::from(levels.min(20)), Ordering::Relaxed);
}

/// Called by a pipeline thread when it starts: raises its own priority by
/// the boost (nice never below -20).
pub fn pipeline_thread(name: &str) -> Applied {
    let boost = BOOST.load(Ordering::Relaxed);
    if boost == 0 {
        return Applied::Unchanged;
    }
    let me = Some(rustix::thread::gettid());
    let result = rustix::process::getpriority_process(me).and_then(|base| {
        let nice = (base - boost).max(-20);
        rustix::process::setpriority_process(me, nice).map(|()| nice)
    });
    match result {
        Ok(nice) => {
            log::debug!("{name}: running at nice {nice}");
            Applied::Nice(nice)
        }
        Err(e) => {
            static ONCE: Once = Once::new();
            ONCE.call_once(|| {
                log::info!(
                    "the pipeline threads (api, fhir-writer, audit-writer) keep the daemon's priority: \
                     raising it by {boost} was refused ({e}); grant LimitNICE=-{boost} in the unit \
                     for shorter device latency under load (docs/operations.md)"
                );
            });
            Applied::NotPermitted
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CAP_SYS_NICE (bit 23) in this process's effective capabilities.
    fn has_cap_sys_nice() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            })
            .is_some_and(|caps| caps & (1 << 23) != 0)
    }

    fn nice_of_this_thread() -> i32 {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
    }

    #[test]
    fn a_pipeline_thread_runs_the_boost_ahead_of_the_process_or_is_left_alone() {
        // One test for the process-wide setting, so no other test sees it.
        let base = nice_of_this_thread();
        assert_eq!(
            std::thread::spawn(|| (pipeline_thread("t"), nice_of_this_thread()))
                .join()
                .unwrap(),
            (Applied::Unchanged, base),
            "no boost set: unchanged"
        );
        set_pipeline_boost(3);
        let (applied, nice) = std::thread::spawn(|| (pipeline_thread("t"), nice_of_this_thread()))
            .join()
            .unwrap();
        set_pipeline_boost(0);
        match applied {
            Applied::Nice(n) => {
                assert_eq!(n, (base - 3).max(-20));
                assert_eq!(nice, n, "the thread runs at what it reports");
            }
            Applied::NotPermitted => assert_eq!(nice, base, "refused: unchanged"),
            Applied::Unchanged => panic!("a boost was set"),
        }
        // With CAP_SYS_NICE (root in CI), raising is permitted and must
        // happen.
        if has_cap_sys_nice() {
            assert!(matches!(applied, Applied::Nice(_)), "{applied:?}");
        }
        assert_eq!(
            nice_of_this_thread(),
            base,
            "only the calling thread changes"
        );
    }
}
