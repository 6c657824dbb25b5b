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

pub mod error;
pub mod inode;
pub mod journal;
pub mod local_copy;
pub mod memory;
pub mod mutate;
pub mod read;
pub mod write;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt;

use crate::s3::{ErrorKind, ListPage, ListRequest, ObjectClient, ObjectHead};
use error::{from_client, FsError, FsResult};
use inode::{Ino, Inode, InodeTable, Kind, Stat, ROOT_INO};
use read::{BlockCache, MemoryBudget, ReadConfig, ReadContext, ReadHandle};
use write::{WriteConfig, WriteHandle};

/// The longest file name Linux accepts.
pub const MAX_NAME_LEN: usize = 255;
/// The longest object key S3 accepts, in bytes (mount prefix included).
pub const MAX_KEY_LEN: usize = 1024;
/// Directories with at most this many entries get their files' s3fs metadata (HeadObject, in
/// parallel) when listed; larger ones show the listing's attributes.
pub const METADATA_LISTING_LIMIT: usize = 1000;
const METADATA_HEADS_AT_ONCE: usize = 32;
/// How long after the last `chmod`, `chown` or `utimens` of a closed file its attributes are
/// stored in S3 (one copy for several changes, none when a rename follows).
pub const METADATA_WRITE_DELAY: Duration = Duration::from_millis(100);
/// Entries a lookup's revalidation of a large directory lists (see
/// [`S3Filesystem::revalidate_children`]), and the size of a directory listing's first page:
/// enough for most directories in one request, and some servers (Garage) take several times
/// longer to answer for 1,000 keys, even when the directory has only a few.
const REVALIDATION_PAGE: u32 = 200;
/// The block size reported to `stat` and `statfs`.
pub const BLOCK_SIZE: u32 = 4096;

const S_IFMT: u32 = 0o170000;
const S_IFLNK: u32 = 0o120000;

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
    /// Permission bits only (no file type).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
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

struct DirHandle {
    entries: Arc<Vec<DirEntry>>,
}

/// A listing started ahead of its `opendir` (see [`S3Filesystem::prefetch_subdirectories`]):
/// when it was started, and its entries once done (`None` if it failed).
type PrefetchedListing = (
    Instant,
    // The directory's changes when it started: a listing older than a change is not used.
    u64,
    futures_util::future::Shared<
        futures_util::future::BoxFuture<'static, Option<Arc<Vec<DirEntry>>>>,
    >,
);

/// A revalidation of a directory's children (see [`S3Filesystem::revalidate_children`]): when
/// it started, and whether its listing worked once done.
type Revalidation = (Instant, Arc<tokio::sync::OnceCell<bool>>);

/// Subdirectories whose listings one `opendir` starts ahead.
const SUBDIRECTORIES_PREFETCHED: usize = 8;

/// An inode's write handle and how many descriptors have it open.
type SharedWriter<C> = (Arc<WriteHandle<C>>, usize);

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

pub struct S3Filesystem<C> {
    client: Arc<C>,
    config: FsConfig,
    inodes: InodeTable,
    negative: Mutex<HashMap<(Ino, String), Instant>>,
    files: Mutex<HashMap<u64, OpenFile<C>>>,
    /// The write handle of each inode open for writing, with its count of opens.
    writers: Mutex<HashMap<Ino, SharedWriter<C>>>,
    /// One lock per inode that is being changed (see `mutate::hold`).
    changing: Mutex<HashMap<Ino, Arc<tokio::sync::Mutex<()>>>>,
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    /// Listings of subdirectories started ahead, each used by at most one `opendir`.
    prefetched: Mutex<HashMap<Ino, PrefetchedListing>>,
    /// Directories whose children a lookup revalidated with one listing, since when, and
    /// whether it worked (see [`S3Filesystem::revalidate_children`]).
    revalidations: Mutex<HashMap<Ino, Revalidation>>,
    /// Closed files whose changed attributes S3 does not have yet, when they last changed, and
    /// the inode (kept even if the kernel forgets it meanwhile); see `defer_metadata`.
    pending_metadata: Mutex<HashMap<Ino, (Instant, Arc<Inode>)>>,
    /// Directories with more keys below them than one listing page: revalidated by their own
    /// entries only.
    large_trees: Mutex<HashSet<Ino>>,
    next_handle: AtomicU64,
    read_ctx: ReadContext<C>,
    journal: Option<Arc<journal::UploadJournal>>,
    warned_names: Mutex<std::collections::HashSet<String>>,
    stats: FsStats,
    mounted_at: SystemTime,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a key segment can be a file name here.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= MAX_NAME_LEN
        && !name.contains('\0')
}

fn parse_u32(value: Option<&String>) -> Option<u32> {
    value.and_then(|v| v.trim().parse().ok())
}

/// `x-amz-meta-mtime`: seconds since the epoch, possibly with a fraction.
fn parse_mtime(value: Option<&String>) -> Option<SystemTime> {
    let v = value?.trim();
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: u64 = secs.parse().ok()?;
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(9).collect();
        format!("{digits:0<9}").parse().ok()?
    };
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Attributes of an object from its HEAD: s3fs-style metadata wins over S3's own.
fn stat_of_head(head: &ObjectHead) -> (Kind, Stat) {
    let mode = parse_u32(head.metadata.get("mode"));
    let kind = if mode.is_some_and(|m| m & S_IFMT == S_IFLNK) {
        Kind::Symlink
    } else {
        Kind::File
    };
    let stat = Stat {
        size: head.size,
        mtime: parse_mtime(head.metadata.get("mtime")).unwrap_or(head.last_modified),
        etag: Some(head.etag.clone()),
        mode,
        uid: parse_u32(head.metadata.get("uid")),
        gid: parse_u32(head.metadata.get("gid")),
        s3_modified: Some(head.last_modified),
        listing_only: false,
    };
    (kind, stat)
}

impl<C: ObjectClient> S3Filesystem<C> {
    pub fn new(client: Arc<C>, mut config: FsConfig) -> Self {
        if !config.prefix.is_empty() && !config.prefix.ends_with('/') {
            config.prefix.push('/');
        }
        // One eighth of the memory for the random-read block cache, the rest for prefetch.
        let cache_blocks = (config.max_memory / 8 / config.read.block_size.max(1)) as usize;
        let read_ctx = ReadContext {
            client: client.clone(),
            budget: Arc::new(MemoryBudget::new(config.max_memory - config.max_memory / 8)),
            blocks: Arc::new(BlockCache::new(cache_blocks)),
            config: config.read.clone(),
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
        Self {
            journal,
            inodes: InodeTable::new(&config.prefix),
            client,
            config,
            negative: Mutex::new(HashMap::new()),
            files: Mutex::new(HashMap::new()),
            writers: Mutex::new(HashMap::new()),
            changing: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            prefetched: Mutex::new(HashMap::new()),
            revalidations: Mutex::new(HashMap::new()),
            pending_metadata: Mutex::new(HashMap::new()),
            large_trees: Mutex::new(HashSet::new()),
            next_handle: AtomicU64::new(1),
            read_ctx,
            warned_names: Mutex::new(Default::default()),
            stats: FsStats::default(),
            mounted_at: SystemTime::now(),
        }
    }

    /// Aborts multipart uploads an earlier s3mount left unfinished; returns how many.
    pub async fn recover_uploads(&self) -> usize {
        match &self.journal {
            Some(j) => j.recover(&*self.client).await,
            None => 0,
        }
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    pub fn stats(&self) -> &FsStats {
        &self.stats
    }

    /// The S3 key of inode `ino`, if the inode is known (for `s3mount status`).
    pub fn key_of(&self, ino: Ino) -> Option<String> {
        self.inodes.get(ino).map(|inode| inode.key())
    }

    pub fn memory_in_use(&self) -> u64 {
        self.read_ctx.budget.in_use_bytes()
    }

    pub fn ttl(&self) -> Duration {
        self.config.metadata_ttl
    }

    fn inode(&self, ino: Ino) -> FsResult<Arc<Inode>> {
        self.inodes.get(ino).ok_or(FsError::NotFound)
    }

    fn dir_inode(&self, ino: Ino) -> FsResult<Arc<Inode>> {
        let inode = self.inode(ino)?;
        if inode.kind != Kind::Directory {
            return Err(FsError::NotADirectory);
        }
        Ok(inode)
    }

    pub fn attr_of(&self, inode: &Inode) -> Attr {
        let stat = inode.stat();
        let default_perm = match inode.kind {
            Kind::Directory => self.config.dir_mode,
            Kind::File => self.config.file_mode,
            Kind::Symlink => 0o777,
        };
        Attr {
            ino: inode.ino,
            kind: inode.kind,
            size: stat.size,
            mtime: stat.mtime,
            perm: stat.mode.map_or(default_perm, |m| (m & 0o7777) as u16),
            uid: stat.uid.unwrap_or(self.config.uid),
            gid: stat.gid.unwrap_or(self.config.gid),
        }
    }

    /// This mount changed the entries of directory `dir`.
    fn entries_changed(&self, dir: Ino) {
        if let Some(d) = self.inodes.get(dir) {
            d.entries_changed();
        }
    }

    fn warn_skipped(&self, key: &str) {
        if lock(&self.warned_names).insert(key.to_string()) {
            tracing::warn!(key, "skipping a key that cannot be a file name (empty segment, '.', '..' or over 255 bytes)");
        }
    }

    fn warn_shadowed(&self, key: &str) {
        if lock(&self.warned_names).insert(key.to_string()) {
            tracing::warn!(
                key,
                "skipping an object hidden by a directory of the same name (keys below {key}/)"
            );
        }
    }

    /// Looks `name` up in `parent` and counts one kernel reference on the result.
    pub async fn lookup(&self, parent: Ino, name: &str) -> FsResult<Attr> {
        if name.len() > MAX_NAME_LEN {
            return Err(FsError::NameTooLong);
        }
        let inode = self.resolve(parent, name).await?;
        self.inodes.add_lookup(&inode);
        Ok(self.attr_of(&inode))
    }

    async fn resolve(&self, parent: Ino, name: &str) -> FsResult<Arc<Inode>> {
        let dir = self.dir_inode(parent)?;
        if !valid_name(name) {
            return Err(FsError::NotFound);
        }
        let ttl = self.config.metadata_ttl;
        // Refreshing a known inode waits for changes of it under way (a commit, a setattr), or
        // an older version read from S3 could overwrite what they just set.
        let mut _held = None;
        if let Some(child) = self.inodes.child(parent, name) {
            // A file open for writing is what we say it is: S3 has an older version, if any.
            if child.is_fresh() || lock(&self.writers).contains_key(&child.ino) {
                return Ok(child);
            }
            _held = Some(self.hold(child.ino).await);
            if child.is_fresh() {
                return Ok(child);
            }
            // One listing of the directory revalidates all the children it knows: a program
            // that stats every file of a tree (rsync, make) sends one request per directory
            // instead of two per file.
            if self.revalidate_children(&dir).await && child.is_fresh() {
                return Ok(child);
            }
        }
        let neg_key = (parent, name.to_string());
        if lock(&self.negative)
            .get(&neg_key)
            .is_some_and(|exp| *exp > Instant::now())
        {
            return Err(FsError::NotFound);
        }
        self.stats.lookups.fetch_add(1, Ordering::Relaxed);

        let key = format!("{}{name}", dir.key());
        if key.len() > MAX_KEY_LEN {
            return Err(FsError::NameTooLong);
        }
        let dir_prefix = format!("{key}/");
        let listing = ListRequest {
            prefix: &dir_prefix,
            delimiter: Some("/"),
            max_keys: Some(1),
            ..Default::default()
        };
        let (head, list) = tokio::join!(
            self.client.head_object(&key),
            self.client.list_objects(&listing)
        );
        let list = list.map_err(from_client)?;
        if !list.objects.is_empty() || !list.common_prefixes.is_empty() {
            if head.is_ok() {
                self.warn_shadowed(&key);
            }
            let marker = list.objects.first().filter(|o| o.key == dir_prefix);
            let mut stat = Stat::directory(marker.map_or(self.mounted_at, |o| o.last_modified));
            if marker.is_some() {
                // The marker carries the directory's mode, owner and mtime (s3fs-style), if any.
                if let Ok(head) = self.client.head_object(&dir_prefix).await {
                    let (_, meta) = stat_of_head(&head);
                    stat = Stat {
                        size: 0,
                        etag: None,
                        ..meta
                    };
                }
            }
            lock(&self.negative).remove(&neg_key);
            return Ok(self.inodes.upsert(&dir, name, Kind::Directory, stat, ttl));
        }
        match head {
            Ok(head) => {
                let (kind, stat) = stat_of_head(&head);
                lock(&self.negative).remove(&neg_key);
                Ok(self.inodes.upsert(&dir, name, kind, stat, ttl))
            }
            Err(e) if e.kind == ErrorKind::NoSuchKey => {
                self.inodes.remove_name(parent, name);
                if !ttl.is_zero() {
                    lock(&self.negative).insert(neg_key, Instant::now() + ttl);
                }
                Err(FsError::NotFound)
            }
            Err(e) => Err(from_client(e)),
        }
    }

    /// Revalidates the known children of `dir`, and their descendants, with one listing: the
    /// keys of the whole subtree when it fits in one page (recursive ListObjectsV2), else the
    /// first [`REVALIDATION_PAGE`] entries of `dir` itself (with delimiter). Each known inode
    /// the listing shows unchanged is confirmed (see [`Inode::confirm`]); changed, missing or
    /// unlisted ones stay stale, for a lookup of their own. Runs at most once per directory
    /// per TTL, shared by concurrent lookups. Returns false when the listing failed.
    async fn revalidate_children(&self, dir: &Arc<Inode>) -> bool {
        let ttl = self.config.metadata_ttl;
        if ttl.is_zero() {
            return false;
        }
        let done = {
            let mut revalidations = lock(&self.revalidations);
            revalidations.retain(|_, (started, _)| started.elapsed() < ttl);
            let (_, done) = revalidations
                .entry(dir.ino)
                .or_insert_with(|| (Instant::now(), Default::default()));
            done.clone()
        };
        *done
            .get_or_init(|| async {
                let dir_key = dir.key();
                let recursive = !lock(&self.large_trees).contains(&dir.ino);
                self.stats.listings.fetch_add(1, Ordering::Relaxed);
                let request = ListRequest {
                    prefix: &dir_key,
                    delimiter: (!recursive).then_some("/"),
                    max_keys: Some(if recursive { 1000 } else { REVALIDATION_PAGE }),
                    ..Default::default()
                };
                let page = match self.client.list_objects(&request).await {
                    Ok(page) => page,
                    Err(_) => return false,
                };
                if recursive && page.next_continuation_token.is_some() {
                    // Too large to list whole each time: its own entries from now on.
                    lock(&self.large_trees).insert(dir.ino);
                }
                self.confirm_listed(dir, &dir_key, &page, ttl);
                true
            })
            .await
    }

    /// Confirms the known inodes below `dir` that `page` (a listing of `dir_key`, with or
    /// without delimiter) shows unchanged.
    fn confirm_listed(&self, dir: &Arc<Inode>, dir_key: &str, page: &ListPage, ttl: Duration) {
        // Directories seen, as paths below `dir` ending in `/`: those of common prefixes and
        // every level of every key.
        let mut directories: HashSet<&str> = page
            .common_prefixes
            .iter()
            .filter_map(|p| p.strip_prefix(dir_key))
            .collect();
        for obj in &page.objects {
            let path = &obj.key[dir_key.len()..];
            directories.extend(path.match_indices('/').map(|(i, _)| &path[..=i]));
        }
        // What a later page could still hold: everything after the last entry.
        let last = page
            .objects
            .last()
            .map(|o| &o.key[dir_key.len()..])
            .max(page.common_prefixes.last().map(|p| &p[dir_key.len()..]))
            .unwrap_or("");
        let complete = page.next_continuation_token.is_none();
        // The inode at `path` (below `dir`), if known.
        let known = |path: &str| -> Option<Arc<Inode>> {
            let mut inode = dir.clone();
            for name in path.split('/') {
                inode = self.inodes.child(inode.ino, name)?;
            }
            Some(inode)
        };
        let expire = Instant::now() + ttl;
        for path in &directories {
            if let Some(child) = known(path.trim_end_matches('/')) {
                if child.kind == Kind::Directory {
                    child.lock().expiry = expire;
                }
            }
        }
        for obj in &page.objects {
            let path = &obj.key[dir_key.len()..];
            if path.is_empty() || path.ends_with('/') {
                continue; // a directory marker
            }
            // A file is one only if no directory of the same name shadows it, which a later
            // page could show unless this one went past where it would sort.
            let as_dir = format!("{path}/");
            let past = complete || (last > as_dir.as_str() && !last.starts_with(&as_dir));
            if !past || directories.contains(as_dir.as_str()) {
                continue;
            }
            let Some(child) = known(path) else {
                continue;
            };
            if child.kind != Kind::Directory {
                let listed = Stat {
                    size: obj.size,
                    etag: Some(obj.etag.clone()),
                    s3_modified: Some(obj.last_modified),
                    ..Stat::directory(obj.last_modified)
                };
                child.confirm(&listed, ttl);
            }
        }
    }

    pub fn forget(&self, ino: Ino, n: u64) {
        self.inodes.forget(ino, n);
        if self.inodes.get(ino).is_none() {
            lock(&self.changing).remove(&ino);
        }
    }

    /// The kernel took a reference through a readdirplus entry.
    pub fn entry_returned(&self, ino: Ino) {
        if let Some(inode) = self.inodes.get(ino) {
            self.inodes.add_lookup(&inode);
        }
    }

    pub async fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        let inode = self.inode(ino)?;
        let being_written = lock(&self.writers).contains_key(&ino);
        if being_written || inode.is_fresh() || inode.kind == Kind::Directory {
            if inode.kind == Kind::Directory && !inode.is_fresh() {
                let stat = inode.stat();
                inode.refresh(stat, self.config.metadata_ttl);
            }
            return Ok(self.attr_of(&inode));
        }
        // Not while a change of this inode is under way: a HEAD sent before it could land
        // after it and put the old attributes back.
        let _held = self.hold(ino).await;
        if inode.is_fresh() {
            return Ok(self.attr_of(&inode));
        }
        if let Some(parent) = self.inodes.get(inode.parent()) {
            if self.revalidate_children(&parent).await && inode.is_fresh() {
                return Ok(self.attr_of(&inode));
            }
        }
        self.refresh_from_s3(&inode).await
    }

    /// HEADs the object and caches what it says; the caller holds the inode (see `hold`).
    async fn refresh_from_s3(&self, inode: &Inode) -> FsResult<Attr> {
        match self.client.head_object(&inode.key()).await {
            Ok(head) => {
                let (_, stat) = stat_of_head(&head);
                inode.refresh(stat, self.config.metadata_ttl);
                Ok(self.attr_of(inode))
            }
            Err(e) => {
                if e.kind == ErrorKind::NoSuchKey {
                    {
                        let loc = inode.location();
                        self.inodes.remove_name(loc.parent, &loc.name);
                    }
                }
                Err(from_client(e))
            }
        }
    }

    /// Lists a directory whole (paged ListObjectsV2) and keeps the entries for `readdir`. A
    /// listing prefetched less than the metadata TTL ago is used instead, once.
    pub async fn opendir(&self, ino: Ino) -> FsResult<u64> {
        let dir = self.dir_inode(ino)?;
        let prefetched = lock(&self.prefetched).remove(&ino);
        let mut entries = None;
        if let Some((started, changes, listing)) = prefetched {
            if let Some(listed) = listing.await {
                if started.elapsed() < self.config.metadata_ttl && dir.changes() == changes {
                    entries = Some(listed);
                }
            }
        }
        let entries = match entries {
            Some(entries) => entries,
            None => Arc::new(self.list_dir(&dir).await?),
        };
        let entries = self.as_it_is_now(&dir, &entries);
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        lock(&self.dirs).insert(fh, Arc::new(DirHandle { entries }));
        Ok(fh)
    }

    /// Starts listing the first subdirectories of directory handle `fh` in the background:
    /// programs that walk a tree (find, du, rsync, ls -R) open them next, one after another,
    /// and would otherwise wait for one listing at a time.
    pub fn prefetch_subdirectories(self: &Arc<Self>, fh: u64)
    where
        C: 'static,
    {
        if self.config.metadata_ttl.is_zero() {
            return;
        }
        let Some(handle) = lock(&self.dirs).get(&fh).cloned() else {
            return;
        };
        let mut prefetched = lock(&self.prefetched);
        // Listings nobody opened in time are no use any more.
        let ttl = self.config.metadata_ttl;
        prefetched.retain(|_, (started, _, _)| started.elapsed() < ttl);
        let subdirectories = handle
            .entries
            .iter()
            .filter(|e| e.attr.kind == Kind::Directory)
            .take(SUBDIRECTORIES_PREFETCHED);
        for entry in subdirectories {
            let ino = entry.attr.ino;
            if prefetched.contains_key(&ino) {
                continue;
            }
            let Ok(dir) = self.dir_inode(ino) else {
                continue;
            };
            let changes = dir.changes();
            let fs = self.clone();
            let listing = async move { fs.list_dir(&dir).await.ok().map(Arc::new) }
                .boxed()
                .shared();
            // Driven by its own task, whether or not anyone opens the directory.
            tokio::spawn(listing.clone());
            prefetched.insert(ino, (Instant::now(), changes, listing));
        }
    }

    /// The entries of a listing of `dir` as this mount sees them now: each with its inode's
    /// current attributes (a file being written shows its size so far), and the files being
    /// written there that S3 does not have yet added.
    fn as_it_is_now(&self, dir: &Inode, listed: &[DirEntry]) -> Arc<Vec<DirEntry>> {
        let mut entries: BTreeMap<String, DirEntry> = listed
            .iter()
            .map(|e| {
                let attr = self
                    .inodes
                    .get(e.attr.ino)
                    .map_or_else(|| e.attr.clone(), |i| self.attr_of(&i));
                (
                    e.name.clone(),
                    DirEntry {
                        name: e.name.clone(),
                        attr,
                    },
                )
            })
            .collect();
        for inode in self.being_written_in(dir) {
            let name = inode.location().name;
            let attr = self.attr_of(&inode);
            entries.insert(name.clone(), DirEntry { name, attr });
        }
        Arc::new(entries.into_values().collect())
    }

    /// The files being written in `dir` and still linked there (not unlinked, not replaced).
    fn being_written_in(&self, dir: &Inode) -> Vec<Arc<Inode>> {
        let writing: Vec<Ino> = lock(&self.writers).keys().copied().collect();
        writing
            .into_iter()
            .filter_map(|ino| self.inodes.get(ino))
            .filter(|inode| {
                let loc = inode.location();
                loc.parent == dir.ino
                    && self
                        .inodes
                        .child(dir.ino, &loc.name)
                        .is_some_and(|c| c.ino == inode.ino)
            })
            .collect()
    }

    /// Whether `dir` has entries S3 may not show yet: files being written in it.
    fn has_local_entries(&self, dir: &Inode) -> bool {
        !self.being_written_in(dir).is_empty()
    }

    /// Lists `dir`; a listing during which this mount changed the directory is made again
    /// (once), so it does not show what the mount just removed.
    async fn list_dir(&self, dir: &Arc<Inode>) -> FsResult<Vec<DirEntry>> {
        let changes = dir.changes();
        let entries = self.list_dir_once(dir).await?;
        if dir.changes() == changes {
            return Ok(entries);
        }
        self.list_dir_once(dir).await
    }

    async fn list_dir_once(&self, dir: &Arc<Inode>) -> FsResult<Vec<DirEntry>> {
        let ttl = self.config.metadata_ttl;
        let mut found: BTreeMap<String, (Kind, Stat)> = BTreeMap::new();
        let mut token: Option<String> = None;
        let dir_key = dir.key();
        loop {
            self.stats.listings.fetch_add(1, Ordering::Relaxed);
            let page = self
                .client
                .list_objects(&ListRequest {
                    prefix: &dir_key,
                    delimiter: Some("/"),
                    continuation_token: token.as_deref(),
                    // A small first page for small directories, then full pages.
                    max_keys: token.is_none().then_some(REVALIDATION_PAGE),
                    ..Default::default()
                })
                .await
                .map_err(from_client)?;
            for obj in page.objects {
                let name = &obj.key[dir_key.len()..];
                if name.is_empty() {
                    continue; // the directory's own marker
                }
                if !valid_name(name) {
                    self.warn_skipped(&obj.key);
                    continue;
                }
                let stat = Stat {
                    size: obj.size,
                    mtime: obj.last_modified,
                    etag: Some(obj.etag),
                    mode: None,
                    uid: None,
                    gid: None,
                    s3_modified: Some(obj.last_modified),
                    listing_only: true,
                };
                match found.entry(name.to_string()) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert((Kind::File, stat));
                    }
                    std::collections::btree_map::Entry::Occupied(_) => self.warn_shadowed(&obj.key),
                }
            }
            for prefix in page.common_prefixes {
                let name = prefix[dir_key.len()..].trim_end_matches('/');
                if !valid_name(name) || prefix.len() - dir_key.len() != name.len() + 1 {
                    self.warn_skipped(&prefix);
                    continue;
                }
                // A directory shadows a file of the same name.
                let shadowed = found.insert(
                    name.to_string(),
                    (Kind::Directory, Stat::directory(self.mounted_at)),
                );
                if shadowed.is_some_and(|(kind, _)| kind == Kind::File) {
                    self.warn_shadowed(&format!("{dir_key}{name}"));
                }
            }
            match page.next_continuation_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        // Listings carry no user metadata (s3fs mode, owner, mtime). Keep what a HEAD already
        // told us while the object is unchanged; in directories small enough, ask for the
        // rest now, in parallel, so `stat` after `readdir` (rsync, ls -l) shows the stored
        // mode and mtime. Large directories keep the listing's attributes: no HEAD per entry.
        let mut heads_needed = Vec::new();
        let mut resolved: Vec<(String, Kind, Stat)> = Vec::with_capacity(found.len());
        for (name, (kind, stat)) in found {
            let known = self.inodes.child(dir.ino, &name).filter(|c| {
                let same_object = (c.kind == kind
                    || (kind == Kind::File && c.kind == Kind::Symlink))
                    && c.stat().same_version(&stat);
                same_object || lock(&self.writers).contains_key(&c.ino)
            });
            match known {
                Some(c) => {
                    let mut known_stat = c.stat();
                    if known_stat.etag == stat.etag {
                        known_stat.s3_modified = known_stat.s3_modified.or(stat.s3_modified);
                    }
                    resolved.push((name, c.kind, known_stat))
                }
                None => {
                    if kind == Kind::File {
                        heads_needed.push(resolved.len());
                    }
                    resolved.push((name, kind, stat));
                }
            }
        }
        if !heads_needed.is_empty() && resolved.len() <= METADATA_LISTING_LIMIT {
            use futures_util::StreamExt;
            let requests: Vec<_> = heads_needed
                .iter()
                .map(|&i| {
                    let (client, key) =
                        (self.client.clone(), format!("{dir_key}{}", resolved[i].0));
                    async move { client.head_object(&key).await }
                })
                .collect();
            let heads: Vec<_> = futures_util::stream::iter(requests)
                .buffered(METADATA_HEADS_AT_ONCE)
                .collect()
                .await;
            for (i, head) in heads_needed.iter().zip(heads) {
                if let Ok(head) = head {
                    let (kind, stat) = stat_of_head(&head);
                    resolved[*i].1 = kind;
                    resolved[*i].2 = stat;
                }
            }
        }
        let mut entries = Vec::with_capacity(resolved.len());
        for (name, kind, stat) in resolved {
            let inode = self.inodes.upsert(dir, &name, kind, stat, ttl);
            entries.push(DirEntry {
                name,
                attr: self.attr_of(&inode),
            });
        }
        Ok(entries)
    }

    /// Entries from `offset` on. Offsets: 0 is the start, `i + 1` follows entry `i`; `.` and
    /// `..` come first.
    pub fn readdir(&self, ino: Ino, fh: u64, offset: u64) -> FsResult<Vec<(u64, DirEntry)>> {
        let dir = self.dir_inode(ino)?;
        let handle = lock(&self.dirs)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        let parent_attr = self
            .inodes
            .get(dir.parent())
            .map(|p| self.attr_of(&p))
            .unwrap_or_else(|| self.attr_of(&dir));
        let dots = [
            DirEntry {
                name: ".".into(),
                attr: self.attr_of(&dir),
            },
            DirEntry {
                name: "..".into(),
                attr: parent_attr,
            },
        ];
        Ok(dots
            .into_iter()
            .chain(handle.entries.iter().cloned())
            .enumerate()
            .skip(offset as usize)
            .map(|(i, e)| (i as u64 + 1, e))
            .collect())
    }

    pub fn releasedir(&self, fh: u64) {
        lock(&self.dirs).remove(&fh);
    }

    /// Opens a file: for reading, pinned to its current ETag; for writing (`write`), through
    /// the inode's write handle, empty when `truncate`.
    pub async fn open(&self, ino: Ino, write: bool, truncate: bool) -> FsResult<u64> {
        self.open_by(ino, write, truncate, None).await
    }

    /// [`S3Filesystem::open`] by process `opener` (its thread-group id), whose closes alone
    /// commit a file opened for writing.
    pub async fn open_by(
        &self,
        ino: Ino,
        write: bool,
        truncate: bool,
        opener: Option<u32>,
    ) -> FsResult<u64> {
        let inode = self.inode(ino)?;
        match inode.kind {
            Kind::Directory => return Err(FsError::IsADirectory),
            Kind::Symlink => return Err(FsError::Invalid("cannot open a symlink")),
            Kind::File => {}
        }
        if write {
            return self.open_for_write(inode, truncate, opener).await;
        }
        if lock(&self.writers).contains_key(&ino) {
            // Being written through another descriptor: read what is being written.
            let writer = lock(&self.writers).get(&ino).map(|(w, _)| w.clone());
            if let Some(writer) = writer {
                let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
                lock(&self.writers).entry(ino).and_modify(|(_, n)| *n += 1);
                lock(&self.files).insert(
                    fh,
                    OpenFile::Write {
                        ino,
                        writer,
                        // A reader's close stores nothing (no process is 0).
                        opener: Some(0),
                    },
                );
                return Ok(fh);
            }
        }
        // Open always checks with S3, so a handle never starts on a stale version.
        let head = self.client.head_object(&inode.key()).await.map_err(|e| {
            if e.kind == ErrorKind::NoSuchKey {
                {
                    let loc = inode.location();
                    self.inodes.remove_name(loc.parent, &loc.name);
                }
            }
            from_client(e)
        })?;
        let (_, stat) = stat_of_head(&head);
        inode.refresh(stat, self.config.metadata_ttl);
        let handle = ReadHandle::new(inode.key(), head.etag, head.size, self.read_ctx.clone());
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        lock(&self.files).insert(fh, OpenFile::Read(Arc::new(handle)));
        Ok(fh)
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let file = lock(&self.files)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        let data = match file {
            OpenFile::Read(handle) => handle.read(offset, size as u64).await?,
            OpenFile::Write { writer, .. } => writer.read(offset, size as u64).await?,
        };
        self.count_read(&data);
        Ok(data)
    }

    /// A read that needs no waiting (data already on local disk), or `None`.
    pub fn read_now(&self, fh: u64, offset: u64, size: u32) -> Option<FsResult<Bytes>> {
        let handle = match lock(&self.files).get(&fh) {
            Some(OpenFile::Read(handle)) => handle.clone(),
            _ => return None,
        };
        let data = handle.read_now(offset, size as u64)?;
        if let Ok(data) = &data {
            self.count_read(data);
        }
        Some(data)
    }

    fn count_read(&self, data: &Bytes) {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
    }

    /// A symlink's target is its object's content (as s3fs-fuse stores it).
    pub async fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        let inode = self.inode(ino)?;
        if inode.kind != Kind::Symlink {
            return Err(FsError::Invalid("not a symlink"));
        }
        let out = self
            .client
            .get_object(&inode.key(), None, None)
            .await
            .map_err(from_client)?;
        let len = out.head.size as usize;
        Ok(out.body.collect(len).await.map_err(from_client)?.to_vec())
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

    /// The inode a file handle open for writing belongs to.
    pub fn handle_ino(&self, fh: u64) -> Option<Ino> {
        match lock(&self.files).get(&fh) {
            Some(OpenFile::Write { ino, .. }) => Some(*ino),
            _ => None,
        }
    }

    pub fn root_ino(&self) -> Ino {
        ROOT_INO
    }
}

#[cfg(test)]
mod tests;
