//! Gathering a group commit: the requests queued for a writer thread (the
//! audit log's, the FHIR cache's) that one transaction and one fsync will
//! serve.
//!
//! A writer takes the first request, then whatever else arrives within
//! `wait` (`Limits::group_commit_wait_us`) up to `max`. Under load the
//! queue fills while the previous commit's fsync runs, and the wait costs
//! nothing; at a steady moderate rate (devices each sending every 100 ms)
//! requests arrive one by one, and without a short wait every one would
//! pay for its own fsync and rewrite the same tail pages.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// `first` and the requests that arrive within `wait` of it (all those
/// already queued, at least), at most `max` in all.
pub fn gather<T>(rx: &Receiver<T>, first: T, wait: Duration, max: usize) -> Vec<T> {
    let mut group = vec![first];
    let deadline = Instant::now() + wait;
    while group.len() < max {
        let next = match rx.try_recv() {
            Ok(r) => Ok(r),
            Err(_) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                rx.recv_timeout(left)
            }
        };
        match next {
            Ok(r) => group.push(r),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    group
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
        assert_eq!(gather(&rx, 6, Duration::from_secs(5), 2), vec![6, 7]);
        late.join().unwrap();
        assert_eq!(
            gather(&rx, 8, Duration::from_secs(5), 10),
            vec![8],
            "sender gone"
        );
    }
}
