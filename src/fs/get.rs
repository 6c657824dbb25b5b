//! One ranged GET, and what every reader shares: the read settings, the block cache and the
//! memory budget. The prefetching reader ([`super::read`]) and the local copy
//! ([`super::local_copy`]) both fetch through [`fetch`], so neither imports the other's GETs.

use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::disk_cache::DiskCache;
use super::error::{from_client, FsError, FsResult};
use super::memory::{MemoryBudget, PartBuffer};
use crate::s3::ObjectClient;

/// What one connection carrying GETs of file data holds besides the data: hyper reads a
/// response into a buffer of its own that grows to about 408 KiB while a large body streams,
/// and keeps it while the connection waits in the pool for its next request.
pub const CONNECTION_MEMORY: u64 = 512 * 1024;

/// How many GETs of file data run at once across the mount, and how many connections are kept
/// for them: their buffers take one eighth of `--max-memory` (4 connections at least, 64 at
/// most), which the budget for data leaves them.
pub fn read_connections(max_memory: u64) -> usize {
    (max_memory / 8 / CONNECTION_MEMORY).clamp(4, 64) as usize
}

/// Waits for one of the mount's GETs of file data in flight (see [`read_connections`]).
pub(super) async fn get_slot(gets: &Arc<Semaphore>) -> OwnedSemaphorePermit {
    gets.clone()
        .acquire_owned()
        .await
        .expect("the GETs' semaphore is never closed")
}

#[derive(Debug, Clone)]
pub struct ReadConfig {
    pub first_request: u64,
    pub max_request: u64,
    pub requests_ahead: usize,
    /// Bytes a sequential reader keeps in flight ahead of it at first; the window grows
    /// (by half, up to `requests_ahead` requests of `max_request`) while growing pays.
    pub window_start: u64,
    /// Alignment and size of random-read blocks.
    pub block_size: u64,
    /// A read this close to where the reader was expected is sequential, not a seek: the
    /// kernel keeps several readahead requests of up to 1 MiB in flight, in any order.
    pub sequential_tolerance: u64,
    /// Objects up to this size that are read at random get a local copy (0: never).
    pub local_copy_max: u64,
    /// Unit of a local copy's bookkeeping, and the least a read fetches into it.
    pub local_chunk: u64,
    /// Size of each background GET filling a local copy, and how many run at once.
    pub fill_request: u64,
    pub fill_requests: usize,
}

impl Default for ReadConfig {
    fn default() -> Self {
        Self {
            first_request: 256 * 1024,
            max_request: 8 * 1024 * 1024,
            requests_ahead: 16,
            window_start: 8 * 1024 * 1024,
            block_size: 128 * 1024,
            sequential_tolerance: 2 * 1024 * 1024,
            local_copy_max: 2 << 30,
            local_chunk: 1024 * 1024,
            fill_request: 8 * 1024 * 1024,
            fill_requests: 4,
        }
    }
}

pub(super) type BlockKey = (String, String, u64);

/// Blocks fetched by random reads, shared by all handles, keyed by (key, ETag, block index) so
/// a replaced object never serves old blocks to a new handle.
pub struct BlockCache {
    blocks: Mutex<lru::LruCache<BlockKey, Bytes>>,
}

impl BlockCache {
    pub fn new(capacity_blocks: usize) -> Self {
        Self {
            blocks: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(capacity_blocks.max(1)).expect("at least one block"),
            )),
        }
    }

    pub(super) fn get(&self, key: &BlockKey) -> Option<Bytes> {
        self.blocks.lock().ok()?.get(key).cloned()
    }

    pub(super) fn put(&self, key: BlockKey, data: Bytes) {
        if let Ok(mut b) = self.blocks.lock() {
            b.put(key, data);
        }
    }
}

/// What a read needs from the rest of the filesystem.
pub struct ReadContext<C> {
    pub client: Arc<C>,
    pub budget: Arc<MemoryBudget>,
    pub blocks: Arc<BlockCache>,
    pub config: ReadConfig,
    /// The persistent read cache (`--cache`), if on.
    pub disk: Option<Arc<DiskCache>>,
    /// How long GETs take to start answering, which read-ahead must cover.
    pub first_byte: Arc<FirstByteDelay>,
    /// GETs of file data in flight across the mount ([`read_connections`] of them at most):
    /// each holds a connection, and its buffers, that the budget counts only this way.
    pub gets: Arc<Semaphore>,
}

/// How long a GET takes to start answering (from the request to the response's headers): the
/// least seen in the last [`DELAY_KEPT`], as BBR keeps the least round trip. Shared by all
/// readers of a mount, since they share the link. A busy server's queue lengthens some
/// requests, never the quickest, so the least is the link's and the server's own delay: what
/// read-ahead must cover.
#[derive(Debug, Default)]
pub struct FirstByteDelay {
    least: Mutex<Option<(Duration, Instant)>>,
}

/// How long the least delay stands before any newer one replaces it (the route or the server
/// may have changed).
const DELAY_KEPT: Duration = Duration::from_secs(10);

impl FirstByteDelay {
    pub(super) fn record(&self, took: Duration) {
        let now = Instant::now();
        if let Ok(mut least) = self.least.lock() {
            match *least {
                Some((d, at)) if d <= took && now.duration_since(at) < DELAY_KEPT => {}
                _ => *least = Some((took, now)),
            }
        }
    }

    pub(super) fn least(&self) -> Option<Duration> {
        self.least.lock().ok().and_then(|l| l.map(|(d, _)| d))
    }
}

impl<C> ReadContext<C> {
    /// Hands what a GET brought (bytes `offset..` of an object of `size` bytes) to the
    /// persistent read cache, if there is one, off the reader's path.
    pub(super) fn keep(&self, key: &str, etag: &str, size: u64, offset: u64, data: &Bytes) {
        let Some(disk) = self.disk.clone() else {
            return;
        };
        let (key, etag, data) = (key.to_string(), etag.to_string(), data.clone());
        tokio::task::spawn_blocking(move || disk.insert(&key, &etag, size, offset, &data));
    }
}

impl<C> Clone for ReadContext<C> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            budget: self.budget.clone(),
            blocks: self.blocks.clone(),
            config: self.config.clone(),
            disk: self.disk.clone(),
            first_byte: self.first_byte.clone(),
            gets: self.gets.clone(),
        }
    }
}

/// One ranged GET pinned to `etag`, checked for length, into a buffer of the budget (waiting
/// for room first). The body is copied as it arrives into one buffer of exactly its size:
/// the pieces the HTTP stack hands over share larger buffers of its own, which kept alive
/// would hold more memory than the budget counts (measured: about 20 MiB more with 16
/// readers at 64 MiB).
pub(super) async fn fetch<C: ObjectClient>(
    ctx: &ReadContext<C>,
    key: &str,
    etag: &str,
    range: Range<u64>,
) -> FsResult<Bytes> {
    let buffer = ctx
        .budget
        .part_buffer((range.end - range.start) as usize)
        .await;
    fetch_into(ctx, key, etag, range, buffer, None).await
}

/// [`fetch`] into `buf`, a buffer of the budget for it, with `get`, one of the mount's GETs in
/// flight (waited for if `None`), held until the body is in.
pub(super) async fn fetch_into<C: ObjectClient>(
    ctx: &ReadContext<C>,
    key: &str,
    etag: &str,
    range: Range<u64>,
    mut buf: PartBuffer,
    get: Option<OwnedSemaphorePermit>,
) -> FsResult<Bytes> {
    let len = range.end - range.start;
    let (range_start, range_end) = (range.start, range.end);
    let _get = match get {
        Some(get) => get,
        None => get_slot(&ctx.gets).await,
    };
    let asked = Instant::now();
    let mut out = ctx
        .client
        .get_object(key, Some(range), Some(etag))
        .await
        .map_err(from_client)?;
    ctx.first_byte.record(asked.elapsed());
    while let Some(part) = out.body.next_chunk().await.map_err(from_client)? {
        if buf.len() + part.len() as u64 > len {
            break;
        }
        buf.push(&part);
    }
    if buf.len() != len {
        return Err(FsError::internal(&format!(
            "GetObject of {range_start}..{range_end} of {key} returned {} bytes",
            buf.len()
        )));
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_byte_delay_is_the_least_seen() {
        let d = FirstByteDelay::default();
        assert_eq!(d.least(), None);
        let ms = Duration::from_millis;
        d.record(ms(30));
        // A request that queued behind others at a busy server does not raise it.
        d.record(ms(90));
        assert_eq!(d.least(), Some(ms(30)));
        d.record(ms(12));
        assert_eq!(d.least(), Some(ms(12)));
    }
}
