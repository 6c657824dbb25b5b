//! Durable write-back (`--write-back`): `close()` returns once the file is safe on local disk,
//! and a queue stores it in S3 in the background.
//!
//! **What a close makes durable.** The file's spool is a named file in the cache directory
//! (one directory per bucket and prefix, locked by the mount that uses it). At the close the
//! spool is completed (parts held in memory written, bytes only the stored object has
//! fetched), then an *entry* records the key, the size, the attributes the object is stored
//! with (mode, owner, times, xattrs in s3fs's metadata) and the version of the object the file
//! replaces, appended to the queue's log (`queue_log.rs`) and synced. A file of up to
//! `INLINE_MAX` goes into its record whole, so that one `fdatasync` makes the close durable; a
//! larger one's spool is synced first. Only then does the close return. Spools of files that
//! left the queue are kept for new files (`SpoolPool` in `write.rs`) when no record names them
//! without their data.
//!
//! **The queue.** A pending file keeps its write handle, pinned by a descriptor of the queue
//! itself, and its inode, so listings, stat, reads, rename, unlink, chmod, truncate and
//! rewrites see and change the local version exactly as they do for a file open for writing;
//! each change that a later mount must know is recorded in the entry again (a rewrite marks
//! the entry as changing first, so a crash in the middle of it never stores a mix of two
//! versions). A worker stores each pending file that no descriptor has open and that has been
//! left alone for `--write-back-delay` (several at once),
//! through the same commit as a synchronous close, with backoff that grows to a minute and
//! never gives up while the data is safe locally. `fsync` stores the file at once.
//!
//! **Conflicts.** A commit from the queue is a conditional write: `If-None-Match: *` for a new
//! file, `If-Match` with the ETag the file was opened on for a rewrite. Where the server does
//! not check conditions (probed once at mount), a HeadObject just before the commit checks
//! instead (a change in between those two requests is the one that can still be overwritten;
//! docs/SEMANTICS.md). When the object changed, neither version is destroyed: the local one is
//! stored next to it as `KEY.s3mount-conflict-TIME`, and the log says so.
//!
//! **After a crash.** The next mount of the same bucket and prefix with the same cache
//! directory finds the entries, enters their files into the namespace (with their attributes)
//! and stores them; an interrupted multipart upload of one is resumed (ListParts tells which
//! parts S3 has). Spools without an entry (files open at the crash, never closed) are removed.
//!
//! **Room.** `--write-back-max-size` bounds the bytes pending; a close that would pass it waits
//! until stores make room (a file larger than the bound alone is stored synchronously).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

use super::attributes::stat_of_head;
use super::error::{FsError, FsResult};
use super::inode::{Ino, Kind};
use super::journal::millis;
use super::queue_log::{sync_dir, QueueLog};
use super::write::{Expect, KeptLocally, WriteHandle};
use super::{local_io, lock, OpenFile, S3Filesystem};
use crate::s3::{Condition, ContentHeaders, ErrorKind, ObjectAttributes, ObjectClient, ObjectHead};

/// Files stored at once by the queue.
const STORES_AT_ONCE: usize = 16;
/// The longest wait between two attempts to store a pending file.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often the worker looks at the queue when nothing wakes it.
const IDLE_LOOK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct WriteBackConfig {
    /// The cache directory (`--cache-dir`); the queue of one bucket and prefix lives in a
    /// directory of its own below it.
    pub dir: PathBuf,
    /// The most bytes pending at once (`--write-back-max-size`).
    pub max_bytes: u64,
    /// How long after its last close a file is stored (`--write-back-delay`).
    pub delay: Duration,
}

/// Whether the server checks conditional writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ServerChecks {
    Unknown = 0,
    Yes = 1,
    No = 2,
}

/// The write-back queue of one mount.
#[derive(Debug)]
pub struct Queue {
    dir: PathBuf,
    /// Held (flock) while the mount runs: two mounts never share a queue.
    _lock: std::fs::File,
    max_bytes: u64,
    delay: Duration,
    /// What each spool holds, for a later mount.
    log: Mutex<QueueLog>,
    /// What the log held when the mount started, until recovery takes it.
    queued: Mutex<Vec<(PathBuf, Option<Entry>)>>,
    pending: Mutex<HashMap<Ino, Pending>>,
    /// New work, or a retry that came due.
    wake: tokio::sync::Notify,
    /// A file left the queue.
    room: tokio::sync::Notify,
    checks: AtomicU8,
    stored: AtomicU64,
    conflicts: AtomicU64,
    /// Since when stores fail because S3 cannot be reached (none succeeded since).
    unreachable: Mutex<Option<Instant>>,
    /// The same, for the write handles (see `WriteContext::offline`).
    offline: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug)]
struct Pending {
    /// The queue's own descriptor of the file, which keeps its write handle.
    pin: u64,
    spool: PathBuf,
    key: String,
    size: u64,
    /// When the oldest change not in S3 was closed.
    since: SystemTime,
    failures: u32,
    retry_at: Instant,
    storing: bool,
    /// Where it goes instead, after the object changed in S3 meanwhile.
    conflict: Option<String>,
}

/// One pending file, as `s3mount status` shows it.
#[derive(Debug, Clone)]
pub struct PendingInfo {
    pub key: String,
    pub size: u64,
    pub age: Duration,
    pub failures: u32,
}

/// The queue as `s3mount status` shows it.
#[derive(Debug, Clone, Default)]
pub struct QueueInfo {
    pub files: usize,
    pub bytes: u64,
    pub max_bytes: u64,
    pub oldest: Option<Duration>,
    pub stored: u64,
    pub conflicts: u64,
    pub server_checks_conditions: Option<bool>,
    pub pending: Vec<PendingInfo>,
}

/// What an entry file says.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    key: String,
    size: u64,
    since: SystemTime,
    expect: Expect,
    /// The file was being rewritten: the spool may hold a mix of two versions.
    changing: bool,
    conflict: Option<String>,
    attrs: ObjectAttributes,
}

impl Entry {
    fn to_json(&self) -> Value {
        let expect = match &self.expect {
            Expect::Any => Value::Null,
            Expect::Absent => json!({ "absent": true }),
            Expect::Etag(e) => json!({ "etag": e }),
        };
        let content: BTreeMap<&str, &String> = self.attrs.content.pairs().collect();
        json!({
            "key": self.key,
            "size": self.size,
            "since_ms": millis(self.since) as u64,
            "expect": expect,
            "changing": self.changing,
            "conflict": self.conflict,
            "content_type": self.attrs.content_type,
            "content": content,
            "metadata": self.attrs.metadata,
            "storage_class": self.attrs.storage_class,
        })
    }

    fn parse(v: &Value) -> Option<Self> {
        let s = |v: &Value| v.as_str().map(str::to_string);
        let expect = match &v["expect"] {
            Value::Null => Expect::Any,
            e if e["absent"].as_bool() == Some(true) => Expect::Absent,
            e => Expect::Etag(s(&e["etag"])?),
        };
        let metadata = v["metadata"]
            .as_object()?
            .iter()
            .filter_map(|(k, val)| Some((k.clone(), s(val)?)))
            .collect();
        Some(Entry {
            key: s(&v["key"])?,
            size: v["size"].as_u64()?,
            since: SystemTime::UNIX_EPOCH + Duration::from_millis(v["since_ms"].as_u64()?),
            expect,
            changing: v["changing"].as_bool()?,
            conflict: s(&v["conflict"]),
            attrs: ObjectAttributes {
                content_type: s(&v["content_type"]),
                content: ContentHeaders::from_lookup(|name| s(&v["content"][name])),
                metadata,
                storage_class: s(&v["storage_class"]),
                sse: None,
            },
        })
    }
}

/// An entry file of the version before the queue log (`spool-X.entry` beside `spool-X`): read
/// at mount, so an upgrade keeps what an older mount left queued.
fn legacy_entry_path(spool: &Path) -> PathBuf {
    let mut p = spool.as_os_str().to_owned();
    p.push(".entry");
    PathBuf::from(p)
}

/// Files at most this large are kept in their log record, so one sync makes them durable;
/// larger ones have their spool synced.
const INLINE_MAX: u64 = 128 << 10;

impl Queue {
    /// The queue of `bucket` and `prefix` under `cfg.dir`, locked for this mount.
    pub fn open(cfg: &WriteBackConfig, bucket: &str, prefix: &str) -> Result<Self, String> {
        let Some((dir, lock_file)) = super::locked_dir(&cfg.dir, bucket, prefix)? else {
            return Err(format!(
                "another s3mount of {bucket}:{prefix} uses the cache directory {}; give this \
                 mount a --cache-dir of its own",
                cfg.dir.display()
            ));
        };
        let (log, found) = QueueLog::open(&dir)
            .map_err(|e| format!("cannot read the write-back queue in {}: {e}", dir.display()))?;
        let mut queued: Vec<(PathBuf, Option<Entry>)> = found
            .into_iter()
            .map(|f| (dir.join(&f.spool), Entry::parse(&f.entry)))
            .collect();
        queued.extend(legacy_entries(&dir, &queued));
        Ok(Self {
            dir,
            _lock: lock_file,
            max_bytes: cfg.max_bytes,
            delay: cfg.delay,
            log: Mutex::new(log),
            queued: Mutex::new(queued),
            pending: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            room: tokio::sync::Notify::new(),
            checks: AtomicU8::new(ServerChecks::Unknown as u8),
            stored: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            unreachable: Mutex::default(),
            offline: Default::default(),
        })
    }

    /// Where the spools and the log are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn checks(&self) -> ServerChecks {
        match self.checks.load(Ordering::Relaxed) {
            1 => ServerChecks::Yes,
            2 => ServerChecks::No,
            _ => ServerChecks::Unknown,
        }
    }

    /// Records `entry` for the spool at `spool` in the log, durably. `data` is the file's
    /// content when it goes in the record; otherwise the spool was synced, and its name is
    /// made durable here.
    fn record(&self, spool: &Path, entry: &Entry, data: Option<&[u8]>) -> std::io::Result<()> {
        let name = spool_name(spool)?;
        local_io(|| {
            if data.is_none() && !entry.changing {
                sync_dir(&self.dir)?;
            }
            lock(&self.log).put(name, &entry.to_json(), data)
        })
    }

    /// Forgets the entry of `spool` (the spool itself goes with its handle).
    fn forget(&self, spool: &Path) {
        let gone = spool_name(spool).and_then(|name| local_io(|| lock(&self.log).gone(name)));
        if let Err(e) = gone {
            tracing::warn!(
                "could not record in the write-back log that {} is stored: {e}",
                spool.display()
            );
        }
    }

    /// What the log (and entry files of an older version) said was queued when the mount
    /// started, by spool path; once.
    fn take_queued(&self) -> Vec<(PathBuf, Option<Entry>)> {
        std::mem::take(&mut *lock(&self.queued))
    }

    pub fn info(&self) -> QueueInfo {
        let pending = lock(&self.pending);
        let now = SystemTime::now();
        let age = |p: &Pending| now.duration_since(p.since).unwrap_or_default();
        QueueInfo {
            files: pending.len(),
            bytes: pending.values().map(|p| p.size).sum(),
            max_bytes: self.max_bytes,
            oldest: pending.values().map(age).max(),
            stored: self.stored.load(Ordering::Relaxed),
            conflicts: self.conflicts.load(Ordering::Relaxed),
            server_checks_conditions: match self.checks() {
                ServerChecks::Yes => Some(true),
                ServerChecks::No => Some(false),
                ServerChecks::Unknown => None,
            },
            pending: pending
                .values()
                .map(|p| PendingInfo {
                    key: p.key.clone(),
                    size: p.size,
                    age: age(p),
                    failures: p.failures,
                })
                .collect(),
        }
    }

    /// Whether S3 could not be reached by the last stores (an outage): lookups then answer
    /// from what the mount knows instead of waiting out their retries.
    pub fn s3_unreachable(&self) -> bool {
        // The worker's stores tell while files wait; without them, only for a few seconds.
        let since = *lock(&self.unreachable);
        self.offline.load(Ordering::Relaxed)
            || since
                .is_some_and(|t| !lock(&self.pending).is_empty() || t.elapsed() < IDLE_LOOK * 10)
    }

    pub(super) fn reached(&self, reached: bool) {
        let mut u = lock(&self.unreachable);
        if reached {
            if u.is_some() || self.offline.load(Ordering::Relaxed) {
                tracing::info!("write-back: S3 answers again");
            }
            *u = None;
            self.offline.store(false, Ordering::Relaxed);
        } else {
            *u = Some(Instant::now());
            went_offline(&self.offline);
        }
    }

    /// Bytes pending, but for `ino`'s.
    fn bytes_besides(&self, ino: Ino) -> u64 {
        lock(&self.pending)
            .iter()
            .filter(|(i, _)| **i != ino)
            .map(|(_, p)| p.size)
            .sum()
    }
}

/// S3 cannot be reached (a store, a listing or a part upload found it so): said once, until it
/// answers again.
pub(super) fn went_offline(offline: &std::sync::atomic::AtomicBool) {
    if !offline.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "write-back: S3 cannot be reached; closed files wait on local disk, and lookups in \
             directories listed before answer from those listings"
        );
    }
}

/// The file name of a spool in the queue's directory.
fn spool_name(spool: &Path) -> std::io::Result<&str> {
    spool.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a spool of the queue", spool.display()),
        )
    })
}

/// Entry files an older version left in `dir` (for spools the log does not name), and the
/// removal of leftovers: spools nothing names (open when the last mount ended, never closed)
/// and files being written.
fn legacy_entries(
    dir: &Path,
    queued: &[(PathBuf, Option<Entry>)],
) -> Vec<(PathBuf, Option<Entry>)> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let names: std::collections::HashSet<String> = read
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    let logged: std::collections::HashSet<&Path> =
        queued.iter().map(|(p, _)| p.as_path()).collect();
    let logged = |spool: &Path| logged.contains(spool);
    let mut found = Vec::new();
    for name in &names {
        let path = dir.join(name);
        if name.ends_with(".tmp") {
            let _ = std::fs::remove_file(&path);
        } else if let Some(spool) = name.strip_suffix(".entry") {
            let spool = dir.join(spool);
            if !logged(&spool) {
                let entry = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .and_then(|v| Entry::parse(&v));
                found.push((spool, entry));
            }
        } else if name.starts_with("spool-")
            && !logged(&path)
            && !names.contains(&format!("{name}.entry"))
        {
            let _ = std::fs::remove_file(&path);
        }
    }
    found
}

/// The time in a conflict copy's name: `20261203T114512Z` (UTC, as SigV4 writes dates).
fn stamp(t: SystemTime) -> String {
    crate::s3::sigv4::format_amz_date(time::OffsetDateTime::from(t))
}

/// The first wait after a failed store; it doubles with each failure (core tests wait less).
const BACKOFF_UNIT: Duration = if cfg!(test) {
    Duration::from_millis(5)
} else {
    Duration::from_secs(1)
};

fn backoff(failures: u32) -> Duration {
    (BACKOFF_UNIT * (1u32 << failures.min(6))).min(MAX_BACKOFF)
}

impl<C: ObjectClient> S3Filesystem<C> {
    /// Write-back from now on, through `queue`. Before any file is opened.
    pub fn with_write_back(mut self, queue: Queue) -> Self {
        self.write_ctx.config.spool_dir = Some(queue.dir().to_path_buf());
        self.write_ctx.config.named_spools = true;
        self.write_ctx.config.conditional = true;
        self.write_ctx.offline = queue.offline.clone();
        self.config.write = self.write_ctx.config.clone();
        self.queue = Some(Arc::new(queue));
        self
    }

    /// Write-back is on and S3 is known to be away: what the mount knows answers.
    pub(super) fn offline(&self) -> bool {
        self.queue.as_ref().is_some_and(|q| q.s3_unreachable())
    }

    /// A listing or HEAD failed under write-back: S3 may be away.
    pub(super) fn maybe_offline(&self) {
        if let Some(q) = &self.queue {
            q.reached(false);
        }
    }

    pub fn write_back_info(&self) -> Option<QueueInfo> {
        self.queue.as_ref().map(|q| q.info())
    }

    /// Whether `ino` waits in the queue.
    pub(super) fn is_pending(&self, ino: Ino) -> bool {
        self.queue
            .as_ref()
            .is_some_and(|q| lock(&q.pending).contains_key(&ino))
    }

    /// A close in write-back mode (under the inode's change lock): the file is made durable
    /// locally and queued.
    pub(super) async fn close_to_queue(
        &self,
        ino: Ino,
        writer: &Arc<WriteHandle<C>>,
    ) -> FsResult<()> {
        let Some(q) = self.queue.clone() else {
            return self.commit(ino, writer).await;
        };
        if !writer.has_unstored_changes().await {
            return Ok(());
        }
        let inode = self.inode(ino)?;
        let size = writer.size().await;
        if size > q.max_bytes {
            tracing::info!(
                key = inode.key(),
                size,
                "larger than --write-back-max-size: stored before the close returns"
            );
            let result = self.commit(ino, writer).await;
            if result.is_ok() {
                self.leave_queue(ino, writer).await;
            }
            return result;
        }
        self.wait_for_room(&q, ino, size).await;
        self.attrs_to_writer(&inode, writer).await;
        writer.state.lock().await.key = inode.key();
        let since = lock(&q.pending)
            .get(&ino)
            .map_or_else(SystemTime::now, |p| p.since);
        let kept = match writer.keep_locally(INLINE_MAX).await {
            Ok(kept) => self
                .record_entry(&q, &inode.key(), &kept, since, None)
                .map(|()| kept),
            Err(e) => {
                tracing::error!(
                    key = inode.key(),
                    "could not keep the file on local disk: {e}"
                );
                Err(e)
            }
        };
        let kept = match kept {
            Ok(kept) => kept,
            Err(e) => {
                // The version queued before is gone too (the rewrite overwrote its spool).
                self.leave_queue(ino, writer).await;
                return Err(e);
            }
        };
        let pinned = lock(&q.pending).contains_key(&ino);
        let pin = if pinned {
            None
        } else {
            let w = self.writer_for(&inode, ObjectAttributes::default())?;
            self.ns.inodes.add_lookup(&inode);
            Some(self.register(OpenFile::Write {
                ino,
                writer: w,
                opener: Some(0),
            }))
        };
        {
            let mut pending = lock(&q.pending);
            let p = pending.entry(ino).or_insert_with(|| Pending {
                pin: pin.unwrap_or_default(),
                spool: kept.spool.clone(),
                key: inode.key(),
                size,
                since,
                failures: 0,
                retry_at: Instant::now(),
                storing: false,
                conflict: None,
            });
            p.size = size;
            p.key = inode.key();
            // Stored once the file has been left alone for the delay.
            p.retry_at = Instant::now() + q.delay;
        }
        q.wake.notify_one();
        Ok(())
    }

    fn record_entry(
        &self,
        q: &Queue,
        key: &str,
        kept: &KeptLocally,
        since: SystemTime,
        conflict: Option<String>,
    ) -> FsResult<()> {
        let entry = Entry {
            key: key.to_string(),
            size: kept.size,
            since,
            expect: kept.expect.clone(),
            changing: false,
            conflict,
            attrs: kept.attrs.clone(),
        };
        q.record(&kept.spool, &entry, kept.inline.as_deref())
            .map_err(|e| {
                let err = FsError::local("recording the file in the write-back cache", e);
                tracing::error!(key, "{err}");
                err
            })
    }

    /// A close that would pass the cache's bound waits until stores make room (unless nothing
    /// in the queue can be stored now: every other pending file is open).
    async fn wait_for_room(&self, q: &Queue, ino: Ino, size: u64) {
        let mut told = false;
        loop {
            let used = q.bytes_besides(ino);
            if used + size <= q.max_bytes {
                return;
            }
            let others: Vec<Ino> = lock(&q.pending).keys().copied().collect();
            let storable = others
                .into_iter()
                .any(|i| i != ino && self.open_besides_queue(i) == 0);
            if !storable {
                return;
            }
            if !told {
                tracing::info!(
                    used,
                    max = q.max_bytes,
                    "write-back cache full: the close waits for uploads to make room"
                );
                told = true;
            }
            let _ = tokio::time::timeout(IDLE_LOOK, q.room.notified()).await;
        }
    }

    /// How many descriptors have `ino` open, the queue's own not counted.
    fn open_besides_queue(&self, ino: Ino) -> usize {
        let opens = lock(&self.handles.writers).get(&ino).map_or(0, |(_, n)| *n);
        opens.saturating_sub(usize::from(self.is_pending(ino)))
    }

    /// A pending file is opened for writing: its entry says so first, so a crash during the
    /// rewrite never stores a mix of the two versions.
    pub(super) async fn pending_changes(&self, ino: Ino) -> FsResult<()> {
        let Some(q) = self.queue.clone() else {
            return Ok(());
        };
        let Some((key, spool, since, size)) = lock(&q.pending)
            .get(&ino)
            .map(|p| (p.key.clone(), p.spool.clone(), p.since, p.size))
        else {
            return Ok(());
        };
        let entry = Entry {
            key,
            size,
            since,
            expect: Expect::Any,
            changing: true,
            conflict: None,
            attrs: ObjectAttributes::default(),
        };
        q.record(&spool, &entry, None)
            .map_err(|e| FsError::local("recording the file in the write-back cache", e))
    }

    /// A pending file changed while closed (rename, chmod, utimens, truncate): its entry
    /// records the change.
    pub(super) async fn pending_changed(&self, ino: Ino) -> FsResult<()> {
        if !self.is_pending(ino) || self.open_besides_queue(ino) > 0 {
            // Not pending, or open: its close records it.
            return Ok(());
        }
        match self.writer_of(&*self.inode(ino)?) {
            Some(writer) => self.close_to_queue(ino, &writer).await,
            None => Ok(()),
        }
    }

    /// Every pending file below a renamed directory: its entry gets its new key.
    pub(super) async fn pending_moved(&self) {
        let Some(q) = self.queue.clone() else {
            return;
        };
        let moved: Vec<Ino> = lock(&q.pending)
            .iter()
            .filter(|(ino, p)| self.key_of(**ino).is_some_and(|k| k != p.key))
            .map(|(ino, _)| *ino)
            .collect();
        for ino in moved {
            if let Some(w) = self.inode(ino).ok().and_then(|i| self.writer_of(&i)) {
                // S3 has nothing of it at the new place to compare with.
                w.state.lock().await.expect = Expect::Any;
            }
            let _held = self.hold(ino).await;
            if let Err(e) = self.pending_changed(ino).await {
                tracing::warn!("the write-back entry of a moved file was not updated: {e}");
            }
        }
    }

    /// `ino` is no longer pending (S3 has it, it was removed, or it was stored at once): its
    /// entry goes, and so does the queue's descriptor (and, with the last one, the spool).
    pub(super) async fn leave_queue(&self, ino: Ino, writer: &WriteHandle<C>) {
        let Some(q) = self.queue.clone() else {
            return;
        };
        let Some(p) = lock(&q.pending).remove(&ino) else {
            return;
        };
        q.forget(&p.spool);
        writer.release_locally().await;
        self.release_held(p.pin).await;
        self.forget(ino, 1);
        q.room.notify_waiters();
    }

    /// fsync of a pending file: stored now.
    pub(super) async fn fsync_pending(
        &self,
        ino: Ino,
        writer: &Arc<WriteHandle<C>>,
    ) -> FsResult<()> {
        let stored = match self.check_before_store(ino, writer).await {
            Ok(()) => self.commit(ino, writer).await,
            Err(e) => Err(e),
        };
        match stored {
            Ok(()) => {
                self.leave_queue(ino, writer).await;
                Ok(())
            }
            // The queue stores it beside the other client's version.
            Err(FsError::Stale) => {
                self.queue_again(ino);
                Err(FsError::Io(
                    "another client changed the object since the file was opened".into(),
                ))
            }
            Err(e) => Err(e),
        }
    }

    /// The worker looks at `ino` again now.
    fn queue_again(&self, ino: Ino) {
        if let Some(q) = &self.queue {
            if let Some(p) = lock(&q.pending).get_mut(&ino) {
                p.retry_at = Instant::now();
            }
            q.wake.notify_one();
        }
    }

    /// Where the server does not check conditional writes: the object must still be what the
    /// file was opened on (ESTALE otherwise).
    async fn check_before_store(&self, ino: Ino, writer: &WriteHandle<C>) -> FsResult<()> {
        let Some(q) = &self.queue else {
            return Ok(());
        };
        if q.checks() == ServerChecks::Yes {
            return Ok(());
        }
        let expect = writer.state.lock().await.expect.clone();
        let key = self.inode(ino)?.key();
        let holds = match (&expect, self.client.head_object(&key).await) {
            (Expect::Any, _) => true,
            (Expect::Absent, Err(e)) if e.kind == ErrorKind::NoSuchKey => true,
            (Expect::Etag(want), Ok(head)) => head.etag == *want,
            (_, Err(e)) if e.kind != ErrorKind::NoSuchKey => {
                return Err(super::error::from_client(e))
            }
            _ => false,
        };
        if holds {
            Ok(())
        } else {
            Err(FsError::Stale)
        }
    }

    /// Learns once whether the server checks conditional writes: a PUT with `If-Match` on a
    /// key that does not exist is refused by one that does (and stores nothing); one that does
    /// not stores it, and the probe is deleted again.
    pub async fn probe_conditional_writes(&self) {
        let Some(q) = &self.queue else {
            return;
        };
        let key = format!(
            "{}.s3mount-probe-{:016x}",
            self.config.prefix,
            fastrand::u64(..)
        );
        let etag = "\"00000000000000000000000000000000\"";
        let answer = self
            .client
            .put_object_if(
                &key,
                crate::s3::PutBody::Bytes(bytes::Bytes::new()),
                &ObjectAttributes::default(),
                Condition::Etag(etag),
            )
            .await;
        let checks = match answer {
            Err(e) if matches!(e.kind, ErrorKind::PreconditionFailed | ErrorKind::NoSuchKey) => {
                ServerChecks::Yes
            }
            Ok(_) => {
                let _ = self.client.delete_object(&key).await;
                ServerChecks::No
            }
            Err(e) => {
                tracing::warn!("could not tell whether the server checks conditional writes: {e}");
                ServerChecks::Unknown
            }
        };
        match checks {
            ServerChecks::Yes => tracing::info!(
                "write-back: the server checks conditional writes (If-Match, If-None-Match)"
            ),
            _ => tracing::info!(
                "write-back: the server does not check conditional writes; each store first \
                 checks the object with HeadObject"
            ),
        }
        q.checks.store(checks as u8, Ordering::Relaxed);
    }

    /// Starts the worker that stores pending files.
    pub fn start_write_back(self: &Arc<Self>, rt: &tokio::runtime::Handle) {
        let Some(q) = self.queue.clone() else {
            return;
        };
        let fs = self.clone();
        rt.spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(STORES_AT_ONCE));
            loop {
                let now = Instant::now();
                let due: Vec<Ino> = {
                    let pending = lock(&q.pending);
                    pending
                        .iter()
                        .filter(|(_, p)| !p.storing && p.retry_at <= now)
                        .map(|(ino, _)| *ino)
                        .collect()
                };
                for ino in due {
                    if fs.open_besides_queue(ino) > 0 {
                        continue;
                    }
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        break;
                    };
                    if let Some(p) = lock(&q.pending).get_mut(&ino) {
                        p.storing = true;
                    }
                    let fs = fs.clone();
                    let q = q.clone();
                    tokio::spawn(async move {
                        fs.store_pending(ino).await;
                        if let Some(p) = lock(&q.pending).get_mut(&ino) {
                            p.storing = false;
                        }
                        drop(slot);
                        q.wake.notify_one();
                    });
                }
                let next = lock(&q.pending)
                    .values()
                    .filter(|p| !p.storing)
                    .map(|p| p.retry_at.saturating_duration_since(Instant::now()))
                    .min()
                    .unwrap_or(IDLE_LOOK);
                let wait = next.clamp(Duration::from_millis(1), IDLE_LOOK);
                let _ = tokio::time::timeout(wait, q.wake.notified()).await;
            }
        });
    }

    /// One attempt to store pending file `ino`.
    async fn store_pending(&self, ino: Ino) {
        let Some(q) = self.queue.clone() else {
            return;
        };
        let _held = self.hold(ino).await;
        if !self.is_pending(ino) || self.open_besides_queue(ino) > 0 {
            return;
        }
        let Some(writer) = self.inode(ino).ok().and_then(|i| self.writer_of(&i)) else {
            return;
        };
        let conflict = lock(&q.pending).get(&ino).and_then(|p| p.conflict.clone());
        let result = match &conflict {
            Some(copy) => {
                {
                    let mut s = writer.state.lock().await;
                    s.key = copy.clone();
                    s.expect = Expect::Absent;
                    s.touch();
                }
                writer.commit().await.map(drop)
            }
            None => match self.check_before_store(ino, &writer).await {
                Ok(()) => self.commit(ino, &writer).await,
                Err(e) => Err(e),
            },
        };
        // What the outcome says of S3's reachability.
        match &result {
            Ok(()) | Err(FsError::Stale) => q.reached(true),
            Err(FsError::S3(e)) if e.is_transient() || e.outcome_unknown() => q.reached(false),
            Err(_) => {}
        }
        match result {
            Ok(()) => {
                q.stored.fetch_add(1, Ordering::Relaxed);
                if let Some(copy) = conflict {
                    let key = self.key_of(ino).unwrap_or_default();
                    tracing::error!(
                        key,
                        copy,
                        "another client changed the object after this file was closed: its \
                         version stays, the local one is stored as the copy"
                    );
                    if let Ok(inode) = self.inode(ino) {
                        inode.forget_local_changes();
                        self.entries_changed(inode.parent());
                    }
                }
                self.leave_queue(ino, &writer).await;
            }
            Err(FsError::Stale) if conflict.is_none() => {
                let key = self.key_of(ino).unwrap_or_default();
                let copy = format!("{key}.s3mount-conflict-{}", stamp(SystemTime::now()));
                q.conflicts.fetch_add(1, Ordering::Relaxed);
                if let Some(p) = lock(&q.pending).get_mut(&ino) {
                    p.conflict = Some(copy.clone());
                    p.retry_at = Instant::now();
                }
                // A later mount stores it there too.
                let since = lock(&q.pending)
                    .get(&ino)
                    .map_or_else(SystemTime::now, |p| p.since);
                let recorded = writer.keep_locally(INLINE_MAX).await.and_then(|kept| {
                    let kept = KeptLocally {
                        expect: Expect::Absent,
                        ..kept
                    };
                    self.record_entry(&q, &key, &kept, since, Some(copy.clone()))
                });
                if let Err(e) = recorded {
                    tracing::warn!(
                        key,
                        "the conflict copy is not recorded for a later mount: {e}"
                    );
                }
                q.wake.notify_one();
            }
            Err(e) => {
                let mut pending = lock(&q.pending);
                if let Some(p) = pending.get_mut(&ino) {
                    p.failures += 1;
                    let wait = backoff(p.failures);
                    p.retry_at = Instant::now() + wait;
                    tracing::warn!(
                        key = p.key,
                        attempts = p.failures,
                        "write-back: not stored yet ({e}); the file is safe on local disk, next \
                         attempt in {} s",
                        wait.as_secs()
                    );
                }
            }
        }
    }

    /// At mount: the files an earlier mount left in the queue are entered into the namespace
    /// with their attributes and queued again. Returns how many.
    pub async fn recover_write_back(&self) -> usize {
        let Some(q) = self.queue.clone() else {
            return 0;
        };
        let mut recovered = 0;
        for (spool, entry) in q.take_queued() {
            let Some(entry) = entry else {
                tracing::error!(
                    spool = %spool.display(),
                    "a write-back entry cannot be read: its file is not stored (the spool stays)"
                );
                continue;
            };
            if entry.changing {
                tracing::error!(
                    key = entry.key,
                    "the file was being rewritten when the last mount ended: the version that \
                     was being written is not stored"
                );
                q.forget(&spool);
                let _ = std::fs::remove_file(legacy_entry_path(&spool));
                let _ = std::fs::remove_file(&spool);
                continue;
            }
            match self.requeue(&q, &spool, &entry).await {
                Ok(()) => {
                    recovered += 1;
                    // An older version's entry file: into the log from now on.
                    let legacy = legacy_entry_path(&spool);
                    if legacy.exists() && q.record(&spool, &entry, None).is_ok() {
                        let _ = std::fs::remove_file(legacy);
                    }
                }
                Err(e) => tracing::error!(
                    key = entry.key,
                    "a file the last mount did not store yet cannot be queued again ({e}); it \
                     stays in {} for the next mount",
                    spool.display()
                ),
            }
        }
        if recovered > 0 {
            tracing::info!(
                recovered,
                "write-back: files the last mount did not store are queued again"
            );
            q.wake.notify_one();
        }
        recovered
    }

    async fn requeue(&self, q: &Queue, spool: &Path, entry: &Entry) -> FsResult<()> {
        let Some(rel) = entry.key.strip_prefix(&self.config.prefix) else {
            return Err(FsError::Invalid("the key is outside the mount's prefix"));
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(spool)
            .map_err(|e| FsError::local("opening the spool", e))?;
        let head = ObjectHead {
            size: entry.size,
            etag: String::new(),
            last_modified: entry.since,
            content_type: entry.attrs.content_type.clone(),
            content: entry.attrs.content.clone(),
            metadata: entry.attrs.metadata.clone(),
            storage_class: entry.attrs.storage_class.clone(),
            sse: None,
        };
        let (_, mut stat) = stat_of_head(&head);
        stat.etag = None;
        stat.s3_modified = None;
        let (dir, name) = self.directory_for(rel).await?;
        let inode = self.enter_new(&dir, &name, Kind::File, stat.clone());
        inode.change_locally(|s| *s = stat);
        let writer = Arc::new(WriteHandle::recovered(
            self.write_ctx.clone(),
            entry.key.clone(),
            KeptLocally {
                size: entry.size,
                attrs: entry.attrs.clone(),
                expect: entry.expect.clone(),
                spool: spool.to_path_buf(),
                inline: None,
            },
            file,
        ));
        lock(&self.handles.writers).insert(inode.ino, (writer.clone(), 1));
        let pin = self.register(OpenFile::Write {
            ino: inode.ino,
            writer,
            opener: Some(0),
        });
        lock(&q.pending).insert(
            inode.ino,
            Pending {
                pin,
                spool: spool.to_path_buf(),
                key: entry.key.clone(),
                size: entry.size,
                since: entry.since,
                failures: 0,
                retry_at: Instant::now(),
                storing: false,
                conflict: entry.conflict.clone(),
            },
        );
        Ok(())
    }

    /// The directory inode `rel`'s file goes in, and its name: every directory on the way is
    /// looked up, and made (a `dir/` marker) where S3 has none.
    async fn directory_for(&self, rel: &str) -> FsResult<(Arc<super::inode::Inode>, String)> {
        let mut parts: Vec<&str> = rel.split('/').collect();
        let name = parts.pop().unwrap_or_default().to_string();
        let mut dir = self.inode(self.root_ino())?;
        for part in parts {
            let next = match self.resolve(dir.ino, part).await {
                Ok(d) if d.kind == Kind::Directory => d,
                Ok(_) => return Err(FsError::NotADirectory),
                Err(FsError::NotFound) => {
                    let caller = super::Caller {
                        uid: self.config.uid,
                        gid: self.config.gid,
                        process: 0,
                    };
                    let attr = self.mkdir(dir.ino, part, 0o755, caller).await?;
                    self.inode(attr.ino)?
                }
                Err(e) => return Err(e),
            };
            dir = next;
        }
        if !super::valid_name(&name) {
            return Err(FsError::Invalid("not a valid file name"));
        }
        Ok((dir, name))
    }

    /// At unmount: the queue stays on disk for the next mount.
    pub(super) fn write_back_unmounting(&self) {
        self.write_ctx.spools.clear();
        if let Some(q) = &self.queue {
            let info = q.info();
            if info.files > 0 {
                tracing::warn!(
                    files = info.files,
                    bytes = info.bytes,
                    dir = %q.dir().display(),
                    "write-back: files not stored in S3 yet stay queued on local disk; the next \
                     mount of this bucket and prefix with the same --cache-dir stores them"
                );
            } else {
                // Nothing for a later mount: the directory is left with its lock only.
                lock(&q.log).remove();
                tracing::info!("write-back: every file is stored in S3");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_render_and_parse_back() {
        let mut metadata = BTreeMap::new();
        metadata.insert("mode".to_string(), "33188".to_string());
        metadata.insert("mtime".to_string(), "1700000000".to_string());
        for expect in [
            Expect::Any,
            Expect::Absent,
            Expect::Etag("\"abc\"".to_string()),
        ] {
            let e = Entry {
                key: "dir/a file\nwith a newline".to_string(),
                size: 12345,
                since: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
                expect,
                changing: false,
                conflict: Some("x.s3mount-conflict-1".to_string()),
                attrs: ObjectAttributes {
                    content_type: Some("text/plain".to_string()),
                    content: ContentHeaders {
                        cache_control: Some("no-cache".to_string()),
                        ..Default::default()
                    },
                    metadata: metadata.clone(),
                    storage_class: None,
                    sse: None,
                },
            };
            assert_eq!(Entry::parse(&e.to_json()), Some(e));
        }
        assert_eq!(Entry::parse(&json!({ "key": "half" })), None);
    }

    #[test]
    fn backoff_grows_to_a_minute() {
        assert_eq!(backoff(1), BACKOFF_UNIT * 2);
        assert_eq!(backoff(5), BACKOFF_UNIT * 32);
        assert!(backoff(60) <= MAX_BACKOFF);
        assert_eq!(backoff(60), backoff(6));
        assert_eq!(stamp(SystemTime::UNIX_EPOCH), "19700101T000000Z");
    }
}
