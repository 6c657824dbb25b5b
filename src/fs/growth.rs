//! Sizing by measurement rather than for the fastest link: how much a sequential reader reads
//! ahead (`read.rs`'s window) and how many part uploads a writer runs at once (`write.rs`'s
//! slots) both follow [`Growth`].
//!
//! Progress is measured over epochs (their length is the caller's: a few rounds of the current
//! size, and long enough to measure). The size grows by half after an epoch in which the
//! application had to wait, and the next epoch decides: if the rate rose by a fifth or more,
//! the larger size stays (and may grow again), else the size goes back and stays there (the
//! link, the server or the application is the limit, and more memory would buy nothing). An
//! application that never waits never grows it.

use std::time::Instant;

/// A grown size must move this much faster to stay.
const GAIN: f64 = 1.2;

#[derive(Debug)]
pub(super) struct Growth {
    /// The size now.
    pub size: u64,
    largest: u64,
    /// The size before the last growth, while the epoch that judges it runs.
    before: Option<u64>,
    pub settled: bool,
    pub epoch: Span,
    /// Bytes per second at the current size.
    rate: f64,
}

/// A stretch of bytes moved, measured: when it began, how many so far, and whether the
/// application waited for any of them.
#[derive(Debug)]
pub(super) struct Span {
    pub start: Instant,
    bytes: u64,
    waited: bool,
}

impl Span {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            bytes: 0,
            waited: false,
        }
    }

    /// `n` bytes moved by `now`, the application having waited for some of them if `waited`.
    /// Once the span holds `len` bytes it ends, and the next begins: its rate in bytes per
    /// second, and whether the application waited during it.
    pub fn moved(&mut self, n: u64, waited: bool, len: u64, now: Instant) -> Option<(f64, bool)> {
        self.bytes += n;
        self.waited |= waited;
        if self.bytes < len {
            return None;
        }
        let took = now.saturating_duration_since(self.start);
        let rate = self.bytes as f64 / took.as_secs_f64().max(1e-6);
        let waited = self.waited;
        *self = Self::new(now);
        Some((rate, waited))
    }
}

/// What an epoch's end did to the size.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Change {
    Kept,
    /// Grown from the size given.
    Grown(u64),
    /// Taken back from the size given, for good.
    Settled(u64),
}

impl Growth {
    pub fn new(size: u64, largest: u64) -> Self {
        Self {
            size: size.min(largest),
            largest,
            before: None,
            settled: false,
            epoch: Span::new(Instant::now()),
            rate: 0.0,
        }
    }

    /// A size that stays as it is.
    pub fn fixed(size: u64) -> Self {
        Self {
            settled: true,
            ..Self::new(size, size)
        }
    }

    /// Raises the size to `floor` (at most the largest), a need measured apart from the trials,
    /// at `now`. False if the size was enough. A trial in progress is called off, and the
    /// epoch starts again: an epoch that saw the size change measures neither size.
    pub fn raise_to(&mut self, floor: u64, now: Instant) -> bool {
        let floor = floor.min(self.largest);
        if floor <= self.size {
            return false;
        }
        self.size = floor;
        self.before = None;
        self.rate = 0.0;
        self.epoch = Span::new(now);
        true
    }

    /// `n` bytes moved, the application having waited for some of them if `waited`; an epoch
    /// is `epoch` bytes long.
    pub fn moved_at(&mut self, n: u64, waited: bool, epoch: u64, now: Instant) -> Change {
        let Some((rate, waited)) = self.epoch.moved(n, waited, epoch, now) else {
            return Change::Kept;
        };
        if let Some(before) = self.before.take() {
            // This epoch ran at a grown size: it stays only if it paid.
            if rate < self.rate * GAIN {
                let grown = std::mem::replace(&mut self.size, before);
                self.settled = true;
                return Change::Settled(grown);
            }
        }
        self.rate = rate;
        if waited && !self.settled && self.size < self.largest {
            // By half: a trial that does not pay costs little memory.
            self.before = Some(self.size);
            self.size = (self.size + self.size.div_ceil(2)).min(self.largest);
            return Change::Grown(self.before.unwrap_or_default());
        }
        Change::Kept
    }
}
