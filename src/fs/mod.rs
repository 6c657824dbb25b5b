//! The filesystem core: [`S3Filesystem`], generic over [`ObjectClient`].
//!
//! It answers the questions FUSE asks (look up a name, list a directory, read a file) with S3
//! requests and plain structs; it never sees fuser's reply types or HTTP, so it is tested over
//! the in-memory mock without FUSE (`src/fuse.rs` is the thin adapter).
//!
//! **Names to keys.** A directory is a key prefix ending in `/`. It exists if any key starts with
//! it: a zero-byte `dir/` marker object, or only deeper keys (an implicit directory). A lookup of
//! `name` in a directory sends HeadObject on `prefix+name` and a one-key ListObjectsV2 on
//! `prefix+name/` at the same time; if the listing finds anything, the name is a directory,
//! which shadows a file of the same name. A directory listing is ListObjectsV2 with delimiter
//! `/`, paged; its entries carry size and time from the listing, so `ls -l` of a large directory
//! sends no HEAD per entry. Keys that cannot be file names (empty segments as in `a//b`, `.`,
//! `..`, names over 255 bytes) are skipped with one warning each.
//!
//! **Caching.** Attributes, directory entries and negative lookups are kept for the metadata TTL
//! (`--metadata-ttl`, default 1 s; 0 disables caching), and the kernel is told the same TTL.
//! Objects changed by other clients are seen once it has passed. Expired entries are renewed in
//! bulk: one listing of their directory (recursive when the subtree fits in a page) confirms
//! every known inode it shows unchanged, by ETag and `Last-Modified`; the rest are looked up
//! one by one.
//!
//! **Attributes.** Size and mtime come from S3 (`Last-Modified`); objects written by s3fs-fuse
//! or by s3mount carry `x-amz-meta-mode`, `-uid`, `-gid` and `-mtime`, which win when present
//! (they are read on lookup, which sends HeadObject; listings do not carry them).

pub mod attributes;
pub mod content_type;
pub mod copy;
pub mod disk_cache;
pub mod error;
pub mod files;
pub mod get;
mod growth;
pub mod inode;
pub mod journal;
pub mod local_copy;
pub mod memory;
pub mod namespace;
mod queue_log;
pub mod read;
pub mod write;
pub mod writeback;
pub mod xattr;

pub use attributes::{Caller, SetAttr};
pub use files::WrittenNow;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::s3::ObjectClient;
use attributes::Deferred;
use error::{FsError, FsResult};
use files::Handles;
use inode::{Ino, Inode, Kind, ROOT_INO};
use namespace::Namespace;
use read::{BlockCache, MemoryBudget, ReadConfig, ReadContext, ReadHandle};
use write::{WriteConfig, WriteContext, WriteHandle};

/// The longest file name Linux accepts.
pub const MAX_NAME_LEN: usize = 255;
/// The longest object key S3 accepts, in bytes (mount prefix included).
pub const MAX_KEY_LEN: usize = 1024;
/// Directories with at most this many entries get their files' s3fs metadata (HeadObject, in
/// parallel) when listed; larger ones show the listing's attributes.
pub const METADATA_LISTING_LIMIT: usize = 1000;
/// How long after the last `chmod`, `chown` or `utimens` of a closed file its attributes are
/// stored in S3 (one copy for several changes, none when a rename follows).
pub const METADATA_WRITE_DELAY: Duration = Duration::from_millis(100);
/// Under relatime, an access moves atime at least this long after the last one.
pub const RELATIME_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// When reads move a file's atime (the mount options `relatime`, `strictatime`, `noatime`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AtimeMode {
    /// When atime is older than mtime or ctime, or a day old (Linux's default).
    #[default]
    Relatime,
    /// At every open for reading.
    Strict,
    /// Never.
    Off,
}

/// The block size reported to `stat` and `statfs`.
pub const BLOCK_SIZE: u32 = 4096;

#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Key prefix of the mount's root: empty or ending in `/`.
    pub prefix: String,
    pub read_only: bool,
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    pub metadata_ttl: Duration,
    /// All read buffers together stay under this many bytes.
    pub max_memory: u64,
    pub read: ReadConfig,
    pub write: WriteConfig,
    /// Where the journal of uploads in progress lives; `None` keeps none.
    pub journal_dir: Option<std::path::PathBuf>,
    /// The `Content-Type` of new files, from their names.
    pub content_types: content_type::ContentTypes,
    pub atime: AtimeMode,
    /// Durable write-back (`--write-back`), if on.
    pub write_back: Option<writeback::WriteBackConfig>,
    /// The persistent read cache (`--cache`), if on; opened by the mount
    /// ([`S3Filesystem::with_read_cache`]).
    pub read_cache: Option<disk_cache::DiskCacheConfig>,
}

impl Default for FsConfig {
    fn default() -> Self {
        Self {
            prefix: String::new(),
            read_only: false,
            uid: 0,
            gid: 0,
            file_mode: 0o644,
            dir_mode: 0o755,
            metadata_ttl: Duration::from_secs(1),
            max_memory: 256 * 1024 * 1024,
            read: ReadConfig::default(),
            write: WriteConfig::default(),
            journal_dir: None,
            content_types: content_type::ContentTypes::default(),
            atime: AtimeMode::default(),
            write_back: None,
            read_cache: None,
        }
    }
}

/// Attributes as the kernel wants them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub atime: SystemTime,
    /// Permission bits only (no file type).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    /// Links: 0 once unlinked while open; a directory's 2 plus its known subdirectories.
    pub nlink: u32,
    /// A device's number (0 for everything else).
    pub rdev: u32,
}

/// One entry of a directory listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: String,
    pub attr: Attr,
}

/// What `statfs` reports: S3 has no capacity, so a large fixed size.
#[derive(Debug, Clone, Copy)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// Counters for `--debug` logs and benchmarks.
#[derive(Debug, Default)]
pub struct FsStats {
    pub lookups: AtomicU64,
    pub listings: AtomicU64,
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
}

/// An open file: read handles pin an ETag; write handles share one spool per inode.
pub(crate) enum OpenFile<C> {
    Read(Arc<ReadHandle<C>>),
    Write {
        ino: Ino,
        writer: Arc<WriteHandle<C>>,
        /// The process that opened it, when known: only its closes commit (see
        /// `S3Filesystem::flush_by`).
        opener: Option<u32>,
    },
}

impl<C> Clone for OpenFile<C> {
    fn clone(&self) -> Self {
        match self {
            OpenFile::Read(h) => OpenFile::Read(h.clone()),
            OpenFile::Write {
                ino,
                writer,
                opener,
            } => OpenFile::Write {
                ino: *ino,
                writer: writer.clone(),
                opener: *opener,
            },
        }
    }
}

/// The core: the client and settings, and the parts it is composed of. Its methods are
/// `impl` blocks by subsystem: namespace.rs (names, listings, rename), files.rs (open files),
/// attributes.rs (s3fs attributes and their deferred store).
pub struct S3Filesystem<C> {
    client: Arc<C>,
    config: FsConfig,
    ns: Namespace,
    handles: Handles<C>,
    deferred: Deferred,
    read_ctx: ReadContext<C>,
    write_ctx: WriteContext<C>,
    stats: FsStats,
    mounted_at: SystemTime,
    /// The write-back queue (`--write-back`), if on.
    queue: Option<Arc<writeback::Queue>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f`, blocking local file I/O (spool, local copies, journal), without stalling the
/// async workers: on the mount's multi-threaded runtime the worker first hands its other tasks
/// to another thread (`block_in_place`); on a single-threaded runtime (core tests) it just
/// runs. Bulk copies that need not be waited for go to `spawn_blocking` instead.
pub(crate) fn local_io<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The directory of one bucket and prefix under `root`: `BUCKET-TAG`, TAG a hash of the
/// prefix (the upload journal, the write-back queue and the read cache each keep one).
pub fn bucket_dir(root: &std::path::Path, bucket: &str, prefix: &str) -> std::path::PathBuf {
    let tag = hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(prefix.as_bytes())[..8]);
    root.join(format!("{bucket}-{tag}"))
}

/// The directory of one bucket and prefix under `root` (made if needed), with the flock that
/// keeps every other mount of them out for as long as the file is held. `Ok(None)`: another
/// mount holds it.
pub(crate) fn locked_dir(
    root: &std::path::Path,
    bucket: &str,
    prefix: &str,
) -> Result<Option<(std::path::PathBuf, std::fs::File)>, String> {
    use std::os::fd::AsRawFd;
    let dir = bucket_dir(root, bucket, prefix);
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot make the cache directory {}: {e}", dir.display()))?;
    let lock_path = dir.join("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Ok(None);
    }
    Ok(Some((dir, lock)))
}

/// Whether a key segment can be a file name here.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= MAX_NAME_LEN
        && !name.contains('\0')
}

impl<C: ObjectClient> S3Filesystem<C> {
    pub fn new(client: Arc<C>, mut config: FsConfig) -> Self {
        if !config.prefix.is_empty() && !config.prefix.ends_with('/') {
            config.prefix.push('/');
        }
        // One eighth of the memory for the random-read block cache, at most one eighth for the
        // connections of GETs, the rest for prefetch and part buffers.
        let cache_blocks = (config.max_memory / 8 / config.read.block_size.max(1)) as usize;
        let gets = get::read_connections(config.max_memory);
        let connections = gets as u64 * get::CONNECTION_MEMORY;
        let read_ctx = ReadContext {
            client: client.clone(),
            budget: Arc::new(MemoryBudget::new(
                config
                    .max_memory
                    .saturating_sub(config.max_memory / 8 + connections),
            )),
            blocks: Arc::new(BlockCache::new(cache_blocks)),
            config: config.read.clone(),
            disk: None,
            first_byte: Default::default(),
            gets: Arc::new(tokio::sync::Semaphore::new(gets)),
        };
        let journal =
            config.journal_dir.clone().and_then(|dir| {
                match journal::UploadJournal::open(dir.clone()) {
                    Ok(j) => Some(Arc::new(j)),
                    Err(e) => {
                        tracing::warn!("no upload journal at {}: {e}", dir.display());
                        None
                    }
                }
            });
        let write_ctx = WriteContext {
            client: client.clone(),
            config: config.write.clone(),
            journal,
            budget: read_ctx.budget.clone(),
            gets: read_ctx.gets.clone(),
            offline: Default::default(),
            spools: Default::default(),
        };
        Self {
            ns: Namespace::new(&config.prefix),
            handles: Handles::new(),
            deferred: Deferred::default(),
            client,
            config,
            read_ctx,
            write_ctx,
            stats: FsStats::default(),
            mounted_at: SystemTime::now(),
            queue: None,
        }
    }

    /// Aborts the multipart uploads left unfinished (by an earlier s3mount, or by a failed
    /// close) that were not resumed within the resume window, and those whose ids were never
    /// learnt; returns how many.
    pub async fn recover_uploads(&self) -> usize {
        match &self.write_ctx.journal {
            Some(j) => {
                j.recover(&*self.client, self.config.write.resume_window)
                    .await
            }
            None => 0,
        }
    }

    /// The interrupted uploads a write of the same file would resume.
    pub fn resumable_uploads(&self) -> Vec<journal::ResumableInfo> {
        self.write_ctx
            .journal
            .as_ref()
            .map(|j| j.list_resumable())
            .unwrap_or_default()
    }

    /// Aborts the resumable uploads of `key` (all of them for `None`); returns how many went.
    pub async fn abort_resumable(&self, key: Option<&str>) -> usize {
        match &self.write_ctx.journal {
            Some(j) => {
                j.abort_resumable(&*self.client, |k, _| key.is_none_or(|want| want == k))
                    .await
            }
            None => 0,
        }
    }

    /// Reads keep what they fetch in `cache` and are served from it (`--cache`).
    pub fn with_read_cache(mut self, cache: disk_cache::DiskCache) -> Self {
        self.read_ctx.disk = Some(Arc::new(cache));
        self
    }

    /// The persistent read cache's counters, if it is on.
    pub fn read_cache_stats(&self) -> Option<disk_cache::DiskCacheStats> {
        self.read_ctx.disk.as_ref().map(|d| d.stats())
    }

    /// Writes the read cache's indexes that are behind, off the async workers; with `seal`
    /// (at unmount), seals them (see [`disk_cache`]).
    pub(super) async fn flush_read_cache(&self, seal: bool) {
        if let Some(disk) = self.read_ctx.disk.clone() {
            let _ = tokio::task::spawn_blocking(move || disk.flush(seal)).await;
        }
    }

    /// The read cache's data file of the object open for reading as `fh`, if it holds the
    /// whole object and can be handed to the kernel (see [`disk_cache::DiskCache::whole`]).
    pub fn whole_in_cache(&self, fh: u64) -> Option<Arc<std::fs::File>> {
        let disk = self.read_ctx.disk.as_ref()?;
        let handle = self.read_handle(fh)?;
        disk.whole(&handle.key, &handle.etag, handle.size)
    }

    /// Counts an open of the read cache's file handed to the kernel.
    pub fn passthrough_opened(&self) {
        if let Some(disk) = &self.read_ctx.disk {
            disk.passthrough_opened();
        }
    }

    /// The ETag an open file handle reads, if it is open for reading only.
    pub fn read_version(&self, fh: u64) -> Option<String> {
        self.read_handle(fh).map(|handle| handle.etag.clone())
    }

    /// The read handle of file handle `fh`, if it is open for reading only.
    pub(super) fn read_handle(&self, fh: u64) -> Option<Arc<ReadHandle<C>>> {
        match lock(&self.handles.files).get(&fh) {
            Some(OpenFile::Read(handle)) => Some(handle.clone()),
            _ => None,
        }
    }

    /// Whole objects of the read cache are to be handed to the kernel
    /// (`--cache-passthrough`).
    pub fn cache_passthrough(&self) -> bool {
        self.read_ctx.disk.as_ref().is_some_and(|d| d.passthrough())
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    pub fn stats(&self) -> &FsStats {
        &self.stats
    }

    /// The S3 key of inode `ino`, if the inode is known (for `s3mount status`).
    pub fn key_of(&self, ino: Ino) -> Option<String> {
        self.ns.inodes.get(ino).map(|inode| inode.key())
    }

    pub fn memory_in_use(&self) -> u64 {
        self.read_ctx.budget.in_use_bytes()
    }

    /// Part buffers kept for reuse are freed once unused for a few seconds.
    pub fn start_memory_trim(&self, rt: &tokio::runtime::Handle) {
        self.read_ctx.budget.start_trim(rt);
    }

    pub fn ttl(&self) -> Duration {
        self.config.metadata_ttl
    }

    fn inode(&self, ino: Ino) -> FsResult<Arc<Inode>> {
        self.ns.inodes.get(ino).ok_or(FsError::NotFound)
    }

    fn dir_inode(&self, ino: Ino) -> FsResult<Arc<Inode>> {
        let inode = self.inode(ino)?;
        if inode.kind != Kind::Directory {
            return Err(FsError::NotADirectory);
        }
        Ok(inode)
    }

    /// The permissions of an object that has no `x-amz-meta-mode`.
    fn default_perm(&self, kind: Kind) -> u16 {
        match kind {
            Kind::Directory => self.config.dir_mode,
            Kind::File | Kind::Special(_) => self.config.file_mode,
            Kind::Symlink => 0o777,
        }
    }

    pub fn attr_of(&self, inode: &Inode) -> Attr {
        let (mut stat, unlinked, entries_changed) = {
            let s = inode.lock();
            (s.stat.clone(), s.unlinked, s.entries_changed_at)
        };
        if let Some(t) = entries_changed {
            stat.mtime = stat.mtime.max(t);
            stat.ctime = Some(stat.ctime.unwrap_or(stat.mtime).max(t));
        }
        let default_perm = self.default_perm(inode.kind);
        let nlink = match inode.kind {
            _ if unlinked => 0,
            Kind::Directory => 2 + self.ns.inodes.subdirectories(inode.ino),
            _ => 1,
        };
        Attr {
            ino: inode.ino,
            kind: inode.kind,
            size: stat.size,
            mtime: stat.mtime,
            ctime: stat.ctime.unwrap_or(stat.mtime),
            atime: stat.atime.unwrap_or(stat.mtime),
            perm: stat.mode.map_or(default_perm, |m| (m & 0o7777) as u16),
            uid: stat.uid.unwrap_or(self.config.uid),
            gid: stat.gid.unwrap_or(self.config.gid),
            nlink,
            rdev: stat.rdev.unwrap_or(0),
        }
    }

    pub fn statfs(&self) -> Statfs {
        Statfs {
            blocks: 1 << 40,
            bfree: 1 << 40,
            files: 1 << 32,
            ffree: 1 << 32,
            bsize: BLOCK_SIZE,
            namelen: MAX_NAME_LEN as u32,
        }
    }

    pub fn root_ino(&self) -> Ino {
        ROOT_INO
    }
}

#[cfg(test)]
mod tests;
