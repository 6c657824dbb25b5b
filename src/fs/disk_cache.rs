//! The persistent read cache (`--cache DIR`): blocks of objects read through the mount, kept
//! on local disk across opens and across mounts, so a second read of an object needs no GET.
//!
//! **Layout.** One directory per bucket and prefix under DIR, locked (flock) by the mount that
//! uses it: a second mount of the same bucket and prefix on the same DIR is refused at mount
//! time, so two processes never write one object's blocks. Each cached object is two files
//! named by a hash of its key: `NAME.data`, sparse, each block at its own offset in the
//! object, and `NAME.idx`, the object's key, ETag and size and, for each block present, its
//! CRC32C.
//!
//! **Validity.** Blocks belong to one ETag: a handle opened on another version of the object
//! (the object replaced, here or by another client) finds none, and the old blocks go. While
//! mounted, data files are not synced and indexes are written without sync (a cache need not
//! survive a power loss), so after a crash an index may name blocks whose bytes never reached
//! the disk: such blocks are checked against their CRC32C the first time they are read, and
//! one that does not match is dropped and fetched again. At unmount the cache is *sealed*:
//! each data file is synced (`fdatasync`) before its index is written, and the index records
//! the data file's inode number and change time (ctime) as they were after the sync. The next
//! mount trusts the blocks of a sealed index whose data file still has that inode and ctime
//! (nothing has written to it since; a write, even one that restores the mtime, moves the
//! ctime); the blocks of any other index are checked as after a crash. A block is never served
//! unless it is known to hold the bytes S3 sent.
//!
//! **Whole objects.** An object whose blocks are all present and trusted can be handed to the
//! kernel whole ([`DiskCache::whole`]): the mount opens it in FUSE passthrough, and reads go
//! from the data file to the reader without passing through the mount. A data file is never
//! written in place once it is whole: a new version or an eviction unlinks it, so a reader
//! that holds it keeps the version it opened.
//!
//! **Size.** `max_bytes` bounds the bytes of blocks kept, and the space reserved for blocks
//! to come: an object of 4 MiB or more (up to a quarter of the cache) read from its start has
//! its whole size reserved on disk at once, so that its file lies in few extents and reads at
//! the disk's sequential speed. Objects are evicted whole, least recently used first (across
//! mounts by their index's mtime, which the first read of an object in a mount brings up to
//! date); an object larger than the whole cache keeps only its first `max_bytes`.
//!
//! **When.** Blocks are written by whichever read fetched them (prefetch, random-read blocks,
//! local copies), off the reader's path; only whole blocks (or an object's last, short one)
//! are kept. Indexes are written when a read handle closes and at unmount; a crash between
//! loses only the record of blocks, which are fetched again.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use sha2::Digest;

use super::memory::MemoryBudget;

/// How long the cache writes nothing after the disk refused a block.
const WRITE_PAUSE: std::time::Duration = std::time::Duration::from_secs(60);

/// What `--cache` and `--max-cache-size` say.
#[derive(Debug, Clone)]
pub struct DiskCacheConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
    /// Whole objects are handed to the kernel (`--cache-passthrough`).
    pub passthrough: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Missing,
    /// On disk, with this CRC32C, as an earlier mount (or a crash) left it: checked when
    /// first read.
    Unchecked(u32),
    /// Written by this mount, or checked since.
    Good(u32),
}

struct Entry {
    /// File stem of `.data` and `.idx`.
    name: String,
    etag: String,
    size: u64,
    blocks: Vec<Block>,
    data: Arc<std::fs::File>,
    /// Bytes of blocks present.
    bytes: u64,
    /// Read from since this mount loaded it: its index's mtime, which orders objects for
    /// eviction across mounts, has been brought up to date.
    used_here: bool,
    /// The index on disk is sealed for these blocks (see the module's doc).
    sealed: bool,
    /// Bytes the data file holds on disk, blocks to come included: the whole object's size
    /// once reserved (see [`DiskCache::prepare`]).
    reserved: u64,
}

impl Entry {
    /// Every block present is known good here (written or checked by this mount): a seal
    /// may vouch for them. One left unchecked (by a crash) is not vouched for until read.
    fn sealable(&self) -> bool {
        !self.blocks.iter().any(|b| matches!(b, Block::Unchecked(_)))
    }

    /// Disk space reserved beyond the blocks present.
    fn extra(&self) -> u64 {
        self.reserved.saturating_sub(self.bytes)
    }

    fn covers(&self, first: usize, last: usize) -> bool {
        last < self.blocks.len()
            && self.blocks[first..=last]
                .iter()
                .all(|b| *b != Block::Missing)
    }
}

/// Counters for `s3mount status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DiskCacheStats {
    pub used_bytes: u64,
    pub max_bytes: u64,
    pub objects: u64,
    /// Reads served from the cache, and bytes.
    pub hits: u64,
    pub hit_bytes: u64,
    /// Blocks dropped because their bytes did not match their CRC32C.
    pub corrupt_blocks: u64,
    /// Opens of whole objects handed to the kernel (FUSE passthrough): their reads are not
    /// in `hits`.
    pub passthrough_opens: u64,
}

struct State {
    /// By key, least recently used first.
    objects: lru::LruCache<String, Entry>,
    /// Bytes of blocks present.
    used: u64,
    /// Disk space reserved beyond them (the sum of [`Entry::extra`]): counted against the
    /// size too.
    extra: u64,
    /// Keys whose index on disk is behind.
    dirty: std::collections::HashSet<String>,
}

pub struct DiskCache {
    dir: PathBuf,
    passthrough: bool,
    block: u64,
    max_bytes: u64,
    state: Mutex<State>,
    hits: AtomicU64,
    hit_bytes: AtomicU64,
    corrupt: AtomicU64,
    passthrough_opens: AtomicU64,
    /// After the disk refused a block (full, failing), nothing is written until this time
    /// (seconds since the mount's start), and the warning is logged once per such pause.
    paused_until: AtomicU64,
    started: std::time::Instant,
    /// Held for the cache's life: the flock that keeps other mounts out.
    _lock: std::fs::File,
}

impl DiskCache {
    /// Opens (making it if needed) the cache of one bucket and prefix under `cfg.dir`, takes
    /// its lock, and loads what earlier mounts left. `block` is the unit of caching.
    pub fn open(
        cfg: &DiskCacheConfig,
        bucket: &str,
        prefix: &str,
        block: u64,
    ) -> Result<Self, String> {
        let Some((dir, lock)) = super::locked_dir(&cfg.dir, bucket, prefix)? else {
            return Err(format!(
                "the read cache {} is in use by another s3mount of s3://{bucket}/{prefix}; \
                 give this mount another --cache directory",
                cfg.dir.display()
            ));
        };
        let cache = Self {
            dir,
            passthrough: cfg.passthrough,
            block: block.max(4096),
            max_bytes: cfg.max_bytes,
            state: Mutex::new(State {
                objects: lru::LruCache::unbounded(),
                used: 0,
                extra: 0,
                dirty: Default::default(),
            }),
            hits: AtomicU64::new(0),
            hit_bytes: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            passthrough_opens: AtomicU64::new(0),
            paused_until: AtomicU64::new(0),
            started: std::time::Instant::now(),
            _lock: lock,
        };
        cache.load();
        Ok(cache)
    }

    /// Enters the objects of the indexes on disk, oldest use first; drops what is not whole
    /// (a data file without index, an index that cannot be read, temporary files).
    fn load(&self) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut found: Vec<(std::time::SystemTime, String, Entry)> = Vec::new();
        let mut names = std::collections::HashSet::new();
        let mut strays = Vec::new();
        for item in dir.flatten() {
            let file = item.file_name().to_string_lossy().into_owned();
            if let Some(name) = file.strip_suffix(".idx") {
                match self.read_index(name) {
                    Some((key, entry, used)) => {
                        names.insert(name.to_string());
                        found.push((used, key, entry));
                    }
                    None => strays.push(item.path()),
                }
            } else if file.ends_with(".data") || file.ends_with(".tmp") {
                strays.push(item.path());
            }
        }
        for path in strays {
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
            let indexed = stem.is_some_and(|s| names.contains(&s))
                && path.extension().is_some_and(|e| e == "data");
            if !indexed {
                let _ = std::fs::remove_file(&path);
            }
        }
        found.sort_by_key(|(used, _, _)| *used);
        let mut st = super::lock(&self.state);
        for (_, key, entry) in found {
            st.used += entry.bytes;
            st.extra += entry.extra();
            st.objects.put(key, entry);
        }
        let objects = st.objects.len();
        let used = st.used;
        self.evict(&mut st, None);
        drop(st);
        if objects > 0 {
            tracing::info!(objects, bytes = used, dir = %self.dir.display(), "read cache loaded");
        }
    }

    fn read_index(&self, name: &str) -> Option<(String, Entry, std::time::SystemTime)> {
        let path = self.dir.join(format!("{name}.idx"));
        let text = std::fs::read(&path).ok()?;
        let used = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
        let key = v.get("key")?.as_str()?.to_string();
        let etag = v.get("etag")?.as_str()?.to_string();
        let size = v.get("size")?.as_u64()?;
        if v.get("block")?.as_u64()? != self.block || name != stem_of(&key) {
            return None;
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let present = b64.decode(v.get("present")?.as_str()?).ok()?;
        let crcs = b64.decode(v.get("crc")?.as_str()?).ok()?;
        let count = block_count(size, self.block);
        if present.len() != count.div_ceil(8) || crcs.len() != 4 * count {
            return None;
        }
        let data = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dir.join(format!("{name}.data")))
            .ok()?;
        let meta = data.metadata().ok()?;
        let on_disk = meta.len();
        let allocated = {
            use std::os::unix::fs::MetadataExt;
            meta.blocks() * 512
        };
        let sealed = v.get("sealed").and_then(Seal::from_json) == Some(Seal::of(&meta));
        let mut bytes = 0;
        let blocks = (0..count)
            .map(|i| {
                let crc = u32::from_le_bytes(crcs[4 * i..4 * i + 4].try_into().expect("4 bytes"));
                let span = block_span(i, size, self.block);
                if present[i / 8] & (1 << (i % 8)) == 0 || span.end > on_disk {
                    Block::Missing
                } else {
                    bytes += span.end - span.start;
                    if sealed {
                        Block::Good(crc)
                    } else {
                        Block::Unchecked(crc)
                    }
                }
            })
            .collect();
        Some((
            key,
            Entry {
                name: name.to_string(),
                etag,
                size,
                blocks,
                data: Arc::new(data),
                bytes,
                used_here: false,
                sealed,
                reserved: allocated,
            },
            used,
        ))
    }

    /// `offset..end` of `key` at `etag`, if every block it touches is here (and, for blocks an
    /// earlier mount wrote, matches its CRC32C); in a buffer of `budget` when it has one free.
    pub fn read(
        &self,
        key: &str,
        etag: &str,
        size: u64,
        offset: u64,
        end: u64,
        budget: Option<&Arc<MemoryBudget>>,
    ) -> Option<Bytes> {
        if offset >= end {
            return None;
        }
        let (first, last) = (
            (offset / self.block) as usize,
            ((end - 1) / self.block) as usize,
        );
        let (file, unchecked, first_use) = {
            let mut st = super::lock(&self.state);
            let e = st.objects.get_mut(key)?;
            if e.etag != etag || e.size != size || !e.covers(first, last) {
                return None;
            }
            let first_use = !std::mem::replace(&mut e.used_here, true);
            let unchecked: Vec<(usize, u32)> = (first..=last)
                .filter_map(|i| match e.blocks[i] {
                    Block::Unchecked(crc) => Some((i, crc)),
                    _ => None,
                })
                .collect();
            (e.data.clone(), unchecked, first_use.then(|| e.name.clone()))
        };
        if let Some(name) = first_use {
            self.touch(key, &name);
        }
        // Blocks to check are read whole, with the rest of the read, in one pass.
        let (from, to) = if unchecked.is_empty() {
            (offset, end)
        } else {
            (
                first as u64 * self.block,
                block_span(last, size, self.block).end,
            )
        };
        let len = (to - from) as usize;
        let read = match budget.and_then(|b| b.part_buffer_now(len)) {
            Some(mut reused) => reused.read_from(&file, from, len).map(|()| reused.freeze()),
            None => {
                let mut fresh = BytesMut::zeroed(len);
                file.read_exact_at(&mut fresh, from)
                    .map(|()| fresh.freeze())
            }
        };
        let buf = match read {
            Ok(buf) => buf,
            Err(e) => {
                tracing::warn!(
                    key,
                    "the read cache could not read its copy ({e}); reading from S3"
                );
                return None;
            }
        };
        for (i, crc) in unchecked {
            let span = block_span(i, size, self.block);
            let bytes = &buf[(span.start - from) as usize..(span.end - from) as usize];
            let good = crc32c::crc32c(bytes) == crc;
            self.mark_checked(key, etag, i, good);
            if !good {
                return None;
            }
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.hit_bytes.fetch_add(end - offset, Ordering::Relaxed);
        Some(buf.slice((offset - from) as usize..(end - from) as usize))
    }

    /// The data file of `key` at `etag`, if it holds the whole object and every block is
    /// trusted (written by this mount, checked since, or sealed): for a reader to be handed
    /// by the kernel. Counts as a use of the object (not as a passthrough open: see
    /// [`DiskCache::passthrough_opened`]).
    pub fn whole(&self, key: &str, etag: &str, size: u64) -> Option<Arc<std::fs::File>> {
        let (file, first_use) = {
            let mut st = super::lock(&self.state);
            let e = st.objects.get_mut(key)?;
            let trusted = e.blocks.iter().all(|b| matches!(b, Block::Good(_)));
            if e.etag != etag || e.size != size || size == 0 || !trusted {
                return None;
            }
            let first_use = !std::mem::replace(&mut e.used_here, true);
            (e.data.clone(), first_use.then(|| e.name.clone()))
        };
        // Only whole blocks are written, the last one last-byte included: the length checks
        // that no block was cut short by a full disk.
        if file.metadata().ok()?.len() != size {
            return None;
        }
        if let Some(name) = first_use {
            self.touch(key, &name);
        }
        Some(file)
    }

    /// Counts an open handed to the kernel.
    pub fn passthrough_opened(&self) {
        self.passthrough_opens.fetch_add(1, Ordering::Relaxed);
    }

    /// Brings the index's mtime up to date: the next mount orders objects by it.
    fn touch(&self, key: &str, name: &str) {
        let touched = std::fs::File::options()
            .write(true)
            .open(self.dir.join(format!("{name}.idx")))
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        if let Err(err) = touched {
            tracing::debug!(key, "cannot mark the read cache's index used: {err}");
        }
    }

    fn mark_checked(&self, key: &str, etag: &str, i: usize, good: bool) {
        let mut st = super::lock(&self.state);
        let Some(e) = st.objects.peek_mut(key).filter(|e| e.etag == etag) else {
            return;
        };
        let Block::Unchecked(crc) = e.blocks[i] else {
            return;
        };
        if good {
            e.blocks[i] = Block::Good(crc);
            return;
        }
        let span = block_span(i, e.size, self.block);
        let extra = e.extra();
        e.blocks[i] = Block::Missing;
        e.bytes -= span.end - span.start;
        let extra = e.extra() - extra;
        st.used -= span.end - span.start;
        st.extra += extra;
        st.dirty.insert(key.to_string());
        self.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            key,
            block = i,
            "a block of the read cache did not match its checksum; it is fetched again"
        );
    }

    /// Keeps the whole blocks of `data` (bytes `offset..` of `key` at `etag`, an object of
    /// `size` bytes) that are not here yet.
    pub fn insert(&self, key: &str, etag: &str, size: u64, offset: u64, data: &[u8]) {
        let now = self.started.elapsed().as_secs();
        if now < self.paused_until.load(Ordering::Relaxed) {
            return;
        }
        let end = offset + data.len() as u64;
        let first = offset.div_ceil(self.block) as usize;
        let count = block_count(size, self.block);
        let wanted: Vec<usize> = (first..count)
            .take_while(|&i| block_span(i, size, self.block).end <= end)
            .collect();
        if wanted.is_empty() {
            return;
        }
        let Some((file, missing)) = self.prepare(key, etag, size, &wanted) else {
            return;
        };
        // Runs of consecutive blocks go in one write each.
        let mut written = Vec::with_capacity(missing.len());
        let mut rest = &missing[..];
        while let Some(&first) = rest.first() {
            let run = rest
                .iter()
                .enumerate()
                .take_while(|&(n, &i)| i == first + n)
                .count();
            let (start, end) = (
                block_span(first, size, self.block).start,
                block_span(first + run - 1, size, self.block).end,
            );
            let bytes = &data[(start - offset) as usize..(end - offset) as usize];
            if let Err(e) = file.write_all_at(bytes, start) {
                let until = now + WRITE_PAUSE.as_secs();
                if self.paused_until.swap(until, Ordering::Relaxed) <= now {
                    tracing::warn!(
                        key,
                        dir = %self.dir.display(),
                        "the read cache could not write a block ({e}); it keeps nothing new for {}s, reads go on from S3",
                        WRITE_PAUSE.as_secs()
                    );
                }
                break;
            }
            for &i in &rest[..run] {
                let span = block_span(i, size, self.block);
                let bytes = &data[(span.start - offset) as usize..(span.end - offset) as usize];
                written.push((i, crc32c::crc32c(bytes)));
            }
            rest = &rest[run..];
        }
        let mut st = super::lock(&self.state);
        let mut added = 0;
        let mut unreserved = 0;
        if let Some(e) = st
            .objects
            .peek_mut(key)
            .filter(|e| Arc::ptr_eq(&e.data, &file))
        {
            let extra = e.extra();
            for (i, crc) in written {
                if e.blocks[i] == Block::Missing {
                    let span = block_span(i, size, self.block);
                    e.blocks[i] = Block::Good(crc);
                    e.bytes += span.end - span.start;
                    added += span.end - span.start;
                }
            }
            unreserved = extra - e.extra();
        }
        st.used += added;
        st.extra -= unreserved;
        if added > 0 {
            st.dirty.insert(key.to_string());
        }
        self.evict(&mut st, Some(key));
    }

    /// The data file of `key` at `etag` (made, or remade for a new version), and which of
    /// `wanted` it lacks and has room for.
    fn prepare(
        &self,
        key: &str,
        etag: &str,
        size: u64,
        wanted: &[usize],
    ) -> Option<(Arc<std::fs::File>, Vec<usize>)> {
        let mut st = super::lock(&self.state);
        let stale = st
            .objects
            .peek(key)
            .is_some_and(|e| e.etag != etag || e.size != size);
        if stale {
            if let Some(old) = st.objects.pop(key) {
                self.drop_entry(&mut st, &old);
            }
        }
        if st.objects.get(key).is_none() {
            let name = stem_of(key);
            let data = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(self.dir.join(format!("{name}.data")));
            let data = match data {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(key, "the read cache cannot make a file ({e})");
                    return None;
                }
            };
            // An object read from its start is likely read whole: its space is reserved at
            // once (beyond the file's end), so the file lies in few extents and a whole read
            // of it runs at the disk's sequential speed, whatever order its blocks come in.
            // Counted against the size until its blocks fill it.
            let reserved =
                if wanted.first() == Some(&0) && size >= RESERVE_FROM && size <= self.max_bytes / 4
                {
                    reserve(&data, size)
                } else {
                    0
                };
            st.extra += reserved;
            st.objects.put(
                key.to_string(),
                Entry {
                    name,
                    etag: etag.to_string(),
                    size,
                    blocks: vec![Block::Missing; block_count(size, self.block)],
                    data: Arc::new(data),
                    bytes: 0,
                    used_here: true,
                    sealed: false,
                    reserved,
                },
            );
            st.dirty.insert(key.to_string());
        }
        let e = st.objects.peek(key)?;
        // Room for what this object alone may hold: the whole cache at most.
        let mut room = self.max_bytes.saturating_sub(e.bytes);
        let missing = wanted
            .iter()
            .copied()
            .filter(|&i| e.blocks[i] == Block::Missing)
            .take_while(|&i| {
                let span = block_span(i, size, self.block);
                let len = span.end - span.start;
                let fits = len <= room;
                room = room.saturating_sub(len);
                fits
            })
            .collect();
        Some((e.data.clone(), missing))
    }

    /// Evicts least recently used objects, never `keep`, until the cache is within its size.
    fn evict(&self, st: &mut State, keep: Option<&str>) {
        while st.used + st.extra > self.max_bytes {
            let victim = st
                .objects
                .iter()
                .rev()
                .map(|(k, _)| k.clone())
                .find(|k| Some(k.as_str()) != keep);
            let Some(victim) = victim else { break };
            if let Some(old) = st.objects.pop(&victim) {
                self.drop_entry(st, &old);
                tracing::debug!(
                    key = victim,
                    bytes = old.bytes,
                    "evicted from the read cache"
                );
            }
        }
    }

    /// `old`, taken out of `st.objects`, leaves the counts and the disk.
    fn drop_entry(&self, st: &mut State, old: &Entry) {
        st.used -= old.bytes;
        st.extra -= old.extra();
        for ext in ["idx", "data"] {
            let _ = std::fs::remove_file(self.dir.join(format!("{}.{ext}", old.name)));
        }
    }

    /// Writes the indexes that are behind (each to a temporary name, then renamed); with
    /// `seal` (at unmount), also seals every index not sealed yet: its data file is synced
    /// first, and the index records the file as it is after the sync.
    pub fn flush(&self, seal: bool) {
        let pending: Vec<(String, String, Arc<std::fs::File>, serde_json::Value, bool)> = {
            let mut st = super::lock(&self.state);
            let b64 = base64::engine::general_purpose::STANDARD;
            let mut keys: std::collections::HashSet<String> = st.dirty.drain().collect();
            if seal {
                keys.extend(
                    st.objects
                        .iter()
                        .filter(|(_, e)| !e.sealed && e.sealable())
                        .map(|(k, _)| k.clone()),
                );
            }
            let mut pending = Vec::with_capacity(keys.len());
            for key in keys {
                let Some(e) = st.objects.peek_mut(&key) else {
                    continue;
                };
                e.sealed = false;
                let mut present = vec![0u8; e.blocks.len().div_ceil(8)];
                let mut crcs = Vec::with_capacity(4 * e.blocks.len());
                for (i, b) in e.blocks.iter().enumerate() {
                    let crc = match b {
                        Block::Missing => 0,
                        Block::Unchecked(c) | Block::Good(c) => {
                            present[i / 8] |= 1 << (i % 8);
                            *c
                        }
                    };
                    crcs.extend_from_slice(&crc.to_le_bytes());
                }
                let index = serde_json::json!({
                    "key": key,
                    "etag": e.etag,
                    "size": e.size,
                    "block": self.block,
                    "present": b64.encode(&present),
                    "crc": b64.encode(&crcs),
                });
                let seal = seal && e.sealable();
                pending.push((key, e.name.clone(), e.data.clone(), index, seal));
            }
            pending
        };
        for (key, name, data, mut index, seal) in pending {
            let sealed = seal
                .then(|| data.sync_data().and_then(|()| data.metadata()))
                .and_then(|r| match r {
                    Ok(meta) => Some(Seal::of(&meta)),
                    Err(e) => {
                        tracing::warn!(key, "cannot sync the read cache's copy ({e}); its blocks are checked when next read");
                        None
                    }
                });
            if let Some(s) = &sealed {
                index["sealed"] = s.to_json();
            }
            let tmp = self.dir.join(format!("{name}.idx.tmp"));
            let done = std::fs::write(&tmp, index.to_string())
                .and_then(|()| std::fs::rename(&tmp, self.dir.join(format!("{name}.idx"))));
            match done {
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), "cannot write an index of the read cache ({e})")
                }
                Ok(()) if sealed.is_some() => {
                    // Unless blocks came meanwhile (they will be indexed, unsealed, next time).
                    let mut st = super::lock(&self.state);
                    if !st.dirty.contains(&key) {
                        if let Some(e) = st
                            .objects
                            .peek_mut(&key)
                            .filter(|e| Arc::ptr_eq(&e.data, &data))
                        {
                            e.sealed = true;
                        }
                    }
                }
                Ok(()) => {}
            }
        }
    }

    pub fn stats(&self) -> DiskCacheStats {
        let st = super::lock(&self.state);
        DiskCacheStats {
            used_bytes: st.used,
            max_bytes: self.max_bytes,
            objects: st.objects.len() as u64,
            hits: self.hits.load(Ordering::Relaxed),
            hit_bytes: self.hit_bytes.load(Ordering::Relaxed),
            corrupt_blocks: self.corrupt.load(Ordering::Relaxed),
            passthrough_opens: self.passthrough_opens.load(Ordering::Relaxed),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whole objects are to be handed to the kernel (`--cache-passthrough`).
    pub fn passthrough(&self) -> bool {
        self.passthrough
    }
}

/// Objects smaller than this are not reserved ahead: their few blocks are written together.
const RESERVE_FROM: u64 = 4 << 20;

/// Reserves `size` bytes of disk for `file` past its end (`FALLOC_FL_KEEP_SIZE`: its length,
/// which tells how far blocks were written, does not change); how many, 0 where the
/// filesystem cannot.
fn reserve(file: &std::fs::File, size: u64) -> u64 {
    use std::os::fd::AsRawFd;
    let Ok(len) = libc::off_t::try_from(size) else {
        return 0;
    };
    // SAFETY: fallocate on a descriptor this function borrows; no memory is passed.
    let done = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len) };
    if done == 0 {
        size
    } else {
        tracing::debug!(
            "the read cache cannot reserve space ({})",
            std::io::Error::last_os_error()
        );
        0
    }
}

/// What a sealed index records of its data file, as it was after the sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seal {
    ino: u64,
    ctime_ns: i128,
    len: u64,
}

impl Seal {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            ino: meta.ino(),
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
            len: meta.len(),
        }
    }

    fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "ino": self.ino,
            "ctime_ns": self.ctime_ns.to_string(),
            "len": self.len,
        })
    }

    fn from_json(v: &serde_json::Value) -> Option<Self> {
        Some(Self {
            ino: v.get("ino")?.as_u64()?,
            ctime_ns: v.get("ctime_ns")?.as_str()?.parse().ok()?,
            len: v.get("len")?.as_u64()?,
        })
    }
}

fn stem_of(key: &str) -> String {
    hex::encode(&sha2::Sha256::digest(key.as_bytes())[..16])
}

fn block_count(size: u64, block: u64) -> usize {
    size.div_ceil(block) as usize
}

fn block_span(i: usize, size: u64, block: u64) -> std::ops::Range<u64> {
    let start = i as u64 * block;
    start..(start + block).min(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = 4096;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn open(dir: &Path, max: u64) -> DiskCache {
        let cfg = DiskCacheConfig {
            dir: dir.to_path_buf(),
            max_bytes: max,
            passthrough: false,
        };
        DiskCache::open(&cfg, "b", "p/", B).unwrap()
    }

    #[test]
    fn whole_blocks_are_kept_and_served_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let obj = data(10_000); // blocks of 4096, 4096 and 1808
        {
            let c = open(dir.path(), 1 << 20);
            // A piece that starts mid-block keeps only the whole blocks after it.
            c.insert("k", "e1", 10_000, 100, &obj[100..8192]);
            assert_eq!(
                c.read("k", "e1", 10_000, 4096, 8192, None).as_deref(),
                Some(&obj[4096..8192])
            );
            assert_eq!(
                c.read("k", "e1", 10_000, 0, 10, None),
                None,
                "block 0 was not whole"
            );
            c.insert("k", "e1", 10_000, 0, &obj);
            assert_eq!(
                c.read("k", "e1", 10_000, 0, 10_000, None).as_deref(),
                Some(&obj[..])
            );
            assert_eq!(c.stats().used_bytes, 10_000);
            c.flush(false);
        }
        let c = open(dir.path(), 1 << 20);
        assert_eq!(c.stats().used_bytes, 10_000);
        assert_eq!(
            c.read("k", "e1", 10_000, 5000, 9999, None).as_deref(),
            Some(&obj[5000..9999])
        );
        assert_eq!(
            c.read("k", "e2", 10_000, 0, 10, None),
            None,
            "another version"
        );
    }

    #[test]
    fn a_new_version_replaces_the_old_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path(), 1 << 20);
        c.insert("k", "e1", 8192, 0, &data(8192));
        let newer = vec![9u8; 8192];
        c.insert("k", "e2", 8192, 0, &newer);
        assert_eq!(c.read("k", "e1", 8192, 0, 8192, None), None);
        assert_eq!(
            c.read("k", "e2", 8192, 0, 8192, None).as_deref(),
            Some(&newer[..])
        );
        assert_eq!(c.stats().used_bytes, 8192);
    }

    #[test]
    fn a_block_whose_bytes_changed_on_disk_is_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let obj = data(8192);
        {
            let c = open(dir.path(), 1 << 20);
            c.insert("k", "e", 8192, 0, &obj);
            c.flush(false);
        }
        let file = std::fs::read_dir(dir.path().join(format!(
            "b-{}",
            hex::encode(&sha2::Sha256::digest(b"p/")[..8])
        )))
        .unwrap()
        .flatten()
        .find(|f| f.file_name().to_string_lossy().ends_with(".data"))
        .unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(file.path())
            .unwrap();
        f.write_all_at(b"X", 5000).unwrap();
        let c = open(dir.path(), 1 << 20);
        assert_eq!(
            c.read("k", "e", 8192, 0, 100, None).as_deref(),
            Some(&obj[..100]),
            "block 0 is intact"
        );
        assert_eq!(
            c.read("k", "e", 8192, 4096, 8192, None),
            None,
            "block 1 is not"
        );
        assert_eq!(c.stats().corrupt_blocks, 1);
        assert_eq!(c.stats().used_bytes, 4096);
        c.insert("k", "e", 8192, 4096, &obj[4096..]);
        assert_eq!(
            c.read("k", "e", 8192, 0, 8192, None).as_deref(),
            Some(&obj[..])
        );
    }

    #[test]
    fn a_sealed_cache_is_trusted_whole_by_the_next_mount_unless_its_file_changed() {
        let dir = tempfile::tempdir().unwrap();
        let obj = data(10_000);
        {
            let c = open(dir.path(), 1 << 20);
            assert!(c.whole("k", "e", 10_000).is_none(), "nothing yet");
            c.insert("k", "e", 10_000, 0, &obj[..8192]);
            assert!(c.whole("k", "e", 10_000).is_none(), "not whole");
            c.insert("k", "e", 10_000, 8192, &obj[8192..]);
            assert!(c.whole("k", "e", 10_000).is_some(), "written here");
            assert!(c.whole("k", "other", 10_000).is_none(), "another version");
            c.flush(false);
        }
        {
            // A mount that did not read them cannot vouch for them at its unmount.
            let c = open(dir.path(), 1 << 20);
            c.flush(true);
        }
        {
            // Not sealed (as after a crash): checked block by block first.
            let c = open(dir.path(), 1 << 20);
            assert!(c.whole("k", "e", 10_000).is_none());
            assert_eq!(
                c.read("k", "e", 10_000, 0, 10_000, None).as_deref(),
                Some(&obj[..])
            );
            assert!(c.whole("k", "e", 10_000).is_some(), "checked since");
            c.flush(true);
        }
        {
            let c = open(dir.path(), 1 << 20);
            let file = c.whole("k", "e", 10_000).expect("sealed");
            let mut back = vec![0u8; 10_000];
            file.read_exact_at(&mut back, 0).unwrap();
            assert_eq!(back, obj);
            // Blocks that come after the seal unseal it until the next.
            c.insert("k2", "e", 4096, 0, &obj[..4096]);
            c.flush(true);
        }
        // A byte changed after the seal, its mtime put back: the ctime still moved.
        let path = dir.path().join(format!(
            "b-{}/{}.data",
            hex::encode(&sha2::Sha256::digest(b"p/")[..8]),
            stem_of("k")
        ));
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"X", 5000).unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        let c = open(dir.path(), 1 << 20);
        assert!(
            c.whole("k", "e", 10_000).is_none(),
            "changed since the seal"
        );
        assert_eq!(c.read("k", "e", 10_000, 4096, 8192, None), None);
        assert_eq!(c.stats().corrupt_blocks, 1);
        assert!(c.whole("k2", "e", 4096).is_some(), "k2 was sealed too");
    }

    #[test]
    fn least_recently_used_objects_go_first_and_the_size_holds() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path(), 3 * B);
        for k in ["a", "b", "c"] {
            c.insert(k, "e", B, 0, &data(B as usize));
        }
        assert!(
            c.read("a", "e", B, 0, 1, None).is_some(),
            "a is now the most recent"
        );
        c.insert("d", "e", B, 0, &data(B as usize));
        assert!(
            c.read("b", "e", B, 0, 1, None).is_none(),
            "b was the least recently used"
        );
        for k in ["a", "c", "d"] {
            assert!(c.read(k, "e", B, 0, 1, None).is_some(), "{k} stays");
        }
        // An object larger than the cache keeps what fits.
        let big = data(5 * B as usize);
        c.insert("big", "e", 5 * B, 0, &big);
        let s = c.stats();
        assert!(s.used_bytes <= 3 * B, "{s:?}");
        assert_eq!(
            c.read("big", "e", 5 * B, 0, 3 * B, None).as_deref(),
            Some(&big[..3 * B as usize])
        );
        assert!(c.read("big", "e", 5 * B, 3 * B, 4 * B, None).is_none());
    }

    #[test]
    fn what_a_mount_read_outlives_what_it_did_not_in_the_next_mount() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = open(dir.path(), 1 << 20);
            c.insert("a", "e", B, 0, &data(B as usize));
            c.flush(false);
            std::thread::sleep(std::time::Duration::from_millis(20));
            c.insert("b", "e", B, 0, &data(B as usize));
            c.flush(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        {
            // Written before b, but read since.
            let c = open(dir.path(), 1 << 20);
            assert!(c.read("a", "e", B, 0, 1, None).is_some());
        }
        let c = open(dir.path(), 2 * B);
        c.insert("c", "e", B, 0, &data(B as usize));
        assert!(
            c.read("b", "e", B, 0, 1, None).is_none(),
            "b was the least recently used"
        );
        assert!(c.read("a", "e", B, 0, 1, None).is_some());
    }

    #[test]
    fn a_second_mount_of_the_same_bucket_and_prefix_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open(dir.path(), 1 << 20);
        let cfg = DiskCacheConfig {
            dir: dir.path().to_path_buf(),
            max_bytes: 1 << 20,
            passthrough: false,
        };
        let err = DiskCache::open(&cfg, "b", "p/", B).err().unwrap();
        assert!(err.contains("in use by another s3mount"), "{err}");
        assert!(
            DiskCache::open(&cfg, "b", "other/", B).is_ok(),
            "another prefix has its own"
        );
    }
}
