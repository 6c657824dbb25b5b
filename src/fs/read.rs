//! Reading objects: the memory budget, the sequential prefetcher and the random-read block
//! cache.
//!
//! **Prefetch.** A read handle keeps a queue of ranged GETs running ahead of the reader, each a
//! tokio task. The window starts small (one request of `first_request` bytes) so a program
//! that reads only a header does not pull megabytes, and each request is twice the size of the
//! one before, up to an eighth of the window, with the window's worth of them in flight: on a
//! fast link several requests stream at once, which is what makes one reader go at the
//! network's speed rather than one request's. The window (bytes in flight ahead of the reader)
//! is sized by measurement, see [`Window`]. A read at the expected offset keeps the window; a read
//! anywhere inside the window (the kernel sends readahead slightly out of order) is served from
//! it; a small backward seek is served from the last chunk consumed, which is kept for that;
//! anything else is a seek, which drops the window and starts again small.
//!
//! **Random reads** (not at the expected offset) of an object up to `local_copy_max` switch the
//! handle to a local copy on disk that fills in the background (see [`super::local_copy`]);
//! in larger objects they fetch only the aligned blocks that cover them, in one GET, and keep
//! them in an LRU cache shared by all handles.
//!
//! **Memory.** Every prefetch request reserves its size from one [`MemoryBudget`] before it is
//! sent and gives it back when its data has been consumed and dropped, so all readers together
//! never hold more than `--max-memory` of prefetched data; a reader that finds the budget spent
//! waits for room instead of growing memory.
//!
//! **Consistency.** Every GET carries `If-Match` with the ETag the handle opened; if the object
//! is replaced, S3 answers 412 and the read fails with ESTALE instead of mixing two versions.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::task::JoinHandle;

use super::error::{FsError, FsResult};
use super::get::{fetch, fetch_into, FirstByteDelay};
pub use super::get::{BlockCache, ReadConfig, ReadContext};
use super::growth::{Change, Growth, Span};
use super::local_copy::LocalCopy;
use super::local_io;
use super::memory::PartBuffer;

/// Prefetch requests end on multiples of this where they can (see `top_up`).
const CHUNK_ALIGN: u64 = 1 << 20;
pub use super::memory::MemoryBudget;
use crate::s3::ObjectClient;

type Fetch = JoinHandle<FsResult<Bytes>>;

enum ChunkData {
    Pending(Fetch),
    /// The data, which holds its memory until the chunk is dropped.
    Ready(Bytes),
    /// Its fetch failed (and its task is gone): the next read that needs it fetches again.
    Failed,
}

struct Chunk {
    range: Range<u64>,
    data: ChunkData,
    /// Whether its memory is reserved (it may have been started waiting for it).
    has_memory: Arc<std::sync::atomic::AtomicBool>,
}

impl Chunk {
    fn waits_for_memory(&self) -> bool {
        matches!(self.data, ChunkData::Pending(_))
            && !self.has_memory.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Chunk {
    /// Waits for the chunk's data. A failed fetch leaves the chunk `Failed`: its task is
    /// awaited once, never again.
    async fn ready(&mut self) -> FsResult<&Bytes> {
        if matches!(self.data, ChunkData::Pending(_)) {
            let ChunkData::Pending(task) = std::mem::replace(&mut self.data, ChunkData::Failed)
            else {
                unreachable!("matched above");
            };
            let data = task.await.map_err(|e| {
                FsError::internal(&format!("a prefetch task ended without an answer: {e}"))
            })??;
            self.data = ChunkData::Ready(data);
        }
        match &self.data {
            ChunkData::Ready(data) => Ok(data),
            ChunkData::Pending(_) | ChunkData::Failed => Err(FsError::internal(
                "a prefetch chunk read before it was fetched",
            )),
        }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        if let ChunkData::Pending(task) = &self.data {
            task.abort();
        }
    }
}

/// How much a sequential reader reads ahead, sized to the link by measurement rather than set
/// for the fastest one: bytes in flight that cover the link's bandwidth and delay, and no more.
/// Two measures raise it, up to `requests_ahead` of `max_request`:
/// - the bandwidth-delay product: after each window's worth of reading in which the reader
///   waited, the window is at least [`DELAYS_AHEAD`] times the rate of that round times the
///   least time to first byte of the mount's GETs ([`FirstByteDelay`]). On a link where the
///   delay is what limits, each round raises the rate and so the next floor, until the link's
///   bandwidth is covered;
/// - trials ([`Growth`], over epochs of four windows and 128 MiB at least): a step up by half
///   after an epoch in which the reader waited, kept only if it pays. The first epoch, requests
///   still growing from `first_request`, is only the first measure to compare with.
///
/// It starts at 8 MiB (4 requests of 2 MiB): on a loopback server that reads as fast as 16 MiB
/// (measured, a 2 GiB cat in alternate runs: 244-266 against 238-244 MiB/s, at 38-40 against
/// 47-49 MiB of peak RSS; 16 MiB had matched 32 MiB before), and a link with a long delay is
/// raised from it within a few windows rather than epochs (through a proxy adding 20 ms: 206
/// against 191-197 MiB/s for 16 MiB, the window raised to 27-31 MiB).
struct Window {
    growth: Growth,
    /// The round in progress: one window's worth of reading, after which the delay floor is
    /// applied.
    round: Span,
}

/// How many times the bandwidth-delay product a reader that waited keeps in flight. A request
/// spends the delay before its first byte and then shares the link with the others in flight,
/// so a window of k products delivers about k/(k+1) of the link: 4 gives 80%, and the trials
/// take it further where that pays. Measured on a 2 GiB cat through a proxy adding 20 ms to
/// every reply (the proxy's own limit about 200 MiB/s): 2 products, 143-146 MiB/s at a window of
/// 9-13 MiB; 4 products, 183-200 MiB/s at 23-38 MiB; a fixed 16 MiB, 174-199.
const DELAYS_AHEAD: f64 = 4.0;

/// The least size of a sequential reader's requests once they have grown from `first_request`.
/// Each GET in flight also holds its connection's buffers (up to about 400 KiB, counted apart:
/// see [`super::get::read_connections`]), so smaller requests for the same memory mean more of
/// them: before that count, 16 readers and 16 writers at `--max-memory 64M` peaked at 114-116
/// MiB with 1 MiB requests against 101 with 2 MiB (debug builds, whose program text alone is
/// 18 MiB; the earlier 16 MiB windows of 2 MiB requests, 101-108). An 8 MiB window of 4
/// requests of 2 MiB reads a 2 GiB file from a loopback server as fast as one of 8 of 1 MiB
/// (214-234 against 221-248 MiB/s in alternate runs).
const STEADY_REQUEST: u64 = 2 << 20;

/// Epochs are at least this long, so that one is long enough to measure (a quarter of a
/// second at 500 MiB/s), and at least four windows.
const EPOCH_MIN: u64 = 128 << 20;

impl Window {
    fn new(cfg: &ReadConfig) -> Self {
        let largest = cfg.max_request * cfg.requests_ahead as u64;
        let growth = Growth::new(cfg.window_start, largest);
        Self {
            round: Span::new(growth.epoch.start),
            growth,
        }
    }

    /// The size of requests at this window: an eighth of it, so that several stream at once
    /// (measured: 8 requests of 4 MiB go as fast as 8 of 8 MiB here, 4 of 8 MiB 7% slower), and
    /// [`STEADY_REQUEST`] at least.
    fn request_size(&self, cfg: &ReadConfig) -> u64 {
        (self.growth.size / 8)
            .max(STEADY_REQUEST)
            .clamp(cfg.first_request, cfg.max_request)
    }

    fn requests(&self, cfg: &ReadConfig) -> usize {
        ((self.growth.size / self.request_size(cfg)) as usize).clamp(2, cfg.requests_ahead.max(2))
    }

    /// `n` bytes were served to the reader, who had to wait for some of them if `waited`;
    /// `delay` tells how long GETs take at least to start answering, if known (asked only at
    /// the end of a round).
    fn served(&mut self, n: u64, waited: bool, delay: &FirstByteDelay) {
        self.served_at(n, waited, || delay.least(), std::time::Instant::now());
    }

    fn served_at(
        &mut self,
        n: u64,
        waited: bool,
        delay: impl FnOnce() -> Option<std::time::Duration>,
        now: std::time::Instant,
    ) {
        let epoch = (4 * self.growth.size).max(EPOCH_MIN);
        let change = self.growth.moved_at(n, waited, epoch, now);
        let window = self.growth.size;
        match change {
            Change::Kept => {}
            Change::Grown(_) => tracing::debug!(window, "read-ahead window grown"),
            Change::Settled(_) => tracing::debug!(window, "read-ahead window settled"),
        }
        let Some((rate, true)) = self.round.moved(n, waited, window, now) else {
            return;
        };
        if let Some(delay) = delay() {
            let floor = (DELAYS_AHEAD * rate * delay.as_secs_f64()) as u64;
            if self.growth.raise_to(floor.next_multiple_of(1 << 20), now) {
                let window = self.growth.size;
                tracing::debug!(
                    window,
                    ?delay,
                    "read-ahead window raised to the link's delay"
                );
            }
        }
    }
}

/// The state of one open file's reads.
struct Prefetcher {
    /// Contiguous ranges in offset order: up to one request's worth already passed (kept for
    /// small backward seeks and for kernel reads that arrive out of order), then the ones ahead.
    chunks: VecDeque<Chunk>,
    next_request: u64,
    /// Where a sequential reader reads next.
    expected: u64,
    window: Window,
}

/// An open file, pinned to the ETag it was opened with.
pub struct ReadHandle<C> {
    pub key: String,
    pub etag: String,
    pub size: u64,
    ctx: ReadContext<C>,
    state: tokio::sync::Mutex<Prefetcher>,
    /// Set once reads turn random: from then on every read is served from it.
    local: Mutex<Option<Arc<LocalCopy<C>>>>,
    /// Where the last read served by the read cache ended (0: none since the window last
    /// looked).
    cached_to: std::sync::atomic::AtomicU64,
    /// The prefetch window holds chunks: reads go there first, so that data fetched ahead is
    /// served from memory and not read back from the read cache it was just written to.
    window_busy: std::sync::atomic::AtomicBool,
}

impl<C: ObjectClient> ReadHandle<C> {
    pub fn new(key: String, etag: String, size: u64, ctx: ReadContext<C>) -> Self {
        let first = ctx.config.first_request;
        let window = Window::new(&ctx.config);
        Self {
            key,
            etag,
            size,
            ctx,
            state: tokio::sync::Mutex::new(Prefetcher {
                chunks: VecDeque::new(),
                next_request: first,
                expected: 0,
                window,
            }),
            local: Mutex::new(None),
            cached_to: Default::default(),
            window_busy: Default::default(),
        }
    }

    fn local_copy(&self) -> Option<Arc<LocalCopy<C>>> {
        self.local.lock().ok()?.clone()
    }

    /// The handle's local copy, started now if the object is small enough for one.
    fn start_local_copy(&self) -> Option<Arc<LocalCopy<C>>> {
        let cfg = &self.ctx.config;
        if self.size > cfg.local_copy_max || self.size <= cfg.block_size {
            return None;
        }
        let mut local = self.local.lock().ok()?;
        if local.is_none() {
            let copy = LocalCopy::start(
                self.key.clone(),
                self.etag.clone(),
                self.size,
                self.ctx.clone(),
            );
            match copy {
                Ok(copy) => {
                    tracing::debug!(key = self.key, "random reads: filling a local copy");
                    *local = Some(Arc::new(copy));
                }
                // Logged where it happened; reads go on with blocks from S3.
                Err(_) => return None,
            }
        }
        local.clone()
    }

    /// A read served from the read cache or the local copy without waiting, if it can be
    /// (`None` otherwise).
    pub fn read_now(&self, offset: u64, len: u64) -> Option<FsResult<Bytes>> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return None;
        }
        if !self.window_busy.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(data) = self.read_cached(offset, end) {
                return Some(Ok(data));
            }
        }
        self.local_copy()?.read_now(offset, end)
    }

    /// `offset..end` from the persistent read cache, if it has all of it.
    fn read_cached(&self, offset: u64, end: u64) -> Option<Bytes> {
        let disk = self.ctx.disk.as_ref()?;
        let budget = Some(&self.ctx.budget);
        let data = local_io(|| disk.read(&self.key, &self.etag, self.size, offset, end, budget))?;
        self.cached_to
            .store(end, std::sync::atomic::Ordering::Relaxed);
        Some(data)
    }

    /// Reads up to `len` bytes at `offset` (fewer only at the end of the object).
    pub async fn read(&self, offset: u64, len: u64) -> FsResult<Bytes> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        // With the window idle the read cache is asked here, else only if the window turns
        // out not to cover the read.
        let cache_asked = !self.window_busy.load(std::sync::atomic::Ordering::Relaxed);
        if cache_asked {
            if let Some(data) = self.read_cached(offset, end) {
                return Ok(data);
            }
        }
        if let Some(local) = self.local_copy() {
            return self.read_local(&local, offset, end).await;
        }
        let mut p = self.state.lock().await;
        let cached_to = self.cached_to.swap(0, std::sync::atomic::Ordering::Relaxed);
        if cached_to != 0 {
            // The reader went on through the read cache: where it reads next is no seek.
            p.expected = cached_to;
        }
        let slack = self.ctx.config.max_request;
        // Inside the window, or just past it: the kernel's readahead requests arrive slightly
        // out of order, and none of them is a seek.
        let in_window = p
            .chunks
            .front()
            .zip(p.chunks.back())
            .is_some_and(|(f, b)| f.range.start <= offset && offset < b.range.end + slack);
        if !in_window {
            p.chunks.clear();
            self.window_busy
                .store(false, std::sync::atomic::Ordering::Relaxed);
            if !cache_asked {
                if let Some(data) = self.read_cached(offset, end) {
                    return Ok(data);
                }
            }
            p.next_request = self.ctx.config.first_request;
            if offset.abs_diff(p.expected) > self.ctx.config.sequential_tolerance {
                // A seek: serve it from a local copy, or from blocks; in the second case
                // prefetch starts again if reads continue here.
                p.expected = end;
                drop(p);
                if let Some(local) = self.start_local_copy() {
                    return self.read_local(&local, offset, end).await;
                }
                return self.read_blocks(offset, end).await;
            }
            // Near where the reader was expected: the kernel's first readahead requests may
            // arrive in any order, so the window starts at the lower of the two.
            let start = offset.min(p.expected);
            self.top_up(&mut p, start);
        }

        let mut out: Option<BytesMut> = None;
        let mut single: Option<Bytes> = None;
        let mut pos = offset;
        let mut waited = false;
        while pos < end {
            // Chunks a whole request behind the reader are done with.
            while p.chunks.front().is_some_and(|c| c.range.end + slack <= pos) {
                p.chunks.pop_front();
            }
            self.top_up(&mut p, pos);
            let Some(index) = p.chunks.iter().position(|c| c.range.contains(&pos)) else {
                return Err(FsError::internal(
                    "the prefetch window does not cover a read",
                ));
            };
            if p.chunks[index].waits_for_memory() {
                // A reader that waits for memory holds none: what is behind it goes back, or
                // readers sharing a small budget could wait on each other forever.
                while p.chunks.front().is_some_and(|c| c.range.end <= pos) {
                    p.chunks.pop_front();
                }
            }
            let index = p
                .chunks
                .iter()
                .position(|c| c.range.contains(&pos))
                .expect("kept above");
            if matches!(p.chunks[index].data, ChunkData::Failed) {
                // Fetched before and failed (the reader saw the error): once more. What was
                // read ahead goes, so its memory is there for this fetch: kept, it could hold
                // the whole budget while this fetch waits for some (the kernel asks again for
                // a failed readahead page before anything past it is read: a deadlock).
                p.chunks.truncate(index + 1);
                let range = p.chunks[index].range.clone();
                let has_memory = Arc::new(std::sync::atomic::AtomicBool::new(false));
                p.chunks[index].has_memory = has_memory.clone();
                p.chunks[index].data =
                    ChunkData::Pending(self.spawn_fetch(range, None, None, has_memory));
            }
            let chunk = &mut p.chunks[index];
            waited |= matches!(&chunk.data, ChunkData::Pending(task) if !task.is_finished());
            let (start, chunk_end) = (chunk.range.start, chunk.range.end);
            let piece = chunk
                .ready()
                .await?
                .slice((pos - start) as usize..(end.min(chunk_end) - start) as usize);
            pos += piece.len() as u64;
            match &mut out {
                // All of the read in one chunk: its bytes, shared.
                None if pos == end => single = Some(piece),
                // Across chunks: copied at once. A slice kept while the next chunk is awaited
                // would keep this whole chunk's buffer, and its memory, alive meanwhile: many
                // readers each waiting so could hold the whole budget, and wait forever.
                None => {
                    let mut buf = BytesMut::with_capacity((end - offset) as usize);
                    buf.extend_from_slice(&piece);
                    out = Some(buf);
                }
                Some(buf) => buf.extend_from_slice(&piece),
            }
        }
        p.expected = p.expected.max(end);
        p.window.served(end - offset, waited, &self.ctx.first_byte);
        if self.local_copy().is_some() {
            // Another read switched the handle to a local copy while this one was served from
            // the window: every later read goes there, so the window's memory goes back now
            // (kept, it would be held until the file is closed, and could starve the copy).
            p.chunks.clear();
        } else {
            self.top_up(&mut p, pos);
        }
        self.window_busy
            .store(!p.chunks.is_empty(), std::sync::atomic::Ordering::Relaxed);
        Ok(match out {
            Some(buf) => buf.freeze(),
            None => single.unwrap_or_default(),
        })
    }

    /// Starts GETs until the window's number of them end past `pos`.
    ///
    /// Memory: a request ahead of the reader starts only if its memory is there now; the one
    /// the reader needs (covering `pos`) may wait for memory, and then nothing is started
    /// after it. So a reader waiting for memory holds none for later data, and readers that
    /// hold memory are readers that make progress: many readers sharing a small budget never
    /// wait on each other's read-ahead.
    fn top_up(&self, p: &mut Prefetcher, pos: u64) {
        let cfg = &self.ctx.config;
        if p.chunks.iter().any(Chunk::waits_for_memory) {
            return;
        }
        let mut next = p.chunks.back().map_or(pos, |c| c.range.end);
        let mut ahead = p.chunks.iter().filter(|c| c.range.end > pos).count();
        let (requests, request_size) = (p.window.requests(cfg), p.window.request_size(cfg));
        while (ahead < requests || next <= pos) && next < self.size {
            // Requests end on a MiB boundary where they can: the kernel reads 1 MiB at a
            // time, so a read then lies in one request and is answered with its bytes, not
            // a copy.
            let mut end = next + p.next_request.min(request_size);
            if end / CHUNK_ALIGN * CHUNK_ALIGN > next {
                end = end / CHUNK_ALIGN * CHUNK_ALIGN;
            }
            let range = next..end.min(self.size);
            let needed = range.start <= pos;
            // Read-ahead goes only with a GET free now: it never queues for one in front of a
            // chunk that a reader (this one or another) waits for.
            let ahead_get = if needed {
                None
            } else {
                match self.ctx.gets.clone().try_acquire_owned() {
                    Ok(get) => Some(get),
                    Err(_) => break,
                }
            };
            let buffer = self
                .ctx
                .budget
                .part_buffer_now((range.end - range.start) as usize);
            if buffer.is_none() && !needed {
                break; // no room to read ahead now; the reader's next read tries again
            }
            // The chunk the reader needs takes a free GET now only with its memory in hand (a
            // GET in flight waits on nothing but the network); else it waits for one after.
            let get = ahead_get.or_else(|| {
                buffer
                    .as_ref()
                    .and_then(|_| self.ctx.gets.clone().try_acquire_owned().ok())
            });
            let waits = buffer.is_none();
            next = range.end;
            p.next_request = (p.next_request * 2).min(request_size);
            let has_memory = Arc::new(std::sync::atomic::AtomicBool::new(!waits));
            let task = self.spawn_fetch(range.clone(), buffer, get, has_memory.clone());
            p.chunks.push_back(Chunk {
                range,
                data: ChunkData::Pending(task),
                has_memory,
            });
            ahead += 1;
            if waits && next > pos {
                break;
            }
        }
    }

    /// Starts the GET of `range`, into `buffer` (or one it waits for), with `get` (or one it
    /// waits for, once it has its buffer).
    fn spawn_fetch(
        &self,
        range: Range<u64>,
        buffer: Option<PartBuffer>,
        get: Option<tokio::sync::OwnedSemaphorePermit>,
        has_memory: Arc<std::sync::atomic::AtomicBool>,
    ) -> Fetch {
        let ctx = self.ctx.clone();
        let key = self.key.clone();
        let etag = self.etag.clone();
        let size = self.size;
        tokio::spawn(async move {
            let buffer = match buffer {
                Some(b) => b,
                None => {
                    let b = ctx
                        .budget
                        .part_buffer((range.end - range.start) as usize)
                        .await;
                    has_memory.store(true, std::sync::atomic::Ordering::Release);
                    b
                }
            };
            let start = range.start;
            let data = fetch_into(&ctx, &key, &etag, range, buffer, get).await?;
            ctx.keep(&key, &etag, size, start, &data);
            Ok(data)
        })
    }

    /// A read from the local copy; if the local disk fails it (full, say), from S3 instead.
    async fn read_local(&self, local: &LocalCopy<C>, offset: u64, end: u64) -> FsResult<Bytes> {
        if !local.broken() {
            match local.read(offset, end).await {
                Err(_) if local.broken() => {
                    tracing::warn!(
                        key = self.key,
                        "the local copy of a file read at random was given up; reading from S3"
                    );
                }
                answer => return answer,
            }
        }
        self.read_blocks(offset, end).await
    }

    /// A random read: the aligned blocks covering `offset..end`, from the cache or one GET.
    async fn read_blocks(&self, offset: u64, end: u64) -> FsResult<Bytes> {
        let bs = self.ctx.config.block_size;
        let first = offset / bs;
        let last = (end - 1) / bs;
        let key_of = |b: u64| (self.key.clone(), self.etag.clone(), b);
        let mut blocks: Vec<Option<Bytes>> = (first..=last)
            .map(|b| self.ctx.blocks.get(&key_of(b)))
            .collect();
        if let (Some(lo), Some(hi)) = (
            blocks.iter().position(Option::is_none),
            blocks.iter().rposition(Option::is_none),
        ) {
            let span = (first + lo as u64) * bs..((first + hi as u64 + 1) * bs).min(self.size);
            let data = fetch(&self.ctx, &self.key, &self.etag, span.clone()).await?;
            self.ctx
                .keep(&self.key, &self.etag, self.size, span.start, &data);
            for (i, slot) in blocks.iter_mut().enumerate().take(hi + 1).skip(lo) {
                let b = first + i as u64;
                let from = b * bs - span.start;
                let to = ((b + 1) * bs).min(self.size) - span.start;
                // A copy of its own: a slice would keep the whole received chunk it lies in
                // alive for as long as the block is cached, outside the budget.
                let block = Bytes::copy_from_slice(&data[from as usize..to as usize]);
                self.ctx.blocks.put(key_of(b), block.clone());
                *slot = Some(block);
            }
        }
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for (i, block) in blocks.into_iter().enumerate() {
            let block = block.expect("filled above");
            let block_start = (first + i as u64) * bs;
            let from = offset.saturating_sub(block_start) as usize;
            let to = ((end - block_start) as usize).min(block.len());
            out.extend_from_slice(&block[from..to]);
        }
        Ok(out.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::{MockClient, Operation};
    use std::time::Duration;

    fn handle(mock: Arc<MockClient>, size: usize, budget: u64) -> ReadHandle<MockClient> {
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        mock.insert("k", data);
        let etag = mock.object("k").unwrap().etag;
        let ctx = ReadContext {
            client: mock,
            budget: Arc::new(MemoryBudget::new(budget)),
            blocks: Arc::new(BlockCache::new(16)),
            config: ReadConfig {
                first_request: 64 * 1024,
                max_request: 256 * 1024,
                requests_ahead: 8,
                window_start: 2 * 1024 * 1024,
                block_size: 16 * 1024,
                sequential_tolerance: 256 * 1024,
                local_copy_max: 0,
                local_chunk: 64 * 1024,
                fill_request: 128 * 1024,
                fill_requests: 2,
            },
            disk: None,
            first_byte: Default::default(),
            gets: Arc::new(tokio::sync::Semaphore::new(16)),
        };
        ReadHandle::new("k".into(), etag, size as u64, ctx)
    }

    fn expected(offset: u64, len: u64, size: u64) -> Vec<u8> {
        (offset..(offset + len).min(size))
            .map(|i| (i % 251) as u8)
            .collect()
    }

    #[tokio::test]
    async fn sequential_reads_prefetch_with_growing_requests() {
        let mock = Arc::new(MockClient::new("b"));
        let size = 3 * 1024 * 1024 + 7;
        let h = handle(mock.clone(), size, 64 << 20);
        let mut off = 0;
        while off < size as u64 {
            let got = h.read(off, 128 * 1024).await.unwrap();
            assert_eq!(got, expected(off, 128 * 1024, size as u64), "at {off}");
            off += got.len() as u64;
        }
        // 64K, 128K, then 256K requests: far fewer GETs than the 25 reads.
        let gets = mock.count(Operation::GetObject);
        assert!((13..=15).contains(&gets), "{gets} GETs");
        assert!(h.read(size as u64, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn small_backward_seek_and_out_of_order_reads_keep_the_window() {
        let mock = Arc::new(MockClient::new("b"));
        let size = 1024 * 1024;
        let h = handle(mock.clone(), size, 64 << 20);
        let check = |got: Bytes, off: u64, len: u64| {
            assert_eq!(got, expected(off, len, size as u64), "at {off}")
        };
        check(h.read(0, 4096).await.unwrap(), 0, 4096);
        check(h.read(8192, 4096).await.unwrap(), 8192, 4096);
        check(h.read(70_000, 100_000).await.unwrap(), 70_000, 100_000);
        let gets = mock.count(Operation::GetObject);
        // Behind the reader, inside what the window still holds: no new GET.
        check(h.read(4096, 4096).await.unwrap(), 4096, 4096);
        check(h.read(60_000, 1000).await.unwrap(), 60_000, 1000);
        assert_eq!(
            mock.count(Operation::GetObject),
            gets,
            "no GETs for reads inside the window"
        );
    }

    #[tokio::test]
    async fn out_of_order_readahead_keeps_the_window() {
        let mock = Arc::new(MockClient::new("b"));
        let size = 4 * 1024 * 1024;
        let h = handle(mock.clone(), size, 64 << 20);
        let step = 128 * 1024;
        let mut off = 0;
        while off < size as u64 {
            // The kernel's readahead: two requests in flight, the later one served first.
            for o in [off + step, off] {
                let got = h.read(o, step).await.unwrap();
                assert_eq!(got, expected(o, step, size as u64), "at {o}");
            }
            off += 2 * step;
        }
        let gets = mock.count(Operation::GetObject);
        assert!(gets <= 20, "the window was never dropped: {gets} GETs");
    }

    #[tokio::test]
    async fn a_failed_fetch_is_fetched_again_when_read_ahead_holds_the_whole_budget() {
        let mock = Arc::new(MockClient::new("b"));
        let size = 4 << 20;
        // Requests of half the budget: two fill it.
        let budget = 1 << 20;
        let mut h = handle(mock.clone(), size, budget);
        h.ctx.config.first_request = budget / 2;
        h.ctx.config.max_request = budget / 2;
        h.state.get_mut().next_request = budget / 2;
        mock.fail_next(Operation::GetObject, crate::s3::ErrorKind::Transport, 1);
        assert!(h.read(0, 4096).await.is_err(), "the first GET failed");
        // The kernel asks again for the page whose readahead failed.
        let again = tokio::time::timeout(std::time::Duration::from_secs(5), h.read(0, 4096))
            .await
            .expect("the failed chunk is fetched again, not stuck behind the read-ahead");
        assert_eq!(again.unwrap(), expected(0, 4096, size as u64));
        let mut off = 4096;
        while off < size as u64 {
            let got = h.read(off, 256 * 1024).await.unwrap();
            assert_eq!(got, expected(off, 256 * 1024, size as u64), "at {off}");
            off += got.len() as u64;
        }
    }

    /// A sequential reader's window, and the time on its own clock.
    struct Reader {
        w: Window,
        now: std::time::Instant,
    }

    impl Reader {
        fn new(cfg: &ReadConfig) -> Self {
            let w = Window::new(cfg);
            let now = w.growth.epoch.start;
            Self { w, now }
        }

        /// Reads `total` bytes more in 1 MiB reads, the link delivering `rate(window)` bytes
        /// per second, its GETs starting to answer after `delay`; the window at the end.
        fn read(
            &mut self,
            total: u64,
            waits: bool,
            delay: Option<Duration>,
            rate: impl Fn(u64) -> f64,
        ) -> u64 {
            let mut done = 0;
            while done < total {
                let n = 1 << 20;
                self.now += Duration::from_secs_f64(n as f64 / rate(self.w.growth.size));
                self.w.served_at(n, waits, || delay, self.now);
                done += n;
            }
            self.w.growth.size
        }
    }

    #[test]
    fn the_read_ahead_window_grows_only_while_growing_pays() {
        let cfg = ReadConfig::default();
        let start = cfg.window_start;
        let largest = cfg.max_request * cfg.requests_ahead as u64;
        // A loopback server: GETs answer within a millisecond, so four bandwidth-delay
        // products (here 4 MB) are below the start and raise nothing.
        let loopback = Some(Duration::from_millis(1));
        // A reader that never waits for data needs no more than it has.
        let mut r = Reader::new(&cfg);
        assert_eq!(r.read(4 << 30, false, loopback, |_| 1e9), start);
        // A link that goes as much faster as the window grows (a long fat pipe): up to the
        // largest window, short of a last step that would add less than a fifth.
        let mut r = Reader::new(&cfg);
        let grown = r.read(8 << 30, true, None, |b| b as f64 * 10.0);
        assert!(grown > largest * 5 / 6 && grown <= largest, "{grown}");
        // A link at its limit already: one step is tried, found useless, and undone.
        let mut r = Reader::new(&cfg);
        assert_eq!(r.read(4 << 30, true, loopback, |_| 500e6), start);
        assert!(r.w.growth.settled);
        // Faster up to 64 MiB in flight, then flat: steps by half from 8 MiB paid up to
        // 60.75 MiB, the one to 91 did not.
        let mut r = Reader::new(&cfg);
        let rate = |b: u64| (b.min(64 << 20) as f64) * 20.0;
        assert_eq!(r.read(8 << 30, true, None, rate), 63_700_992);
        assert!(r.w.growth.settled);
        assert_eq!(r.w.requests(&cfg), 8);
        let w = Window::new(&cfg);
        assert_eq!((w.request_size(&cfg), w.requests(&cfg)), (2 << 20, 4));
    }

    #[test]
    fn the_read_ahead_window_covers_the_links_delay_within_a_few_windows() {
        let cfg = ReadConfig::default();
        // GETs that take 50 ms to answer, on a link of 400 MB/s: a window of W bytes moves
        // W per 50 ms, up to the link. Four bandwidth-delay products are 80 MB.
        let delay = Duration::from_millis(50);
        let link = |w: u64| (w as f64 / delay.as_secs_f64()).min(400e6);
        let mut r = Reader::new(&cfg);
        // Within 128 MiB, before the first trial could even be judged: each window's worth of
        // reading raises the window fourfold.
        let raised = r.read(128 << 20, true, Some(delay), link);
        assert!((80_000_000..=77 << 20).contains(&raised), "{raised}");
        // At the link's speed the floor stays at four products, and a step up is tried and
        // undone.
        assert_eq!(r.read(4 << 30, true, Some(delay), link), raised);
        assert!(r.w.growth.settled);
        // The same link without a measured delay: only trials grow the window, an epoch each.
        let mut r = Reader::new(&cfg);
        let slow = r.read(128 << 20, true, None, link);
        assert!(slow < 16 << 20, "{slow}");
        // A reader slower than the link never waits, and needs no more than it has.
        let mut r = Reader::new(&cfg);
        let start = cfg.window_start;
        assert_eq!(r.read(1 << 30, false, Some(delay), |_| 100e6), start);
    }

    #[tokio::test]
    async fn random_reads_fetch_aligned_blocks_once() {
        let mock = Arc::new(MockClient::new("b"));
        let size = 1024 * 1024;
        let h = handle(mock.clone(), size, 64 << 20);
        let got = h.read(500_000, 4096).await.unwrap();
        assert_eq!(got, expected(500_000, 4096, size as u64));
        assert_eq!(mock.count(Operation::GetObject), 1);
        // Far from the first read, then back inside its 16 KiB block: from the cache.
        let got = h.read(900_000, 100).await.unwrap();
        assert_eq!(got, expected(900_000, 100, size as u64));
        let got = h.read(500_100, 100).await.unwrap();
        assert_eq!(got, expected(500_100, 100, size as u64));
        assert_eq!(mock.count(Operation::GetObject), 2);
        let got = h.read(200_000, 40_000).await.unwrap();
        assert_eq!(got, expected(200_000, 40_000, size as u64));
        assert_eq!(
            mock.count(Operation::GetObject),
            3,
            "one GET covers several blocks"
        );
    }

    fn with_local_copy(mut h: ReadHandle<MockClient>) -> ReadHandle<MockClient> {
        h.ctx.config.local_copy_max = 1 << 30;
        h
    }

    async fn wait_until_complete(h: &ReadHandle<MockClient>) {
        for _ in 0..500 {
            if h.local_copy().is_some_and(|l| l.complete()) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("the local copy never completed");
    }

    #[tokio::test]
    async fn random_reads_fill_a_local_copy_once() {
        let mock = Arc::new(MockClient::new("b"));
        let size = 3 * 1024 * 1024 + 5;
        // A budget of two fill requests: the fill waits for room, still finishes.
        let h = with_local_copy(handle(mock.clone(), size, 256 * 1024));
        let received = |m: &MockClient| m.bytes_moved().1;
        let before = received(&mock);
        // A seek far into the file: served at once, from a chunk fetched for it.
        let got = h.read(2_000_000, 4096).await.unwrap();
        assert_eq!(got, expected(2_000_000, 4096, size as u64));
        wait_until_complete(&h).await;
        let (gets, fetched) = (mock.count(Operation::GetObject), received(&mock) - before);
        assert_eq!(fetched, size as u64, "every byte fetched exactly once");
        // Reads anywhere, across chunk boundaries and up to the end: no more GETs.
        for (off, len) in [
            (0, 10),
            (65_530, 20),
            (size as u64 - 3, 100),
            (1_000_000, 300_000),
        ] {
            assert_eq!(
                h.read(off, len).await.unwrap(),
                expected(off, len, size as u64)
            );
        }
        assert_eq!(mock.count(Operation::GetObject), gets);
        h.ctx.budget.release_idle();
        assert!(h.ctx.budget.in_use_bytes() == 0, "fetch memory given back");
    }

    #[tokio::test]
    async fn local_copy_of_a_replaced_object_fails_stale() {
        let mock = Arc::new(MockClient::new("b"));
        let size = 4 * 1024 * 1024;
        // One fill request at a time, so the object is replaced before the copy is complete.
        let mut h = with_local_copy(handle(mock.clone(), size, 64 << 20));
        h.ctx.config.fill_requests = 1;
        let got = h.read(3_000_000, 10).await.unwrap();
        assert_eq!(got, expected(3_000_000, 10, size as u64));
        mock.insert("k", vec![9u8; size]);
        // Whatever was fetched before is the old version; the rest fails, never mixes.
        let mut stale = 0;
        for off in (0..size as u64).step_by(100_000) {
            match h.read(off, 10).await {
                Ok(got) => assert_eq!(got, expected(off, 10, size as u64), "at {off}"),
                Err(FsError::Stale) => stale += 1,
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(stale > 0, "some reads needed the replaced object");
    }

    #[tokio::test]
    async fn replaced_object_reads_fail_stale() {
        let mock = Arc::new(MockClient::new("b"));
        let h = handle(mock.clone(), 4_000_000, 64 << 20);
        assert_eq!(h.read(0, 10).await.unwrap().len(), 10);
        mock.insert("k", vec![9u8; 4_000_000]);
        // Already prefetched: still the version the handle opened.
        assert_eq!(h.read(10, 10).await.unwrap(), expected(10, 10, 4_000_000));
        // Beyond the window: a new GET, refused by If-Match.
        let err = h.read(3_500_000, 10).await.unwrap_err();
        assert!(matches!(err, FsError::Stale), "{err:?}");
        assert_eq!(err.errno(), libc::ESTALE);
    }

    #[tokio::test]
    async fn reads_wait_for_one_of_the_mounts_gets_in_flight() {
        let mock = Arc::new(MockClient::new("b"));
        let h = Arc::new(handle(mock.clone(), 1 << 20, 8 << 20));
        // Every GET the mount may run at once is taken (by other readers).
        let all = h.ctx.gets.clone().acquire_many_owned(16).await.unwrap();
        let reader = {
            let h = h.clone();
            tokio::spawn(async move { h.read(0, 4096).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !reader.is_finished(),
            "a read sent a GET past the mount's limit"
        );
        assert_eq!(mock.count(Operation::GetObject), 0);
        assert_eq!(
            h.ctx.budget.in_use_bytes(),
            64 << 10,
            "only the chunk read waits for a GET (with its memory); no read-ahead queues"
        );
        drop(all);
        let got = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the read goes on once a GET is free")
            .unwrap()
            .unwrap();
        assert_eq!(got.to_vec(), expected(0, 4096, 1 << 20));
        assert_eq!(
            h.ctx.gets.available_permits(),
            16,
            "every GET gave its place back"
        );
    }

    #[tokio::test]
    async fn budget_bounds_prefetch_memory() {
        let mock = Arc::new(MockClient::new("b"));
        let size = 4 * 1024 * 1024;
        // A budget smaller than one window: readers wait for room but still finish.
        let h = Arc::new(handle(mock.clone(), size, 1 << 20));
        let budget = h.ctx.budget.clone();
        let mut off = 0;
        while off < size as u64 {
            let got = h.read(off, 128 * 1024).await.unwrap();
            assert!(budget.in_use_bytes() <= budget.total_bytes());
            off += got.len() as u64;
        }
        assert_eq!(off, size as u64);
    }
}
