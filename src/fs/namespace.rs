//! The namespace: names to inodes (lookup, with the bulk revalidation of expired entries),
//! directory listings with the mount's own changes merged in (cached, fetched ahead, or
//! fresh), and the changes of names: mkdir, symlink, unlink, rmdir and rename (a file by one
//! server-side copy, a directory by copying every key under it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;

use std::sync::atomic::Ordering;

use super::attributes::{is_old_directory, kind_of_mode, stat_of_head, Caller, FOLDER_SUFFIX};
use super::copy::RENAME_PARALLELISM;
use super::error::{from_client, FsError, FsResult};
use super::inode::{Ino, Inode, InodeTable, Kind, Stat};
use super::write::Expect;
use super::{lock, valid_name, Attr, DirEntry, S3Filesystem};
use super::{MAX_KEY_LEN, MAX_NAME_LEN, METADATA_LISTING_LIMIT};
use crate::s3::{
    ErrorKind, ListPage, ListRequest, MetadataDirective, ObjectAttributes, ObjectClient, PutBody,
    MAX_DELETE_KEYS,
};

pub(super) const METADATA_HEADS_AT_ONCE: usize = 32;

/// Entries a lookup's revalidation of a large directory lists (see
/// [`S3Filesystem::revalidate_children`]), and the size of a directory listing's first page:
/// enough for most directories in one request, and some servers (Garage) take several times
/// longer to answer for 1,000 keys, even when the directory has only a few.
pub(super) const REVALIDATION_PAGE: u32 = 200;

pub(super) struct DirHandle {
    entries: Arc<Vec<DirEntry>>,
    /// When this directory's listing was prefetched as one of a walk's: the walk's next
    /// directories start from here (see [`S3Filesystem::prefetch_subdirectories`]).
    walk: Option<Walk>,
}

/// The subdirectories of one directory in the order `readdir` gave them, which is the order a
/// program walking the tree opens them, and the place of one of them.
#[derive(Clone)]
pub(super) struct Walk {
    dirs: Arc<Vec<Ino>>,
    at: usize,
    /// Entries of the listing opened at `at`.
    entries: usize,
}

/// A listing started ahead of its `opendir` (see [`S3Filesystem::prefetch_subdirectories`]),
/// with its place in the walk, and its entries once done (`None` if it failed) with when it
/// was done.
pub(super) struct PrefetchedListing {
    // The directory's changes when it started: a listing older than a change is not used.
    changes: u64,
    walk: Walk,
    listing: futures_util::future::Shared<futures_util::future::BoxFuture<'static, Listing>>,
}

/// A listing's entries and when it was done, or `None` if it failed.
type Listing = Option<(Instant, Arc<Vec<DirEntry>>)>;

impl PrefetchedListing {
    /// Whether it is still of use: running, or done less than `ttl` ago.
    fn fresh(&self, ttl: Duration) -> bool {
        match self.listing.peek() {
            None => true,
            Some(Some((done, _))) => done.elapsed() < ttl,
            Some(None) => false,
        }
    }
}

/// A revalidation of a directory's children (see [`S3Filesystem::revalidate_children`]): when
/// it started, and whether its listing worked once done.
pub(super) type Revalidation = (Instant, Arc<tokio::sync::OnceCell<bool>>);

/// Subdirectories whose listings a walk keeps started ahead of the one it opens, after a
/// directory of one listing page or less, whose listing takes a few milliseconds.
pub(super) const SUBDIRECTORIES_PREFETCHED: usize = 8;

/// The same when a directory is opened, before the walk has seen how large its
/// subdirectories are.
pub(super) const FIRST_SUBDIRECTORIES_PREFETCHED: usize = 2;

/// The same after a directory of more than one page. Its listing takes longer than the metadata
/// TTL lets a prefetched listing wait (a second for 10,000 keys on a local server): listings
/// further ahead would be done, and too old, by the time they are opened, and be made twice.
pub(super) const LARGE_SUBDIRECTORIES_PREFETCHED: usize = 1;

/// Entries in one listing page.
const LISTING_PAGE: usize = 1000;

/// What the mount knows of names: the inode table, and what listings and lookups have learnt
/// besides it. Each map is a leaf lock (see docs/ARCHITECTURE.md, "Lock order").
/// What [`Namespace::listed`] keeps of a directory: until when, and its entries' names.
pub(super) type Listed = (Instant, Arc<HashSet<String>>);

pub(super) struct Namespace {
    pub(super) inodes: InodeTable,
    /// Names known to be absent, and since when.
    pub(super) negative: Mutex<HashMap<(Ino, String), Instant>>,
    /// Open directory handles, each with the entries its `opendir` listed.
    pub(super) dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    /// Listings of subdirectories started ahead, each used by at most one `opendir`.
    pub(super) prefetched: Mutex<HashMap<Ino, PrefetchedListing>>,
    /// Directories whose children a lookup revalidated with one listing, since when, and
    /// whether it worked (see [`S3Filesystem::revalidate_children`]).
    pub(super) revalidations: Mutex<HashMap<(Ino, Option<String>), Revalidation>>,
    /// Directories with more keys below them than one listing page: revalidated by their own
    /// entries only.
    pub(super) large_trees: Mutex<HashSet<Ino>>,
    /// Directories a listing showed whole, until when, with the names of their entries: a
    /// name not among them is absent without a request of its own until then (as a negative
    /// entry is), and once that passes, one listing of the directory renews them all.
    pub(super) listed: Mutex<HashMap<Ino, Listed>>,
    /// Keys skipped with a warning, so each is warned of once.
    pub(super) warned_names: Mutex<HashSet<String>>,
    /// A directory in an old form was seen (see [`S3Filesystem::remove_old_markers`]).
    pub(super) old_markers_seen: std::sync::atomic::AtomicBool,
}

impl Namespace {
    pub(super) fn new(prefix: &str) -> Self {
        Self {
            inodes: InodeTable::new(prefix),
            negative: Mutex::default(),
            dirs: Mutex::default(),
            prefetched: Mutex::default(),
            revalidations: Mutex::default(),
            large_trees: Mutex::default(),
            listed: Mutex::default(),
            warned_names: Mutex::default(),
            old_markers_seen: Default::default(),
        }
    }
}

impl<C: ObjectClient> S3Filesystem<C> {
    /// This mount changed the entries of directory `dir`.
    pub(super) fn entries_changed(&self, dir: Ino) {
        if let Some(d) = self.ns.inodes.get(dir) {
            d.entries_changed();
        }
    }

    pub(super) fn warn_skipped(&self, key: &str) {
        if lock(&self.ns.warned_names).insert(key.to_string()) {
            tracing::warn!(key, "skipping a key that cannot be a file name (empty segment, '.', '..' or over 255 bytes)");
        }
    }

    pub(super) fn warn_shadowed(&self, key: &str) {
        if lock(&self.ns.warned_names).insert(key.to_string()) {
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
        self.ns.inodes.add_lookup(&inode);
        Ok(self.attr_of(&inode))
    }

    pub(super) async fn resolve(&self, parent: Ino, name: &str) -> FsResult<Arc<Inode>> {
        let dir = self.dir_inode(parent)?;
        if !valid_name(name) {
            return Err(FsError::NotFound);
        }
        let ttl = self.config.metadata_ttl;
        // Refreshing a known inode waits for changes of it under way (a commit, a setattr), or
        // an older version read from S3 could overwrite what they just set.
        let mut _held = None;
        if let Some(child) = self.ns.inodes.child(parent, name) {
            // A file open for writing is what we say it is: S3 has an older version, if any.
            if child.is_fresh()
                || lock(&self.handles.writers).contains_key(&child.ino)
                || self.offline()
            {
                return Ok(child);
            }
            _held = Some(self.hold(child.ino).await);
            if child.is_fresh() {
                return Ok(child);
            }
            // One listing of the directory revalidates all the children it knows: a program
            // that stats every file of a tree (rsync, make) sends one request per directory
            // instead of two per file.
            if self.revalidate_children(&dir, Some(name)).await {
                if child.is_fresh() {
                    return Ok(child);
                }
            } else if self.queue.is_some() && !ttl.is_zero() {
                // Under write-back, what the mount knows answers while S3 is away.
                self.maybe_offline();
                return Ok(child);
            }
        }
        let neg_key = (parent, name.to_string());
        if lock(&self.ns.negative)
            .get(&neg_key)
            .is_some_and(|exp| *exp > Instant::now())
        {
            return Err(FsError::NotFound);
        }
        if self.absent_by_listing(&dir, name).await {
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
            match &head {
                Ok(h) if is_old_directory(h, None) => {
                    self.ns.old_markers_seen.store(true, Ordering::Relaxed)
                }
                Ok(_) => self.warn_shadowed(&key),
                Err(_) => {}
            }
            let marker = list.objects.first().filter(|o| o.key == dir_prefix);
            let mut stat = Stat::directory(marker.map_or(self.mounted_at, |o| o.last_modified));
            if marker.is_some() {
                // The marker carries the directory's mode, owner and mtime (s3fs-style), if any.
                if let Ok(head) = self.client.head_object(&dir_prefix).await {
                    stat = Self::directory_stat(stat_of_head(&head).1);
                }
            }
            lock(&self.ns.negative).remove(&neg_key);
            return Ok(self
                .ns
                .inodes
                .upsert(&dir, name, Kind::Directory, stat, ttl));
        }
        let head = match head {
            Err(e) if e.kind == ErrorKind::NoSuchKey && self.old_markers_seen() => {
                // Hadoop's form of an empty directory, once this mount has seen one.
                let folder = format!("{key}{FOLDER_SUFFIX}");
                match self.client.head_object(&folder).await {
                    Ok(marker) => {
                        let stat = Stat::directory(marker.last_modified);
                        lock(&self.ns.negative).remove(&neg_key);
                        return Ok(self
                            .ns
                            .inodes
                            .upsert(&dir, name, Kind::Directory, stat, ttl));
                    }
                    Err(_) => Err(e),
                }
            }
            other => other,
        };
        match head {
            Ok(head) => {
                let (kind, stat) = stat_of_head(&head);
                if kind == Kind::Directory {
                    self.ns.old_markers_seen.store(true, Ordering::Relaxed);
                }
                lock(&self.ns.negative).remove(&neg_key);
                Ok(self.ns.inodes.upsert(&dir, name, kind, stat, ttl))
            }
            Err(e) if e.kind == ErrorKind::NoSuchKey => {
                self.ns.inodes.remove_name(parent, name);
                if !ttl.is_zero() {
                    lock(&self.ns.negative).insert(neg_key, Instant::now() + ttl);
                }
                Err(FsError::NotFound)
            }
            Err(e) => Err(from_client(e)),
        }
    }

    /// Whether a listing of `dir` that showed all of it, within the TTL, lacks `name`. A
    /// directory once listed whole is listed again when that has expired (one request for
    /// every name looked up in it, instead of two per name: what `cp -r` and `tar x` into a
    /// new directory ask about each file they create).
    async fn absent_by_listing(&self, dir: &Arc<Inode>, name: &str) -> bool {
        let current = || {
            lock(&self.ns.listed)
                .get(&dir.ino)
                .map(|(until, names)| (*until > Instant::now(), names.clone()))
        };
        let names = match current() {
            None => return false,
            Some((true, names)) => names,
            Some((false, stale)) => {
                // S3 cannot be reached: with write-back, files made meanwhile are stored later
                // as conditional writes, which never replace an object another client made
                // there; the last listing is the best answer until then.
                if self.offline() {
                    return !stale.contains(name);
                }
                if !self.revalidate_children(dir, None).await {
                    if self.queue.is_none() {
                        return false;
                    }
                    self.maybe_offline();
                    return !stale.contains(name);
                }
                if let Some(q) = &self.queue {
                    q.reached(true);
                }
                match current() {
                    Some((true, names)) => names,
                    _ => return false,
                }
            }
        };
        !names.contains(name)
    }

    /// `dir` was seen whole (a complete listing, or made empty here): its entries' names.
    pub(super) fn listed_whole(&self, dir: Ino, names: HashSet<String>) {
        let ttl = self.config.metadata_ttl;
        if !ttl.is_zero() {
            lock(&self.ns.listed).insert(dir, (Instant::now() + ttl, Arc::new(names)));
        }
    }

    /// Revalidates the known children of `dir`, and their descendants, with one listing: the
    /// keys of the whole subtree when it fits in one page (recursive ListObjectsV2), else the
    /// first [`REVALIDATION_PAGE`] entries of `dir` itself (with delimiter). Each known inode
    /// the listing shows unchanged is confirmed (see [`Inode::confirm`]); changed, missing or
    /// unlisted ones stay stale, for a lookup of their own. Runs at most once per directory
    /// per TTL, shared by concurrent lookups. Returns false when the listing failed.
    pub(super) async fn revalidate_children(&self, dir: &Arc<Inode>, near: Option<&str>) -> bool {
        let ttl = self.config.metadata_ttl;
        if ttl.is_zero() {
            return false;
        }
        let recursive = !lock(&self.ns.large_trees).contains(&dir.ino);
        // In a large directory, the page from just before the name asked about: `ls -l` and
        // rsync stat its entries in name order, so one page answers the next thousand.
        let from = near
            .filter(|_| !recursive)
            .map(|name| name[..name.char_indices().last().map_or(0, |(i, _)| i)].to_string());
        let done = {
            let mut revalidations = lock(&self.ns.revalidations);
            revalidations.retain(|_, (started, _)| started.elapsed() < ttl);
            let (_, done) = revalidations
                .entry((dir.ino, from.clone()))
                .or_insert_with(|| (Instant::now(), Default::default()));
            done.clone()
        };
        let done = *done
            .get_or_init(|| async {
                let dir_key = dir.key();
                let start_after = from.as_ref().map(|f| format!("{dir_key}{f}"));
                self.stats.listings.fetch_add(1, Ordering::Relaxed);
                let request = ListRequest {
                    prefix: &dir_key,
                    delimiter: (!recursive).then_some("/"),
                    start_after: start_after.as_deref(),
                    max_keys: Some(if recursive || from.is_some() {
                        LISTING_PAGE as u32
                    } else {
                        REVALIDATION_PAGE
                    }),
                    ..Default::default()
                };
                let page = match self.client.list_objects(&request).await {
                    Ok(page) => page,
                    Err(_) => return false,
                };
                if recursive && page.next_continuation_token.is_some() {
                    // Too large to list whole each time: its own entries from now on.
                    lock(&self.ns.large_trees).insert(dir.ino);
                }
                self.confirm_listed(dir, &dir_key, &page, from.is_none(), ttl);
                true
            })
            .await;
        if done && recursive && near.is_some() && lock(&self.ns.large_trees).contains(&dir.ino) {
            // The tree turned out too large: the page around the name, now.
            return Box::pin(self.revalidate_children(dir, near)).await;
        }
        done
    }

    /// Confirms the known inodes below `dir` that `page` (a listing of `dir_key`, with or
    /// without delimiter, from its start or not) shows unchanged.
    pub(super) fn confirm_listed(
        &self,
        dir: &Arc<Inode>,
        dir_key: &str,
        page: &ListPage,
        from_start: bool,
        ttl: Duration,
    ) {
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
        let to_the_end = page.next_continuation_token.is_none();
        if from_start && to_the_end {
            let names = page
                .objects
                .iter()
                .map(|o| &o.key[dir_key.len()..])
                .chain(page.common_prefixes.iter().map(|p| &p[dir_key.len()..]))
                .filter_map(|path| path.split('/').next().filter(|n| !n.is_empty()))
                // Hadoop's `dir_$folder$` is the directory `dir`.
                .map(|n| n.strip_suffix(FOLDER_SUFFIX).unwrap_or(n).to_string())
                .collect();
            self.listed_whole(dir.ino, names);
        }
        // The inode at `path` (below `dir`), if known.
        let known = |path: &str| -> Option<Arc<Inode>> {
            let mut inode = dir.clone();
            for name in path.split('/') {
                inode = self.ns.inodes.child(inode.ino, name)?;
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
            let past = to_the_end || (last > as_dir.as_str() && !last.starts_with(&as_dir));
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
        self.ns.inodes.forget(ino, n);
        if self.ns.inodes.get(ino).is_none() {
            lock(&self.handles.changing).remove(&ino);
        }
    }

    /// The kernel took a reference through a readdirplus entry.
    pub fn entry_returned(&self, ino: Ino) {
        if let Some(inode) = self.ns.inodes.get(ino) {
            self.ns.inodes.add_lookup(&inode);
        }
    }

    pub async fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        let inode = self.inode(ino)?;
        let being_written = lock(&self.handles.writers).contains_key(&ino);
        if being_written || inode.is_fresh() || inode.kind == Kind::Directory || self.offline() {
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
        if let Some(parent) = self.ns.inodes.get(inode.parent()) {
            if self
                .revalidate_children(&parent, Some(&inode.location().name))
                .await
                && inode.is_fresh()
            {
                return Ok(self.attr_of(&inode));
            }
        }
        self.refresh_from_s3(&inode).await
    }

    /// HEADs the object and caches what it says; the caller holds the inode (see `hold`).
    pub(super) async fn refresh_from_s3(&self, inode: &Inode) -> FsResult<Attr> {
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
                        self.ns.inodes.remove_name(loc.parent, &loc.name);
                    }
                }
                Err(from_client(e))
            }
        }
    }

    /// Lists a directory whole (paged ListObjectsV2) and keeps the entries for `readdir`. A
    /// listing prefetched for it and done less than the metadata TTL ago (or still running)
    /// is used instead, once.
    pub async fn opendir(&self, ino: Ino) -> FsResult<u64> {
        let dir = self.dir_inode(ino)?;
        let prefetched = lock(&self.ns.prefetched).remove(&ino);
        let mut entries = None;
        let mut walk = None;
        if let Some(p) = prefetched {
            if let Some((done, listed)) = p.listing.await {
                if done.elapsed() < self.config.metadata_ttl && dir.changes() == p.changes {
                    entries = Some(listed);
                }
            }
            walk = Some(p.walk);
        }
        let entries = match entries {
            Some(entries) => entries,
            None => Arc::new(self.list_dir(&dir).await?),
        };
        if let Some(w) = &mut walk {
            w.entries = entries.len();
        }
        let entries = self.as_it_is_now(&dir, &entries);
        let fh = self.handles.next_number();
        lock(&self.ns.dirs).insert(fh, Arc::new(DirHandle { entries, walk }));
        Ok(fh)
    }

    /// Starts listings ahead of a program that walks a tree (find, du, rsync, ls -R), which
    /// opens the subdirectories one after another and would otherwise wait for one listing at a
    /// time: the first subdirectories of directory handle `fh`, and, when `fh`'s own listing
    /// was prefetched in such a walk, the directories after it.
    pub fn prefetch_subdirectories(self: &Arc<Self>, fh: u64)
    where
        C: 'static,
    {
        if self.config.metadata_ttl.is_zero() {
            return;
        }
        let Some(handle) = lock(&self.ns.dirs).get(&fh).cloned() else {
            return;
        };
        if let Some(walk) = &handle.walk {
            let ahead = if walk.entries > LISTING_PAGE {
                LARGE_SUBDIRECTORIES_PREFETCHED
            } else {
                SUBDIRECTORIES_PREFETCHED
            };
            self.prefetch_listings(&walk.dirs, walk.at + 1, ahead);
        }
        let subdirectories: Vec<Ino> = handle
            .entries
            .iter()
            .filter(|e| e.attr.kind == Kind::Directory)
            .map(|e| e.attr.ino)
            .collect();
        if !subdirectories.is_empty() {
            self.prefetch_listings(
                &Arc::new(subdirectories),
                0,
                FIRST_SUBDIRECTORIES_PREFETCHED,
            );
        }
    }

    /// Starts the listings of `dirs[from..from + count]` that are not started yet.
    fn prefetch_listings(self: &Arc<Self>, dirs: &Arc<Vec<Ino>>, from: usize, count: usize)
    where
        C: 'static,
    {
        let mut prefetched = lock(&self.ns.prefetched);
        // Listings nobody opened in time are no use any more.
        let ttl = self.config.metadata_ttl;
        prefetched.retain(|_, p| p.fresh(ttl));
        for (at, &ino) in dirs.iter().enumerate().skip(from).take(count) {
            if prefetched.contains_key(&ino) {
                continue;
            }
            let Ok(dir) = self.dir_inode(ino) else {
                continue;
            };
            let changes = dir.changes();
            let fs = self.clone();
            let listing = async move {
                let listed = fs.list_dir(&dir).await.ok()?;
                Some((Instant::now(), Arc::new(listed)))
            }
            .boxed()
            .shared();
            // Driven by its own task, whether or not anyone opens the directory.
            tokio::spawn(listing.clone());
            let walk = Walk {
                dirs: dirs.clone(),
                at,
                entries: 0,
            };
            prefetched.insert(
                ino,
                PrefetchedListing {
                    changes,
                    walk,
                    listing,
                },
            );
        }
    }

    /// The entries of a listing of `dir` as this mount sees them now: each with its inode's
    /// current attributes (a file being written shows its size so far), and the files being
    /// written there that S3 does not have yet added. `listed` is in name order, as listings
    /// are.
    pub(super) fn as_it_is_now(&self, dir: &Inode, listed: &[DirEntry]) -> Arc<Vec<DirEntry>> {
        let mut entries: Vec<DirEntry> = listed
            .iter()
            .map(|e| DirEntry {
                name: e.name.clone(),
                attr: self
                    .ns
                    .inodes
                    .get(e.attr.ino)
                    .map_or_else(|| e.attr.clone(), |i| self.attr_of(&i)),
            })
            .collect();
        for inode in self.being_written_in(dir) {
            let name = inode.location().name;
            let entry = DirEntry {
                attr: self.attr_of(&inode),
                name,
            };
            match entries.binary_search_by(|e| e.name.cmp(&entry.name)) {
                Ok(i) => entries[i] = entry,
                Err(i) => entries.insert(i, entry),
            }
        }
        Arc::new(entries)
    }

    /// The files being written in `dir` and still linked there (not unlinked, not replaced).
    pub(super) fn being_written_in(&self, dir: &Inode) -> Vec<Arc<Inode>> {
        let writing: Vec<Ino> = lock(&self.handles.writers).keys().copied().collect();
        writing
            .into_iter()
            .filter_map(|ino| self.ns.inodes.get(ino))
            .filter(|inode| {
                let loc = inode.location();
                loc.parent == dir.ino
                    && self
                        .ns
                        .inodes
                        .child(dir.ino, &loc.name)
                        .is_some_and(|c| c.ino == inode.ino)
            })
            .collect()
    }

    /// Whether `dir` has entries S3 may not show yet: files being written in it.
    pub(super) fn has_local_entries(&self, dir: &Inode) -> bool {
        !self.being_written_in(dir).is_empty()
    }

    /// Lists `dir`; a listing during which this mount changed the directory is made again
    /// (once), so it does not show what the mount just removed.
    pub(super) async fn list_dir(&self, dir: &Arc<Inode>) -> FsResult<Vec<DirEntry>> {
        let changes = dir.changes();
        let entries = self.list_dir_once(dir).await?;
        if dir.changes() == changes {
            return Ok(entries);
        }
        self.list_dir_once(dir).await
    }

    pub(super) async fn list_dir_once(&self, dir: &Arc<Inode>) -> FsResult<Vec<DirEntry>> {
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
                if let Some(folder) = name.strip_suffix(FOLDER_SUFFIX).filter(|f| valid_name(f)) {
                    // An old-style directory marker: the directory, whether or not any key
                    // is below it.
                    self.ns.old_markers_seen.store(true, Ordering::Relaxed);
                    found.insert(
                        folder.to_string(),
                        (Kind::Directory, Stat::directory(obj.last_modified)),
                    );
                    continue;
                }
                if !valid_name(name) {
                    self.warn_skipped(&obj.key);
                    continue;
                }
                let stat = Stat {
                    size: obj.size,
                    mtime: obj.last_modified,
                    ctime: None,
                    atime: None,
                    rdev: None,
                    xattrs: Default::default(),
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
        self.listed_whole(dir.ino, found.keys().cloned().collect());
        // Listings carry no user metadata (s3fs mode, owner, mtime). Keep what a HEAD already
        // told us while the object is unchanged; in directories small enough, ask for the
        // rest now, in parallel, so `stat` after `readdir` (rsync, ls -l) shows the stored
        // mode and mtime. Large directories keep the listing's attributes: no HEAD per entry.
        let mut heads_needed = Vec::new();
        let mut resolved: Vec<(String, Kind, Stat)> = Vec::with_capacity(found.len());
        for (name, (kind, stat)) in found {
            let known = self.ns.inodes.child(dir.ino, &name).filter(|c| {
                let same_object = (c.kind == kind
                    || (kind == Kind::File && c.kind == Kind::Symlink))
                    && c.stat().same_version(&stat);
                same_object || lock(&self.handles.writers).contains_key(&c.ino)
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
                    if kind == Kind::File || kind == Kind::Directory {
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
                    let (name, kind, _) = &resolved[i];
                    let key = super::inode::child_key(&dir_key, name, *kind);
                    let client = self.client.clone();
                    async move { client.head_object(&key).await }
                })
                .collect();
            let heads: Vec<_> = futures_util::stream::iter(requests)
                .buffered(METADATA_HEADS_AT_ONCE)
                .collect()
                .await;
            for (i, head) in heads_needed.iter().zip(heads) {
                let Ok(head) = head else { continue };
                let (kind, stat) = stat_of_head(&head);
                if resolved[*i].1 == Kind::Directory {
                    // The `dir/` marker's mode, owner and times (an implicit directory has
                    // none and keeps the listing's).
                    resolved[*i].2 = Self::directory_stat(stat);
                } else {
                    resolved[*i].1 = kind;
                    resolved[*i].2 = stat;
                }
            }
        }
        let mut entries = Vec::with_capacity(resolved.len());
        for (name, kind, stat) in resolved {
            let inode = self.ns.inodes.upsert(dir, &name, kind, stat, ttl);
            entries.push(DirEntry {
                name,
                attr: self.attr_of(&inode),
            });
        }
        Ok(entries)
    }

    /// The entries of an open directory from `offset` on, each with the offset of the next, as
    /// a `Vec`. Offsets: 0 is the start, `i + 1` follows entry `i`; `.` and `..` come first. See
    /// [`Self::readdir_with`].
    pub fn readdir(&self, ino: Ino, fh: u64, offset: u64) -> FsResult<Vec<(u64, DirEntry)>> {
        let mut out = Vec::new();
        self.readdir_with(ino, fh, offset, |next, e| {
            out.push((next, e.clone()));
            false
        })?;
        Ok(out)
    }

    /// Hands `add` the entries of an open directory from `offset` on, each with the offset of
    /// the next, until it returns `true` (the reply is full). Only what `add` takes is looked at,
    /// so reading a directory of N entries in pages costs O(N), not O(N^2).
    pub fn readdir_with(
        &self,
        ino: Ino,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(u64, &DirEntry) -> bool,
    ) -> FsResult<()> {
        let dir = self.dir_inode(ino)?;
        let handle = lock(&self.ns.dirs)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        let mut next = offset;
        if next < 2 {
            let dot = |name: &str, attr| DirEntry {
                name: name.into(),
                attr,
            };
            if next == 0 && add(1, &dot(".", self.attr_of(&dir))) {
                return Ok(());
            }
            let parent_attr = self
                .ns
                .inodes
                .get(dir.parent())
                .map(|p| self.attr_of(&p))
                .unwrap_or_else(|| self.attr_of(&dir));
            if add(2, &dot("..", parent_attr)) {
                return Ok(());
            }
            next = 2;
        }
        let start = usize::try_from(next - 2).unwrap_or(usize::MAX);
        for (i, e) in handle.entries.iter().enumerate().skip(start) {
            if add(i as u64 + 3, e) {
                break;
            }
        }
        Ok(())
    }

    pub fn releasedir(&self, fh: u64) {
        lock(&self.ns.dirs).remove(&fh);
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

    /// The name must be new in `parent`; returns the parent.
    pub(super) async fn new_name(&self, parent: Ino, name: &str) -> FsResult<Arc<Inode>> {
        self.check_writable()?;
        if name.len() > super::MAX_NAME_LEN {
            return Err(FsError::NameTooLong);
        }
        if !super::valid_name(name) {
            return Err(FsError::Invalid("not a valid file name"));
        }
        let dir = self.dir_inode(parent)?;
        // A directory's marker adds a `/`: the longest key the new entry may need.
        if dir.key().len() + name.len() + 1 > super::MAX_KEY_LEN {
            return Err(FsError::NameTooLong);
        }
        match self.resolve(parent, name).await {
            Ok(_) => Err(FsError::Exists),
            Err(FsError::NotFound) => Ok(dir),
            Err(e) => Err(e),
        }
    }

    /// Records a new entry made here: in the inode table, no longer negative, and referenced
    /// once by the kernel (the entry reply that follows).
    pub(super) fn enter_new(&self, dir: &Inode, name: &str, kind: Kind, stat: Stat) -> Arc<Inode> {
        let inode = self
            .ns
            .inodes
            .upsert(dir, name, kind, stat, self.config.metadata_ttl);
        self.forget_negative(dir.ino, name);
        self.ns.inodes.add_lookup(&inode);
        self.entries_changed(dir.ino);
        inode
    }

    pub(super) fn forget_negative(&self, parent: Ino, name: &str) {
        super::lock(&self.ns.negative).remove(&(parent, name.to_string()));
    }

    pub async fn mkdir(
        &self,
        parent: Ino,
        name: &str,
        mode: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        let dir = self.new_name(parent, name).await?;
        let stat = Self::new_stat(mode, caller);
        let attrs = self.attrs_for(&stat, Kind::Directory);
        let key = super::inode::child_key(&dir.key(), name, Kind::Directory);
        self.client
            .put_object(&key, PutBody::Bytes(Bytes::new()), &attrs)
            .await
            .map_err(from_client)?;
        let inode = self.enter_new(&dir, name, Kind::Directory, stat);
        // New and empty: what is made in it needs no lookups of S3 for a while.
        self.listed_whole(inode.ino, HashSet::new());
        Ok(self.attr_of(&inode))
    }

    pub async fn symlink(
        &self,
        parent: Ino,
        name: &str,
        target: &str,
        caller: Caller,
    ) -> FsResult<Attr> {
        let body = Bytes::copy_from_slice(target.as_bytes());
        let stat = Self::new_stat(0o777, caller);
        self.put_new(parent, name, Kind::Symlink, stat, body).await
    }

    /// Makes a FIFO, socket or device node `name` (`mode` with its file type, `rdev` for a
    /// device): a zero-byte object with its mode and device number, as s3fs-fuse stores them.
    pub async fn mknod(
        &self,
        parent: Ino,
        name: &str,
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        let kind = match kind_of_mode(mode) {
            Kind::Special(t) => Kind::Special(t),
            _ => {
                return Err(FsError::Invalid(
                    "mknod of a type other than FIFO, socket or device",
                ))
            }
        };
        let mut stat = Self::new_stat(mode, caller);
        if matches!(kind, Kind::Special(libc::S_IFCHR | libc::S_IFBLK)) {
            stat.rdev = Some(rdev);
        }
        self.put_new(parent, name, kind, stat, Bytes::new()).await
    }

    /// Stores a new object `name` of `kind` with `body` and enters it.
    async fn put_new(
        &self,
        parent: Ino,
        name: &str,
        kind: Kind,
        mut stat: Stat,
        body: Bytes,
    ) -> FsResult<Attr> {
        let dir = self.new_name(parent, name).await?;
        stat.size = body.len() as u64;
        let attrs = self.attrs_for(&stat, kind);
        let key = super::inode::child_key(&dir.key(), name, kind);
        let etag = self
            .client
            .put_object(&key, PutBody::Bytes(body), &attrs)
            .await
            .map_err(from_client)?;
        stat.etag = Some(etag);
        let inode = self.enter_new(&dir, name, kind, stat);
        Ok(self.attr_of(&inode))
    }

    pub async fn unlink(&self, parent: Ino, name: &str) -> FsResult<()> {
        self.check_writable()?;
        let inode = self.resolve(parent, name).await?;
        if inode.kind == Kind::Directory {
            return Err(FsError::IsADirectory);
        }
        let _held = self.hold(inode.ino).await;
        self.still_at(&inode, parent, name)?;
        let writer = self.writer_of(&inode);
        if let Some(w) = &writer {
            w.keep_bytes().await?;
        }
        self.client
            .delete_object(&inode.key())
            .await
            .map_err(from_client)?;
        if let Some(w) = writer {
            w.unlinked().await;
            self.leave_queue(inode.ino, &w).await;
        }
        super::lock(&self.deferred.pending).remove(&inode.ino);
        inode.forget_all_changes();
        self.ns.inodes.remove_name(parent, name);
        self.entry_removed(parent);
        Ok(())
    }

    /// An entry of `dir` is gone. If it was the last one of a directory that exists only
    /// because of its entries (no marker), the directory is gone too: its cached attributes
    /// expire, so the next lookup asks S3.
    pub(super) fn entry_removed(&self, dir: Ino) {
        self.entries_changed(dir);
        if let Some(d) = self.ns.inodes.get(dir) {
            d.expire();
        }
    }

    /// After waiting for the inode's change lock: fails with ENOENT if `inode` is no longer
    /// `parent/name` (another rename or unlink moved it meanwhile), so a change never lands on
    /// the object at its new place.
    pub(super) fn still_at(&self, inode: &Inode, parent: Ino, name: &str) -> FsResult<()> {
        let loc = inode.location();
        let linked = loc.parent == parent
            && loc.name == name
            && self
                .ns
                .inodes
                .child(parent, name)
                .is_some_and(|c| c.ino == inode.ino);
        if linked {
            Ok(())
        } else {
            Err(FsError::NotFound)
        }
    }

    /// Whether directory `dir` has entries: in S3 (anything but its own marker), or here (a
    /// file being written in it that S3 does not have yet).
    pub(super) async fn has_children(&self, dir: &Inode) -> FsResult<bool> {
        if self.has_local_entries(dir) {
            return Ok(true);
        }
        let prefix = dir.key();
        let page = self
            .client
            .list_objects(&ListRequest {
                prefix: &prefix,
                max_keys: Some(2),
                ..Default::default()
            })
            .await
            .map_err(from_client)?;
        Ok(page.objects.iter().any(|o| o.key != prefix) || !page.common_prefixes.is_empty())
    }

    /// A directory's stat from its marker's: size 0, and no ETag (a listing cannot confirm a
    /// directory by one).
    fn directory_stat(marker: Stat) -> Stat {
        Stat {
            size: 0,
            etag: None,
            s3_modified: None,
            listing_only: false,
            ..marker
        }
    }

    /// Whether this mount has seen a directory in an old form (`dir_$folder$`, or a `dir`
    /// object typed as a directory): only then do lookups and removals look for them.
    fn old_markers_seen(&self) -> bool {
        self.ns.old_markers_seen.load(Ordering::Relaxed)
    }

    /// Deletes the old-form markers of the directory `dir_key` (`dir/`) once it is removed or
    /// moved, or it would show again.
    async fn remove_old_markers(&self, dir_key: &str) -> FsResult<()> {
        if !self.old_markers_seen() {
            return Ok(());
        }
        let bare = dir_key.trim_end_matches('/');
        for key in [bare.to_string(), format!("{bare}{FOLDER_SUFFIX}")] {
            match self.client.head_object(&key).await {
                Ok(head) if key.ends_with(FOLDER_SUFFIX) || is_old_directory(&head, None) => {
                    self.client.delete_object(&key).await.map_err(from_client)?
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub async fn rmdir(&self, parent: Ino, name: &str) -> FsResult<()> {
        self.check_writable()?;
        let inode = self.resolve(parent, name).await?;
        if inode.kind != Kind::Directory {
            return Err(FsError::NotADirectory);
        }
        let _held = self.hold(inode.ino).await;
        self.still_at(&inode, parent, name)?;
        let key = inode.key();
        if self.has_children(&inode).await? {
            return Err(FsError::NotEmpty);
        }
        self.client.delete_object(&key).await.map_err(from_client)?;
        self.remove_old_markers(&key).await?;
        self.ns.inodes.remove_name(parent, name);
        self.entry_removed(parent);
        Ok(())
    }

    pub async fn rename(
        &self,
        parent: Ino,
        name: &str,
        new_parent: Ino,
        new_name: &str,
        no_replace: bool,
    ) -> FsResult<()> {
        self.check_writable()?;
        if new_name.len() > super::MAX_NAME_LEN {
            return Err(FsError::NameTooLong);
        }
        if !super::valid_name(new_name) {
            return Err(FsError::Invalid("not a valid file name"));
        }
        let source = self.resolve(parent, name).await?;
        let target_dir = self.dir_inode(new_parent)?;
        // Checked first, as the kernel does.
        if source.kind == Kind::Directory && target_dir.key().starts_with(&source.key()) {
            return Err(FsError::Invalid("cannot move a directory into itself"));
        }
        let mut replaced = None;
        match self.resolve(new_parent, new_name).await {
            Ok(existing) => {
                if no_replace {
                    return Err(FsError::Exists);
                }
                if existing.ino == source.ino {
                    return Ok(());
                }
                replaced = Some(existing.clone());
                match (
                    source.kind == Kind::Directory,
                    existing.kind == Kind::Directory,
                ) {
                    (false, true) => return Err(FsError::IsADirectory),
                    (true, false) => return Err(FsError::NotADirectory),
                    (true, true) if self.has_children(&existing).await? => {
                        return Err(FsError::NotEmpty)
                    }
                    _ => {}
                }
            }
            Err(FsError::NotFound) => {}
            Err(e) => return Err(e),
        }
        let _held = self.hold(source.ino).await;
        self.still_at(&source, parent, name)?;
        // An open file replaced by the rename keeps its bytes, and stops storing itself.
        let replaced_writer = replaced.as_ref().and_then(|r| self.writer_of(r));
        if let Some(w) = &replaced_writer {
            w.keep_bytes().await?;
        }
        let old_key = source.key();
        let new_key = super::inode::child_key(&target_dir.key(), new_name, source.kind);
        if new_key == old_key {
            return Ok(());
        }
        if new_key.len() > super::MAX_KEY_LEN {
            return Err(FsError::NameTooLong);
        }
        let writer = super::lock(&self.handles.writers)
            .get(&source.ino)
            .map(|(w, _)| w.clone());
        match (source.kind, writer) {
            (Kind::Directory, _) => {
                self.rename_prefix(&old_key, &new_key).await?;
                // The new place has a `dir/` marker (s3mount writes no other form).
                self.remove_old_markers(&old_key).await?;
            }
            (_, Some(w)) => {
                // Open for writing: what S3 has (if anything) moves now, and the next commit
                // writes the whole file at the new name.
                let moved = match self.client.head_object(&old_key).await.map_err(from_client) {
                    Ok(_) => Some(self.copy_then_delete(&old_key, &new_key, None).await?),
                    Err(FsError::NotFound) => {
                        if replaced.is_some() {
                            // The object it replaces is gone now, whatever becomes of the
                            // commit.
                            self.client
                                .delete_object(&new_key)
                                .await
                                .map_err(from_client)?;
                        }
                        None
                    }
                    Err(e) => return Err(e),
                };
                let mut s = w.state.lock().await;
                // What a conditional commit finds at the new place: the object moved there,
                // or nothing.
                s.expect = match &moved {
                    Some((_, new_etag)) => Expect::Etag(new_etag.clone()),
                    None => Expect::Absent,
                };
                if let Some((old_etag, new_etag)) = moved {
                    s.base_moved(&old_key, &old_etag, &new_key, new_etag);
                }
                s.key = new_key.clone();
                s.touch();
            }
            (_, None) => {
                // Deferred attributes travel with the copy.
                let pending = super::lock(&self.deferred.pending).remove(&source.ino);
                let attrs = pending
                    .as_ref()
                    .map(|_| self.attrs_for(&source.stat(), source.kind));
                match self.copy_then_delete(&old_key, &new_key, attrs).await {
                    Ok((_, etag)) if pending.is_some() => {
                        let stat = Stat {
                            etag: Some(etag),
                            ..source.stat()
                        };
                        source.stored(stat, self.config.metadata_ttl);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(changed) = pending {
                            super::lock(&self.deferred.pending).insert(source.ino, changed);
                        }
                        return Err(e);
                    }
                }
            }
        }
        if let (Some(w), Some(r)) = (replaced_writer, &replaced) {
            w.unlinked().await;
            self.leave_queue(r.ino, &w).await;
        }
        if let Some(r) = &replaced {
            // Its deferred attributes are for an object that is gone.
            super::lock(&self.deferred.pending).remove(&r.ino);
            r.forget_all_changes();
        }
        self.ns.inodes.rename(&source, &target_dir, new_name);
        self.entry_removed(parent);
        self.entries_changed(new_parent);
        self.forget_negative(new_parent, new_name);
        super::lock(&self.ns.negative).insert(
            (parent, name.to_string()),
            std::time::Instant::now() + self.config.metadata_ttl,
        );
        // The write-back queue records the new keys.
        if source.kind == Kind::Directory {
            self.pending_moved().await;
        } else {
            self.pending_changed(source.ino).await?;
        }
        Ok(())
    }

    /// Moves every key under `from` (a directory prefix) to `to`: copies, 16 at a time, then
    /// deletes in batches. The copies finish before any delete, so a failure leaves the
    /// source whole.
    pub(super) async fn rename_prefix(&self, from: &str, to: &str) -> FsResult<()> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects(&ListRequest {
                    prefix: from,
                    continuation_token: token.as_deref(),
                    ..Default::default()
                })
                .await
                .map_err(from_client)?;
            keys.extend(page.objects.into_iter().map(|o| o.key));
            match page.next_continuation_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        // Every key must fit at its new place before anything moves.
        if keys
            .iter()
            .any(|k| k.len() - from.len() + to.len() > super::MAX_KEY_LEN)
        {
            return Err(FsError::NameTooLong);
        }
        let semaphore = Arc::new(tokio::sync::Semaphore::new(RENAME_PARALLELISM));
        let copies = keys.iter().map(|key| {
            let semaphore = semaphore.clone();
            let target = format!("{to}{}", &key[from.len()..]);
            async move {
                let _permit = semaphore.acquire().await.expect("never closed");
                self.client
                    .copy_object(key, &target, &MetadataDirective::Copy)
                    .await
            }
        });
        for result in futures_util::future::join_all(copies).await {
            result.map_err(from_client)?;
        }
        if keys.is_empty() {
            // An implicit directory with nothing in it cannot be: make the target exist.
            self.client
                .put_object(
                    to,
                    PutBody::Bytes(Bytes::new()),
                    &ObjectAttributes::default(),
                )
                .await
                .map_err(from_client)?;
        }
        for chunk in keys.chunks(MAX_DELETE_KEYS) {
            let out = self
                .client
                .delete_objects(chunk)
                .await
                .map_err(from_client)?;
            if let Some(f) = out.failed.first() {
                tracing::error!(
                    key = f.key,
                    "rename: delete failed: {} {}",
                    f.code,
                    f.message
                );
                return Err(from_client(
                    crate::s3::ClientError::new(
                        crate::s3::Operation::DeleteObjects,
                        self.client.bucket(),
                        Some(&f.key),
                        ErrorKind::from_code(&f.code),
                    )
                    .with_message(f.message.clone()),
                ));
            }
        }
        Ok(())
    }
}
