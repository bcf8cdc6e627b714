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
//! Raising a thread's priority needs `CAP_SYS_NICE` or room under
//! `RLIMIT_NICE` (the packaged systemd unit sets `LimitNICE=-10`). A boost
//! beyond that ceiling is cut to it; with no room at all the threads keep
//! the process's priority and the daemon logs that once. It serves the
//! same either way, only with a longer tail under load.
//!
//! Invariants: only threads that call [`pipeline_thread`] change, and only
//! after [`set_pipeline_boost`] (the daemon, before it starts them); the
//! CLI's threads never change; no thread is ever put below the process's
//! own priority. A thread that a pipeline thread starts inherits the boost,
//! so the daemon starts its other threads elsewhere.

use std::sync::Once;
use std::sync::atomic::{AtomicI32, Ordering};

use rustix::process::{Resource, getpriority_process, getrlimit, setpriority_process};

/// Nice levels by which pipeline threads run ahead of the process; 0
/// (the default outside the daemon) leaves them alone.
static BOOST: AtomicI32 = AtomicI32::new(0);

/// What [`pipeline_thread`] did to the calling thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// No boost is set: the thread is unchanged.
    Unchanged,
    /// The thread now runs at this nice value (the whole boost, or as
    /// much of it as `RLIMIT_NICE` allows).
    Nice(i32),
    /// The priority could not be raised at all (no `CAP_SYS_NICE` and no
    /// room under `RLIMIT_NICE`, `setpriority` denied by a seccomp filter,
    /// or the thread's priority unreadable): the thread is unchanged.
    NotRaised,
}

/// Sets the boost that later [`pipeline_thread`] calls apply (the
/// daemon's `[daemon] pipeline_priority_boost`, 0..=20).
pub fn set_pipeline_boost(levels: u8) {
    BOOST.store(i32::from(levels.min(20)), Ordering::Relaxed);
}

/// The highest priority (lowest nice) `RLIMIT_NICE` lets this process
/// raise a thread to without `CAP_SYS_NICE`: `20 - rlim_cur`.
fn rlimit_ceiling() -> i32 {
    let cur = getrlimit(Resource::Nice).current.unwrap_or(40).min(40);
    20 - i32::try_from(cur).unwrap_or(40)
}

/// Called by a pipeline thread when it starts: raises its own priority by
/// the boost, or as far towards it as it is allowed (nice never below
/// -20).
pub fn pipeline_thread(name: &str) -> Applied {
    let boost = BOOST.load(Ordering::Relaxed);
    if boost == 0 {
        return Applied::Unchanged;
    }
    let me = Some(rustix::thread::gettid());
    let Ok(base) = getpriority_process(me) else {
        return not_raised(boost, "its priority cannot be read".into());
    };
    let want = (base - boost).max(-20);
    let applied = match setpriority_process(me, want) {
        Ok(()) => Ok(want),
        // Not all of it: as much as RLIMIT_NICE allows, if that is any.
        Err(e) => {
            let ceiling = rlimit_ceiling().max(want);
            if ceiling < base {
                setpriority_process(me, ceiling).map(|()| ceiling)
            } else {
                Err(e)
            }
        }
    };
    match applied {
        Ok(nice) => {
            if nice != want {
                static PARTLY: Once = Once::new();
                PARTLY.call_once(|| {
                    log::info!(
                        "the pipeline threads (api, fhir-writer, audit-writer) run at nice {nice}, \
                         not {want}: RLIMIT_NICE allows no more (LimitNICE={want} in the unit would)"
                    );
                });
            }
            log::debug!("{name}: running at nice {nice}");
            Applied::Nice(nice)
        }
        Err(e) => not_raised(
            boost,
            format!(
                "raising it to nice {want} was refused ({e}); LimitNICE={want} in the unit, and setpriority allowed, would let it"
            ),
        ),
    }
}

fn not_raised(boost: i32, why: String) -> Applied {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        log::info!(
            "the pipeline threads (api, fhir-writer, audit-writer) keep the daemon's priority \
             instead of running {boost} nice levels ahead: {why} (docs/operations.md)"
        );
    });
    Applied::NotRaised
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice_of_this_thread() -> i32 {
        getpriority_process(Some(rustix::thread::gettid())).unwrap()
    }

    /// Whether the kernel lets a new thread of this process go to `nice`
    /// (asked as it will be asked: a thread raising itself).
    fn may_raise_to(nice: i32) -> bool {
        std::thread::spawn(move || {
            setpriority_process(Some(rustix::thread::gettid()), nice).is_ok()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn a_pipeline_thread_runs_the_boost_ahead_of_the_process_or_as_far_as_allowed() {
        // The setting is process-wide: threads other tests start meanwhile
        // (writers of their own) may run boosted too, which changes nothing
        // they check.
        let base = nice_of_this_thread();
        let spawn = || {
            std::thread::spawn(|| (pipeline_thread("t"), nice_of_this_thread()))
                .join()
                .unwrap()
        };
        assert_eq!(spawn(), (Applied::Unchanged, base), "no boost set");
        set_pipeline_boost(3);
        let (applied, nice) = spawn();
        set_pipeline_boost(0);
        let want = (base - 3).max(-20);
        match applied {
            Applied::Nice(n) => {
                assert_eq!(nice, n, "the thread runs at what it reports");
                assert!(n < base && n >= want, "{n} not in {want}..{base}");
                if may_raise_to(want) {
                    assert_eq!(n, want, "allowed, so the whole boost");
                }
            }
            Applied::NotRaised => {
                assert_eq!(nice, base, "not raised: unchanged");
                assert!(!may_raise_to(base - 1), "allowed, yet not raised");
            }
            Applied::Unchanged => panic!("a boost was set"),
        }
        assert_eq!(
            nice_of_this_thread(),
            base,
            "only the calling thread changes"
        );
    }
}
