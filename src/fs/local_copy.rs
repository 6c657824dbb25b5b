//! A local copy of an object read at random, in an unlinked sparse temp file.
//!
//! Random reads that go to S3 one small block at a time cost a round trip each: a program that
//! reads a 1 GiB file at random offsets gets a few hundred KiB/s. When a handle's reads turn
//! random and the object is no larger than `ReadConfig::local_copy_max`, the handle keeps a
//! local copy instead: the chunks a read needs are fetched first, and the rest of the object is
//! fetched in the background with several ranged GETs at once, so after one pass over the
//! object at network speed every read is served from local disk (in practice from the page
//! cache). Data passes through memory only while in flight (reserved from the memory budget),
//! so RSS stays bounded; the disk space is the object's size at most, and it is freed when the
//! last handle on it closes. Every GET carries the handle's ETag, so the copy is never a mix of
//! two versions.

use std::collections::HashSet;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::error::{FsError, FsResult};
use super::get::{fetch, ReadContext};
use super::local_io;
use crate::s3::ObjectClient;

/// Which chunks are on disk, and which are being fetched.
#[derive(Default)]
struct Chunks {
    present: Vec<bool>,
    pending: HashSet<u64>,
}

struct Shared {
    file: std::fs::File,
    chunk: u64,
    size: u64,
    chunks: Mutex<Chunks>,
    /// Woken whenever a fetch ends, well or badly.
    arrived: Notify,
    /// The local disk refused data (full, failing): the copy is given up, and the handle
    /// reads from S3 again.
    broken: std::sync::atomic::AtomicBool,
}

pub struct LocalCopy<C> {
    key: String,
    etag: String,
    ctx: ReadContext<C>,
    shared: Arc<Shared>,
    fill: Mutex<Option<JoinHandle<()>>>,
}

impl<C> Drop for LocalCopy<C> {
    fn drop(&mut self) {
        if let Some(task) = self.fill.lock().ok().and_then(|mut f| f.take()) {
            task.abort();
        }
    }
}

impl<C: ObjectClient> LocalCopy<C> {
    /// An empty local copy of `key` at `etag`, `size` bytes long, with its background fill
    /// started.
    pub fn start(key: String, etag: String, size: u64, ctx: ReadContext<C>) -> FsResult<Self> {
        let file = local_io(|| {
            let file = tempfile::tempfile()?;
            file.set_len(size)?;
            Ok(file)
        })
        .map_err(io_error)?;
        let chunk = ctx.config.local_chunk.max(4096);
        let count = size.div_ceil(chunk) as usize;
        let shared = Arc::new(Shared {
            file,
            chunk,
            size,
            chunks: Mutex::new(Chunks {
                present: vec![false; count],
                pending: HashSet::new(),
            }),
            arrived: Notify::new(),
            broken: std::sync::atomic::AtomicBool::new(false),
        });
        let copy = Self {
            key,
            etag,
            ctx,
            shared,
            fill: Mutex::new(None),
        };
        let task = tokio::spawn(copy.fill_task());
        *copy.fill.lock().expect("not poisoned") = Some(task);
        Ok(copy)
    }

    /// Whether the local disk failed it: reads must go to S3.
    pub fn broken(&self) -> bool {
        self.shared
            .broken
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether every chunk is on disk.
    pub fn complete(&self) -> bool {
        let c = self.shared.chunks.lock().expect("not poisoned");
        c.present.iter().all(|p| *p)
    }

    /// Bytes `offset..end` if they are all here already (`None` otherwise): cheap enough for
    /// the FUSE thread.
    pub fn read_now(&self, offset: u64, end: u64) -> Option<FsResult<Bytes>> {
        let s = &self.shared;
        if self.broken() {
            return None;
        }
        {
            let c = s.chunks.lock().ok()?;
            if !(offset / s.chunk..=(end - 1) / s.chunk).all(|i| c.present[i as usize]) {
                return None;
            }
        }
        Some(self.read_here(offset, end))
    }

    fn read_here(&self, offset: u64, end: u64) -> FsResult<Bytes> {
        // From the page cache almost always, but a disk read when memory is short.
        let mut buf = BytesMut::zeroed((end - offset) as usize);
        local_io(|| self.shared.file.read_exact_at(&mut buf, offset)).map_err(io_error)?;
        Ok(buf.freeze())
    }

    /// Bytes `offset..end`, fetching the chunks that are not here yet.
    pub async fn read(&self, offset: u64, end: u64) -> FsResult<Bytes> {
        let s = &self.shared;
        let needed = offset / s.chunk..(end - 1) / s.chunk + 1;
        loop {
            let arrived = s.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let (missing, waiting) = {
                let mut c = s.chunks.lock().expect("not poisoned");
                let missing: Vec<u64> = needed
                    .clone()
                    .filter(|i| !c.present[*i as usize] && !c.pending.contains(i))
                    .collect();
                c.pending.extend(&missing);
                let waiting = needed
                    .clone()
                    .any(|i| !c.present[i as usize] && !missing.contains(&i));
                (missing, waiting)
            };
            if !missing.is_empty() {
                // Ours to fetch, in one GET (they are contiguous or nearly so); an error ends
                // this read.
                let span = missing[0]..missing[missing.len() - 1] + 1;
                fetch_chunks(&self.ctx, &self.key, &self.etag, s, span).await?;
                continue;
            }
            if !waiting {
                break;
            }
            // Fetched by the background fill; if that fails, the chunk is no longer pending
            // and the next round fetches it here.
            arrived.await;
        }
        self.read_here(offset, end)
    }

    /// Fetches every chunk not yet here, in order, `fill_requests` GETs of up to
    /// `fill_request` bytes at a time; stops quietly at the first error (reads then fetch
    /// what they need themselves).
    fn fill_task(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (ctx, key, etag, s) = (
            self.ctx.clone(),
            self.key.clone(),
            self.etag.clone(),
            self.shared.clone(),
        );
        async move {
            let per_request = (ctx.config.fill_request / s.chunk).max(1);
            let mut tasks = tokio::task::JoinSet::new();
            let mut next = 0u64;
            let count = s.size.div_ceil(s.chunk);
            let mut failed = false;
            while (next < count && !failed) || !tasks.is_empty() {
                while next < count && !failed && tasks.len() < ctx.config.fill_requests {
                    // The next run of chunks nobody has or is fetching, up to one request.
                    let span = {
                        let mut c = s.chunks.lock().expect("not poisoned");
                        while next < count
                            && (c.present[next as usize] || c.pending.contains(&next))
                        {
                            next += 1;
                        }
                        let start = next;
                        while next < count
                            && next - start < per_request
                            && !c.present[next as usize]
                            && !c.pending.contains(&next)
                        {
                            c.pending.insert(next);
                            next += 1;
                        }
                        start..next
                    };
                    if span.is_empty() {
                        continue;
                    }
                    let (ctx, key, etag, s) = (ctx.clone(), key.clone(), etag.clone(), s.clone());
                    tasks.spawn(async move { fetch_chunks(&ctx, &key, &etag, &s, span).await });
                }
                // After an error, the fetches under way still end (their chunks are pending
                // for readers that wait on them), but no new one starts.
                match tasks.join_next().await {
                    Some(Ok(Ok(()))) | None => {}
                    Some(Ok(Err(e))) => {
                        tracing::debug!(key, "background fill of a local copy stopped: {e}");
                        failed = true;
                    }
                    Some(Err(_)) => failed = true,
                }
            }
            if !failed {
                tracing::debug!(key, bytes = s.size, "local copy complete");
            }
        }
    }
}

/// Fetches chunks `span` (all marked pending by the caller) into the file, marks them present,
/// or, on error, no longer pending.
async fn fetch_chunks<C: ObjectClient>(
    ctx: &ReadContext<C>,
    key: &str,
    etag: &str,
    s: &Shared,
    span: Range<u64>,
) -> FsResult<()> {
    let mut guard = Pending {
        s,
        span: span.clone(),
        fetched: false,
    };
    let bytes = span.start * s.chunk..(span.end * s.chunk).min(s.size);
    let data = fetch(ctx, key, etag, bytes.clone()).await?;
    ctx.keep(key, etag, s.size, bytes.start, &data);
    if let Err(e) = local_io(|| s.file.write_all_at(&data, bytes.start)) {
        s.broken.store(true, std::sync::atomic::Ordering::Relaxed);
        return Err(io_error(e));
    }
    guard.fetched = true;
    Ok(())
}

/// Chunks being fetched: when the fetch ends, however it ends (an error, or its task
/// aborted), they are present or no longer pending, and waiting readers are woken.
struct Pending<'a> {
    s: &'a Shared,
    span: Range<u64>,
    fetched: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Ok(mut c) = self.s.chunks.lock() {
            for i in self.span.clone() {
                c.pending.remove(&i);
                if self.fetched {
                    c.present[i as usize] = true;
                }
            }
        }
        self.s.arrived.notify_waiters();
    }
}

fn io_error(e: std::io::Error) -> FsError {
    FsError::local("local copy of a file read at random", e)
}
