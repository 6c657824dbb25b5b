//! Which failures are retried, and how long to wait between attempts.
//!
//! The schedule is "decorrelated jitter": each delay is drawn uniformly between the base delay
//! and three times the previous delay, capped. Compared to plain exponential backoff with full
//! jitter it spreads retries of many concurrent part uploads well, while still growing fast when
//! a server keeps answering SlowDown. Attempts stop at `max_attempts` or when the next delay
//! would end past `max_elapsed`, whichever comes first, so a dead endpoint turns into an error
//! (and EIO at the filesystem) in bounded time rather than a hang.
//!
//! What counts as transient is decided by [`super::error::ClientError::is_transient`].

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

tokio::task_local! {
    /// Where the retries of the requests a task makes are also counted, when someone asked
    /// (the activity registry counts them per upload and per read).
    static RETRY_COUNTER: Arc<AtomicU64>;
}

/// Runs `f`, counting every retry of the requests it makes into `counter` as well.
pub async fn counting_retries<F: Future>(counter: Arc<AtomicU64>, f: F) -> F::Output {
    RETRY_COUNTER.scope(counter, f).await
}

/// Counts one retry into the counter of the task's scope, if there is one.
pub(crate) fn note_retry() {
    let _ = RETRY_COUNTER.try_with(|c| c.fetch_add(1, Ordering::Relaxed));
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// No retry starts after this much time since the first attempt.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(8),
            // With the client's default timeouts (10 s for an answer, 5 s of a stalled body)
            // a dead server fails a request after two or three attempts, well under a minute.
            max_elapsed: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    pub fn backoff(&self) -> Backoff {
        Backoff {
            policy: self.clone(),
            previous: self.base_delay,
            attempts: 1,
            waited: Duration::ZERO,
        }
    }
}

/// The retry state of one request.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: RetryPolicy,
    previous: Duration,
    attempts: u32,
    waited: Duration,
}

impl Backoff {
    /// How long to sleep before the next attempt, or `None` when the budget is spent.
    /// `elapsed` is the time since the first attempt started.
    pub fn next_delay(&mut self, elapsed: Duration) -> Option<Duration> {
        if self.attempts >= self.policy.max_attempts {
            return None;
        }
        let base = self.policy.base_delay.as_millis() as u64;
        let upper = (self.previous.as_millis() as u64)
            .saturating_mul(3)
            .max(base + 1);
        let delay = Duration::from_millis(fastrand::u64(base..=upper)).min(self.policy.max_delay);
        if elapsed + delay > self.policy.max_elapsed {
            return None;
        }
        self.previous = delay.max(self.policy.base_delay);
        self.attempts += 1;
        self.waited += delay;
        Some(delay)
    }

    /// Attempts made so far (the first included).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_bounded_and_attempts_capped() {
        let policy = RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(200),
            max_elapsed: Duration::from_secs(100),
        };
        let mut b = policy.backoff();
        let mut n = 0;
        while let Some(d) = b.next_delay(Duration::ZERO) {
            assert!(
                d >= Duration::from_millis(10) && d <= Duration::from_millis(200),
                "{d:?}"
            );
            n += 1;
        }
        assert_eq!(n, 5, "six attempts mean five waits");
        assert_eq!(b.attempts(), 6);
    }

    #[test]
    fn elapsed_budget_stops_retries() {
        let policy = RetryPolicy {
            max_attempts: 100,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(20),
            max_elapsed: Duration::from_secs(1),
        };
        let mut b = policy.backoff();
        assert!(b.next_delay(Duration::from_millis(100)).is_some());
        assert!(b.next_delay(Duration::from_millis(995)).is_none());
        assert!(RetryPolicy::none()
            .backoff()
            .next_delay(Duration::ZERO)
            .is_none());
    }

    #[test]
    fn delays_grow_towards_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 50,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_secs(1),
            max_elapsed: Duration::from_secs(1000),
        };
        // The jitter is random: a fixed seed (fastrand's generator is per thread, and so per
        // test) makes the run repeatable; an unlucky draw must not fail the build.
        fastrand::seed(7);
        let mut b = policy.backoff();
        let delays: Vec<_> = std::iter::from_fn(|| b.next_delay(Duration::ZERO)).collect();
        assert!(delays.iter().all(|d| *d <= policy.max_delay), "capped");
        let late_max = delays[30..].iter().max().unwrap();
        assert!(*late_max > Duration::from_millis(300), "{delays:?}");
    }
}
