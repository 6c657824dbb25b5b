//! The one memory budget of the mount (`--max-memory`): every buffer of file data held in
//! memory (prefetched GET bodies, random-read blocks being fetched, local-copy fetches, part
//! buffers of files being written, part uploads streamed from the spool) reserves its size here
//! first, and gives it back when dropped. A reader or writer that finds the budget spent waits
//! for room instead of allocating past it.
//!
//! **Part buffers** ([`PartBuffer`]) carry their reservation inside: the memory is given back
//! when the last `Bytes` that shares the buffer is dropped (the upload, and the copy into the
//! spool, whichever ends last), never before. Idle part buffers (four, and more up to an
//! eighth of the budget) are kept for reuse with their reservations: mapping fresh memory costs
//! a page fault per 4 KiB (measured: 1.6 CPU-s per 2 GiB written). They are given back at once
//! whenever someone would otherwise wait or finds no room (as many as make room), and none is
//! kept while anyone waits, so a waiter never waits on an idle buffer. Idle buffers that nobody
//! takes or gives back for [`IDLE_FOR`] are freed (see [`MemoryBudget::start_trim`]): a mount
//! that has finished writing goes back to its idle size.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The budget is counted in units of this size.
const UNIT: u64 = 64 * 1024;
/// Idle part buffers hold at most this share of the budget (1/8), beyond [`IDLE_KEPT`] of
/// them, the oldest going first: room for what several readers or writers give back at once.
/// Four buffers at most made four concurrent readers of 1 GiB each map fresh memory for most of
/// their 2 MiB chunks: page faults and munmap took a fifth of the mount's CPU, 2.5 CPU-s per
/// GiB, against 1.5 with room for 12 chunks (the default 256M; measured, 4 `cat`s of 1 GiB from
/// a loopback server, 205-225 against 233-247 MiB/s).
const IDLE_SHARE: u32 = 8;
/// Idle part buffers kept whatever their size, so that small budgets reuse buffers too.
const IDLE_KEPT: usize = 4;
/// How long idle part buffers are kept while none is taken or given back (checked every fifth
/// of it, so they go within 6 s).
pub const IDLE_FOR: Duration = Duration::from_secs(5);
/// Alignment of part buffers (O_DIRECT).
pub const BUFFER_ALIGN: usize = 4096;

pub struct MemoryBudget {
    semaphore: Arc<Semaphore>,
    total_units: u32,
    idle: Mutex<Idle>,
    /// Reservations waiting for room: while there are any, nothing is kept idle.
    waiting: AtomicUsize,
}

/// Counts a waiting reservation while it lives (also when the wait is given up).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Part buffers kept for reuse, and when one was last taken or given back.
struct Idle {
    buffers: Vec<(Vec<u8>, Reservation)>,
    used: Instant,
}

impl Idle {
    fn touch(&mut self) -> &mut Vec<(Vec<u8>, Reservation)> {
        self.used = Instant::now();
        &mut self.buffers
    }
}

/// How many of the oldest `buffers` together hold `units` or more; `None` if all of them hold
/// less.
fn oldest_holding(buffers: &[(Vec<u8>, Reservation)], units: u32) -> Option<usize> {
    let mut held = 0;
    let mut count = 0;
    while held < units {
        held += buffers.get(count)?.1.units();
        count += 1;
    }
    Some(count)
}

/// Memory held until dropped.
pub struct Reservation {
    _permit: OwnedSemaphorePermit,
}

impl Reservation {
    fn units(&self) -> u32 {
        self._permit.num_permits() as u32
    }
}

impl MemoryBudget {
    pub fn new(bytes: u64) -> Self {
        let units = (bytes / UNIT).clamp(16, u32::MAX as u64) as u32;
        Self {
            semaphore: Arc::new(Semaphore::new(units as usize)),
            total_units: units,
            idle: Mutex::new(Idle {
                buffers: Vec::new(),
                used: Instant::now(),
            }),
            waiting: AtomicUsize::new(0),
        }
    }

    fn idle(&self) -> MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn units_for(&self, bytes: u64) -> u32 {
        // At most half the budget, so that two requests always fit; a larger buffer overdraws
        // by the difference.
        bytes
            .div_ceil(UNIT)
            .clamp(1, (self.total_units as u64 / 2).max(1)) as u32
    }

    /// Waits until `bytes` fit in the budget.
    pub async fn reserve(&self, bytes: u64) -> Reservation {
        let units = self.units_for(bytes);
        if let Some(memory) = self.reserve_now(units) {
            return memory;
        }
        // Before anyone waits, idle buffers give their memory back, and none is kept while it
        // waits: counted first, then released, both seen under the idle list's lock, so a
        // buffer given back meanwhile is either released here or not kept (`give_back`).
        let _waiting = Waiting::new(&self.waiting);
        self.release_idle();
        let permit = self
            .semaphore
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("the budget's semaphore is never closed");
        Reservation { _permit: permit }
    }

    /// `units` of the budget now, freeing the oldest idle buffers if that makes room: idle
    /// buffers of other sizes are worth less than room now.
    fn reserve_now(&self, units: u32) -> Option<Reservation> {
        let permit = self.semaphore.clone().try_acquire_many_owned(units);
        if let Ok(permit) = permit {
            return Some(Reservation { _permit: permit });
        }
        let freed = {
            let mut idle = self.idle();
            let short = units.saturating_sub(self.semaphore.available_permits() as u32);
            let take = oldest_holding(&idle.buffers, short)?;
            idle.buffers.drain(..take).collect::<Vec<_>>()
        };
        drop(freed);
        let permit = self.semaphore.clone().try_acquire_many_owned(units).ok()?;
        Some(Reservation { _permit: permit })
    }

    /// Frees the idle part buffers (their memory goes back to the budget).
    pub fn release_idle(&self) {
        self.release_idle_unused(Duration::ZERO, Instant::now());
    }

    /// Frees the idle part buffers if, at `now`, none has been taken or given back for
    /// `unused`.
    pub fn release_idle_unused(&self, unused: Duration, now: Instant) {
        let idle = {
            let mut idle = self.idle();
            if now.saturating_duration_since(idle.used) < unused {
                return;
            }
            std::mem::take(&mut idle.buffers)
        };
        drop(idle);
    }

    /// Frees idle part buffers left unused for [`IDLE_FOR`], from a task on `rt` that ends
    /// with the budget.
    pub fn start_trim(self: &Arc<Self>, rt: &tokio::runtime::Handle) {
        let budget = Arc::downgrade(self);
        rt.spawn(async move {
            let mut tick = tokio::time::interval(IDLE_FOR / 5);
            loop {
                tick.tick().await;
                match budget.upgrade() {
                    Some(b) => b.release_idle_unused(IDLE_FOR, Instant::now()),
                    None => return,
                }
            }
        });
    }

    /// An empty part buffer of at least `capacity` bytes, aligned, with its memory reserved:
    /// an idle one of a similar size if there is one.
    pub async fn part_buffer(self: &Arc<Self>, capacity: usize) -> PartBuffer {
        if let Some(buf) = self.part_buffer_now(capacity) {
            return buf;
        }
        let memory = self.reserve(capacity as u64).await;
        self.buffer_with(Vec::with_capacity(capacity + BUFFER_ALIGN), memory)
    }

    /// [`MemoryBudget::part_buffer`] without waiting: `None` when there is no room now.
    pub fn part_buffer_now(self: &Arc<Self>, capacity: usize) -> Option<PartBuffer> {
        let units = self.units_for(capacity as u64);
        let reused = {
            let mut idle = self.idle();
            let idle = idle.touch();
            // The smallest that fits, up to twice the size, holding at least its share.
            idle.iter()
                .enumerate()
                .filter(|(_, (b, r))| {
                    b.capacity() >= capacity + BUFFER_ALIGN
                        && b.capacity() <= 2 * capacity + BUFFER_ALIGN
                        && r.units() >= units
                })
                .min_by_key(|(_, (b, _))| b.capacity())
                .map(|(i, _)| i)
                .map(|i| idle.remove(i))
        };
        let (buf, memory) = match reused {
            Some(kept) => kept,
            None => (
                Vec::with_capacity(capacity + BUFFER_ALIGN),
                self.reserve_now(units)?,
            ),
        };
        Some(self.buffer_with(buf, memory))
    }

    fn buffer_with(self: &Arc<Self>, mut buf: Vec<u8>, memory: Reservation) -> PartBuffer {
        buf.clear();
        let pad = buf.as_ptr().align_offset(BUFFER_ALIGN);
        buf.resize(pad, 0);
        PartBuffer {
            buf,
            pad,
            memory: Some(memory),
            budget: self.clone(),
        }
    }

    /// A buffer that is done with: kept idle unless someone waits for room (then freed, and the
    /// waiter maps a new one); the oldest idle buffers go while they hold more than their share
    /// and there are more than [`IDLE_KEPT`].
    fn give_back(&self, buf: Vec<u8>, memory: Reservation) {
        // Whatever is freed is freed outside the lock.
        let freed = {
            let mut idle = self.idle();
            let idle = idle.touch();
            if self.waiting.load(Ordering::SeqCst) > 0 {
                vec![(buf, memory)]
            } else {
                idle.push((buf, memory));
                let held: u32 = idle.iter().map(|(_, r)| r.units()).sum();
                let over = oldest_holding(idle, held.saturating_sub(self.total_units / IDLE_SHARE))
                    .unwrap_or(idle.len())
                    .min(idle.len().saturating_sub(IDLE_KEPT));
                idle.drain(..over).collect::<Vec<_>>()
            }
        };
        drop(freed);
    }

    pub fn in_use_bytes(&self) -> u64 {
        (self.total_units as u64 - self.semaphore.available_permits() as u64) * UNIT
    }

    pub fn available_bytes(&self) -> u64 {
        self.semaphore.available_permits() as u64 * UNIT
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_units as u64 * UNIT
    }
}

/// A part's data, aligned for O_DIRECT, holding its share of the budget until the last `Bytes`
/// of it is dropped.
pub struct PartBuffer {
    buf: Vec<u8>,
    pad: usize,
    memory: Option<Reservation>,
    budget: Arc<MemoryBudget>,
}

impl PartBuffer {
    pub fn len(&self) -> u64 {
        (self.buf.len() - self.pad) as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Appends `len` bytes of `file` from `offset` (a read of the read cache: a reused buffer
    /// costs no page faults).
    pub fn read_from(
        &mut self,
        file: &std::fs::File,
        offset: u64,
        len: usize,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let start = self.buf.len();
        self.buf.resize(start + len, 0);
        let read = file.read_exact_at(&mut self.buf[start..], offset);
        if read.is_err() {
            self.buf.truncate(start);
        }
        read
    }

    /// The data as shared bytes; the memory comes back when the last of them is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PartBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.pad..]
    }
}

impl Drop for PartBuffer {
    fn drop(&mut self) {
        if let Some(memory) = self.memory.take() {
            self.budget.give_back(std::mem::take(&mut self.buf), memory);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn part_buffers_hold_their_memory_until_the_last_bytes_go() {
        let budget = Arc::new(MemoryBudget::new(64 << 20));
        let mut b = budget.part_buffer(8 << 20).await;
        assert_eq!(b.as_ref().as_ptr().align_offset(BUFFER_ALIGN), 0);
        b.push(b"data");
        let bytes = b.freeze();
        let clone = bytes.clone();
        assert_eq!(budget.in_use_bytes(), 8 << 20);
        drop(bytes);
        assert_eq!(budget.in_use_bytes(), 8 << 20, "a clone still holds it");
        drop(clone);
        // Kept idle for reuse, still counted.
        assert_eq!(budget.in_use_bytes(), 8 << 20);
        let again = budget.part_buffer(8 << 20).await;
        assert_eq!(budget.in_use_bytes(), 8 << 20, "the idle buffer was reused");
        drop(again);
    }

    #[tokio::test]
    async fn idle_buffers_never_make_anyone_wait() {
        let budget = Arc::new(MemoryBudget::new(32 << 20));
        let a = budget.part_buffer(4 << 20).await;
        let b = budget.part_buffer(4 << 20).await;
        drop(a); // kept idle: nobody waits
        assert_eq!(budget.in_use_bytes(), 8 << 20);
        let big = budget.reserve(16 << 20).await;
        assert_eq!(budget.in_use_bytes(), 24 << 20);
        // Someone wants more than is free without the idle buffer: it is given back.
        let rest = tokio::time::timeout(Duration::from_secs(1), budget.reserve(12 << 20))
            .await
            .expect("not stuck behind an idle buffer");
        assert_eq!(budget.in_use_bytes(), 32 << 20);
        // The budget is spent; `b` given back while someone waits goes to the waiter.
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve(4 << 20).await })
        };
        while budget.waiting.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        drop(b);
        let got = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("the buffer given back went to the waiter, not to the idle list")
            .unwrap();
        assert_eq!(budget.in_use_bytes(), 32 << 20);
        drop((big, rest, got));
        assert_eq!(budget.waiting.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn idle_buffers_go_once_unused_for_a_while() {
        let hour = Duration::from_secs(3600);
        let budget = Arc::new(MemoryBudget::new(128 << 20));
        drop(budget.part_buffer(8 << 20).await);
        assert_eq!(budget.in_use_bytes(), 8 << 20, "kept idle");
        budget.release_idle_unused(hour, Instant::now());
        assert_eq!(budget.in_use_bytes(), 8 << 20, "used just now: kept");
        std::thread::sleep(Duration::from_millis(2));
        let mid = Instant::now();
        // Asking for a buffer of another size touches the idle list too: an hour after `mid`
        // (less a millisecond) it has not been unused for an hour, though the first one was.
        drop(budget.part_buffer(1 << 20).await);
        budget.release_idle_unused(hour, mid + hour - Duration::from_millis(1));
        assert_eq!(budget.in_use_bytes(), 9 << 20);
        budget.release_idle_unused(hour, Instant::now() + hour);
        assert_eq!(budget.in_use_bytes(), 0, "unused for an hour: freed");
    }

    #[tokio::test]
    async fn idle_buffers_of_another_size_make_room_for_one_taken_now() {
        let budget = Arc::new(MemoryBudget::new(128 << 20));
        // Eight chunks given back at once are all kept (16 MiB, an eighth), for the next eight.
        let chunks: Vec<_> = (0..8).map(|_| budget.part_buffer_now(2 << 20)).collect();
        drop(chunks);
        assert_eq!(budget.in_use_bytes(), 16 << 20);
        let again: Vec<_> = (0..8).map(|_| budget.part_buffer_now(2 << 20)).collect();
        assert!(again.iter().all(Option::is_some));
        assert_eq!(budget.in_use_bytes(), 16 << 20, "all eight were reused");
        // A smaller request takes a larger idle buffer, with its reservation.
        drop(again);
        let half = budget.part_buffer_now(1 << 20).expect("room");
        assert_eq!(budget.in_use_bytes(), 16 << 20, "a 2 MiB buffer was reused");
        drop(half);
        // With the rest of the budget held, a buffer of another size is still there at once.
        let rest = (
            budget.reserve(56 << 20).await,
            budget.reserve(56 << 20).await,
        );
        let other = budget
            .part_buffer_now(8 << 20)
            .expect("the idle ones make room");
        assert_eq!(
            budget.in_use_bytes(),
            128 << 20,
            "only the four oldest idle buffers went, as many as make room"
        );
        assert_eq!(budget.idle().buffers.len(), 4);
        // No room even with every idle buffer gone: nothing is freed for nothing.
        assert!(budget.part_buffer_now(16 << 20).is_none());
        assert_eq!(budget.idle().buffers.len(), 4);
        drop((other, rest));
    }

    #[tokio::test]
    async fn small_budgets_keep_a_few_buffers_larger_than_their_share() {
        let budget = Arc::new(MemoryBudget::new(64 << 20));
        let parts: Vec<_> = (0..5).map(|_| budget.part_buffer_now(8 << 20)).collect();
        assert!(parts.iter().all(Option::is_some));
        drop(parts);
        assert_eq!(
            budget.in_use_bytes(),
            32 << 20,
            "four kept, though over an eighth"
        );
    }

    #[tokio::test]
    async fn requests_are_capped_at_half_the_budget() {
        let budget = MemoryBudget::new(16 << 20);
        let huge = budget.reserve(1 << 30).await;
        assert_eq!(budget.in_use_bytes(), 8 << 20);
        let other = budget.reserve(8 << 20).await;
        drop((huge, other));
        assert_eq!(budget.in_use_bytes(), 0);
    }
}
