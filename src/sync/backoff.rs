//! Exponential backoff with full jitter: the n-th delay is uniform in
//! `0..=min(max, base × 2ⁿ)`, so many boxes that lost the same upstream do
//! not come back in step.

use std::time::Duration;

/// Delays between tries.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    tries: u32,
}

impl Backoff {
    /// Starts at `base`, never above `max`.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            tries: 0,
        }
    }

    /// The cap for the current try (before jitter).
    pub fn ceiling(&self) -> Duration {
        self.base
            .saturating_mul(1u32.checked_shl(self.tries.min(30)).unwrap_or(u32::MAX))
            .min(self.max)
    }

    /// The next delay, jittered.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.ceiling();
        self.tries = self.tries.saturating_add(1);
        let ms = cap.as_millis().min(u128::from(u64::MAX)) as u64;
        Duration::from_millis(fastrand::u64(0..=ms))
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.tries = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_max_and_stay_within_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let caps: Vec<u64> = (0..6)
            .map(|_| {
                let cap = b.ceiling().as_millis() as u64;
                assert!(b.next_delay().as_millis() as u64 <= cap);
                cap
            })
            .collect();
        assert_eq!(caps, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }
}
