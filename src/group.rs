//! Gathering a group commit: the requests queued for a writer thread (the
//! audit log's, the FHIR cache's) that one transaction and one fsync will
//! serve.
//!
//! A writer takes the first request and whatever is queued behind it,
//! then sleeps `wait` (`Limits::group_commit_wait_us`) once and takes what
//! arrived meanwhile, up to `max` in all. Under load the queue fills while
//! the previous commit's fsync runs; at a steady moderate rate (devices
//! each sending every 100 ms) requests arrive one by one, and without a
//! short wait every one would pay for its own fsync and rewrite the same
//! tail pages. One sleep, rather than a wake-up per arriving request,
//! keeps the writer off the scheduler while its group fills.

use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Duration;

/// `first`, the requests already queued, and those that arrive within
/// `wait`, at most `max` in all. Returns at once when every sender is gone.
pub fn gather<T>(rx: &Receiver<T>, first: T, wait: Duration, max: usize) -> Vec<T> {
    let mut group = vec![first];
    if drain(rx, &mut group, max) && !wait.is_zero() {
        std::thread::sleep(wait);
        drain(rx, &mut group, max);
    }
    group
}

/// Moves what is queued into `group` (up to `max`); false when no more
/// can come (full, or every sender gone).
fn drain<T>(rx: &Receiver<T>, group: &mut Vec<T>, max: usize) -> bool {
    while group.len() < max {
        match rx.try_recv() {
            Ok(r) => group.push(r),
            Err(TryRecvError::Empty) => return true,
            Err(TryRecvError::Disconnected) => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_what_is_queued_and_what_arrives_in_time_up_to_max() {
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 1..=3 {
            tx.send(i).unwrap();
        }
        assert_eq!(gather(&rx, 0, Duration::ZERO, 10), vec![0, 1, 2, 3]);
        for i in 1..=5 {
            tx.send(i).unwrap();
        }
        assert_eq!(gather(&rx, 0, Duration::ZERO, 3), vec![0, 1, 2]);
        assert_eq!(gather(&rx, 9, Duration::ZERO, 10), vec![9, 3, 4, 5]);
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            tx.send(7).unwrap();
        });
        assert_eq!(gather(&rx, 6, Duration::from_millis(300), 2), vec![6, 7]);
        late.join().unwrap();
        assert_eq!(
            gather(&rx, 8, Duration::from_secs(5), 10),
            vec![8],
            "sender gone"
        );
    }
}
