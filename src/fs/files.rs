//! Open files: the handle table, reads through [`super::read::ReadHandle`], and writes through
//! [`super::write::WriteHandle`], one per inode while any descriptor has it open for writing
//! and shared by all of them, so two descriptors of one file write one spool and the last
//! close leaves the complete file. flush commits, release commits what no close stored.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;

use super::attributes::{stat_of_head, Caller};
use super::copy::{kept_with_ours, replace_ours};
use super::error::{from_client, FsError, FsResult};
use super::inode::{Ino, Inode, Kind, Stat};
use super::read::ReadHandle;
use super::write::{Appended, Expect, WriteHandle};
use super::{lock, AtimeMode, Attr, OpenFile, S3Filesystem, RELATIME_INTERVAL};
use crate::s3::{ErrorKind, ObjectAttributes, ObjectClient};

/// What [`S3Filesystem::write_now`] did with a write it took: `Done(n)` may be answered at
/// once, `Then(n)` after [`S3Filesystem::after_write_now`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrittenNow {
    Done(u32),
    Then(u32),
}

/// The tables of open things: file handles, the shared write handle of each inode open for
/// writing, the per-inode change locks, and the counter that numbers handles (file and
/// directory handles share it).
pub(super) struct Handles<C> {
    pub(super) files: Mutex<HashMap<u64, OpenFile<C>>>,
    /// The write handle of each inode open for writing, with its count of opens.
    pub(super) writers: Mutex<HashMap<Ino, SharedWriter<C>>>,
    /// One lock per inode that is being changed (see `S3Filesystem::hold`).
    pub(super) changing: Mutex<HashMap<Ino, Arc<tokio::sync::Mutex<()>>>>,
    next_handle: AtomicU64,
}

/// An inode's write handle and how many descriptors have it open.
type SharedWriter<C> = (Arc<WriteHandle<C>>, usize);

impl<C> Handles<C> {
    pub(super) fn new() -> Self {
        Self {
            files: Mutex::default(),
            writers: Mutex::default(),
            changing: Mutex::default(),
            next_handle: AtomicU64::new(1),
        }
    }

    /// A number for a new file or directory handle.
    pub(super) fn next_number(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }
}

impl<C: ObjectClient> S3Filesystem<C> {
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
            // The kernel opens FIFOs itself and refuses devices on a nodev mount.
            Kind::Special(_) => return Err(FsError::Invalid("cannot open a special file")),
            Kind::File => {}
        }
        if write {
            return self.open_for_write(inode, truncate, opener).await;
        }
        self.accessed(&inode);
        if lock(&self.handles.writers).contains_key(&ino) {
            // Being written through another descriptor: read what is being written.
            let writer = lock(&self.handles.writers)
                .get(&ino)
                .map(|(w, _)| w.clone());
            if let Some(writer) = writer {
                let fh = self.handles.next_number();
                lock(&self.handles.writers)
                    .entry(ino)
                    .and_modify(|(_, n)| *n += 1);
                lock(&self.handles.files).insert(
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
                    self.ns.inodes.remove_name(loc.parent, &loc.name);
                }
            }
            from_client(e)
        })?;
        let (_, stat) = stat_of_head(&head);
        inode.refresh(stat, self.config.metadata_ttl);
        let handle = ReadHandle::new(inode.key(), head.etag, head.size, self.read_ctx.clone());
        let fh = self.handles.next_number();
        lock(&self.handles.files).insert(fh, OpenFile::Read(Arc::new(handle)));
        Ok(fh)
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let file = lock(&self.handles.files)
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
        let data = self.read_handle(fh)?.read_now(offset, size as u64)?;
        if let Ok(data) = &data {
            self.count_read(data);
        }
        Some(data)
    }

    pub(super) fn count_read(&self, data: &Bytes) {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
    }

    /// The inode a file handle open for writing belongs to.
    pub fn handle_ino(&self, fh: u64) -> Option<Ino> {
        match lock(&self.handles.files).get(&fh) {
            Some(OpenFile::Write { ino, .. }) => Some(*ino),
            _ => None,
        }
    }

    pub(super) fn check_writable(&self) -> FsResult<()> {
        if self.config.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// The write handle of `inode`, made if this is the first writer.
    pub(super) fn writer_for(
        &self,
        inode: &Inode,
        attrs: ObjectAttributes,
    ) -> FsResult<Arc<WriteHandle<C>>> {
        let shared = |writers: &mut HashMap<Ino, SharedWriter<C>>| {
            let (w, opens) = writers.get_mut(&inode.ino)?;
            *opens += 1;
            Some(w.clone())
        };
        if let Some(w) = shared(&mut super::lock(&self.handles.writers)) {
            return Ok(w);
        }
        // Made outside the lock (it creates the spool file); another open of the same inode
        // may have made one meanwhile, and then that one is shared.
        let new = Arc::new(WriteHandle::new(
            self.write_ctx.clone(),
            inode.key(),
            attrs,
        )?);
        let mut writers = super::lock(&self.handles.writers);
        if let Some(w) = shared(&mut writers) {
            return Ok(w);
        }
        writers.insert(inode.ino, (new.clone(), 1));
        Ok(new)
    }

    pub(super) fn register(&self, file: OpenFile<C>) -> u64 {
        let fh = self.handles.next_number();
        super::lock(&self.handles.files).insert(fh, file);
        fh
    }

    /// Creates an empty file and opens it for writing.
    pub async fn create(
        &self,
        parent: Ino,
        name: &str,
        mode: u32,
        caller: Caller,
    ) -> FsResult<(Attr, u64)> {
        let dir = self.new_name(parent, name).await?;
        let stat = Self::new_stat(mode, caller);
        let attrs = ObjectAttributes {
            content_type: self.config.content_types.of(name),
            ..self.attrs_for(&stat, Kind::File)
        };
        let inode = self.enter_new(&dir, name, Kind::File, stat);
        let writer = self.writer_for(&inode, attrs)?;
        writer.state.lock().await.expect = Expect::Absent;
        let fh = self.register(OpenFile::Write {
            ino: inode.ino,
            writer,
            opener: Some(caller.process),
        });
        Ok((self.attr_of(&inode), fh))
    }

    /// Opens an existing file for writing. With `truncate` it starts empty; otherwise it
    /// starts from the stored object, fetched or copied server-side only as needed.
    pub(super) async fn open_for_write(
        &self,
        inode: Arc<Inode>,
        truncate: bool,
        opener: Option<u32>,
    ) -> FsResult<u64> {
        self.check_writable()?;
        let existing = super::lock(&self.handles.writers)
            .get(&inode.ino)
            .map(|(w, _)| w.clone());
        if let Some(w) = existing {
            // A pending file rewritten: its entry no longer holds until the next close.
            self.pending_changes(inode.ino).await?;
            if truncate {
                w.truncate(0).await?;
                self.written(inode.ino, 0);
            }
            let writer = self.writer_for(&inode, ObjectAttributes::default())?;
            return Ok(self.register(OpenFile::Write {
                ino: inode.ino,
                writer,
                opener,
            }));
        }
        let head = self
            .client
            .head_object(&inode.key())
            .await
            .map_err(from_client)?;
        let (_, stat) = stat_of_head(&head);
        // Rewritten in place or from empty, it is the same file: what it is stored with
        // (other clients' metadata, content headers, extended attributes) stays.
        let attrs = kept_with_ours(&head, self.attrs_for(&stat, Kind::File).metadata);
        inode.refresh(stat, self.config.metadata_ttl);
        let writer = self.writer_for(&inode, attrs)?;
        writer.state.lock().await.expect = Expect::Etag(head.etag.clone());
        if truncate {
            self.written(inode.ino, 0);
        } else {
            writer.start_from(head.etag.clone(), head.size).await?;
        }
        Ok(self.register(OpenFile::Write {
            ino: inode.ino,
            writer,
            opener,
        }))
    }

    pub(super) fn drop_writer(&self, ino: Ino) -> Option<Arc<WriteHandle<C>>> {
        let mut writers = super::lock(&self.handles.writers);
        let (w, opens) = writers.get_mut(&ino)?;
        *opens -= 1;
        let w = w.clone();
        if *opens == 0 {
            writers.remove(&ino);
            return Some(w);
        }
        None
    }

    /// The write handle of open file `fh`, and its inode.
    fn writer_of_handle(&self, fh: u64) -> FsResult<(Ino, Arc<WriteHandle<C>>)> {
        match super::lock(&self.handles.files).get(&fh) {
            Some(OpenFile::Write { ino, writer, .. }) => Ok((*ino, writer.clone())),
            _ => Err(FsError::BadHandle),
        }
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let (ino, writer) = self.writer_of_handle(fh)?;
        let n = writer.write(offset, data).await?;
        let size = writer.size().await;
        self.written(ino, size);
        Ok(n)
    }

    /// [`S3Filesystem::write`] of data copied out of the kernel's request: the copy is freed
    /// as soon as it is taken, before the writer waits for uploads to leave room, so copies
    /// of requests in flight stay few and short-lived.
    pub async fn write_owned(&self, fh: u64, offset: u64, data: bytes::Bytes) -> FsResult<u32> {
        let (ino, writer) = self.writer_of_handle(fh)?;
        let n = writer.take(offset, &data).await?;
        drop(data);
        let size = writer.size().await;
        self.written(ino, size);
        writer.room().await?;
        Ok(n)
    }

    /// The common case of a sequential writer, taken at once on the FUSE thread, without a
    /// task or a copy of the data: `None` when the write must go the full (async) way (see
    /// [`WriteHandle::append_now`]). [`WrittenNow::Then`] asks for
    /// [`S3Filesystem::after_write_now`] before the writer is answered.
    pub fn write_now(&self, fh: u64, offset: u64, data: &[u8]) -> Option<WrittenNow> {
        let (ino, writer) = match super::lock(&self.handles.files).get(&fh) {
            Some(OpenFile::Write { ino, writer, .. }) => (*ino, writer.clone()),
            _ => return None,
        };
        let appended = writer.append_now(offset, data)?;
        let n = data.len() as u32;
        Some(match appended {
            Appended::Taken(size) => {
                self.written(ino, size);
                WrittenNow::Done(n)
            }
            Appended::PartFull(size) => {
                self.written(ino, size);
                WrittenNow::Then(n)
            }
        })
    }

    /// Finishes a write that [`S3Filesystem::write_now`] took and that completed a part: the
    /// part's upload starts, and the writer waits for room (back-pressure).
    pub async fn after_write_now(&self, fh: u64) -> FsResult<()> {
        let file = super::lock(&self.handles.files)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        match file {
            OpenFile::Write { writer, .. } => writer.seal_full_part().await,
            OpenFile::Read(_) => Err(FsError::BadHandle),
        }
    }

    pub(super) fn written(&self, ino: Ino, size: u64) {
        if let Some(inode) = self.ns.inodes.get(ino) {
            let now = SystemTime::now();
            inode.change_locally(|s| {
                s.size = size;
                s.mtime = now;
                s.ctime = Some(now);
            });
        }
    }

    /// A file is opened for reading: its atime moves as the mount's atime option says. Kept
    /// in memory only; S3 gets it with the next store of the file's attributes or data (a
    /// read never costs a request of its own).
    fn accessed(&self, inode: &Inode) {
        let now = SystemTime::now();
        let mut s = inode.lock();
        let atime = s.stat.atime.unwrap_or(s.stat.mtime);
        let ctime = s.stat.ctime.unwrap_or(s.stat.mtime);
        let moves = match self.config.atime {
            AtimeMode::Strict => true,
            // Linux's relatime: when the last access is older than the last change, or a
            // day old.
            AtimeMode::Relatime => {
                atime <= s.stat.mtime
                    || atime <= ctime
                    || now.duration_since(atime).unwrap_or_default() >= RELATIME_INTERVAL
            }
            AtimeMode::Off => false,
        };
        if moves {
            s.stat.atime = Some(now);
        }
    }

    /// Changes to one inode (commit, setattr, rename) happen one at a time: a close's commit
    /// and a utimens right after it must not overtake each other.
    pub(super) async fn hold(&self, ino: Ino) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = super::lock(&self.handles.changing)
            .entry(ino)
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// Commits the file's data to S3 (flush and fsync): returns only once S3 has it.
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        self.flush_by(fh, None).await
    }

    /// A close of a descriptor of `fh` by process `closer` (its thread-group id): commits,
    /// unless another process opened the file. A child that inherited the descriptor (every
    /// fork of a program writing a file, closing it at exec or exit) must not store the file
    /// half-written; the opener's own close, or the last release, stores it.
    pub async fn flush_by(&self, fh: u64, closer: Option<u32>) -> FsResult<()> {
        let file = super::lock(&self.handles.files)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        if let OpenFile::Write {
            ino,
            writer,
            opener,
        } = file
        {
            if let (Some(opener), Some(closer)) = (opener, closer) {
                if opener != closer {
                    tracing::debug!(
                        ino,
                        opener,
                        closer,
                        "close by another process: not committed"
                    );
                    return Ok(());
                }
            }
            let _held = self.hold(ino).await;
            if self.queue.is_some() {
                self.close_to_queue(ino, &writer).await?;
            } else {
                self.commit(ino, &writer).await?;
            }
        }
        Ok(())
    }

    /// The attributes as they are now (chmod or utimens while open) go into the upload.
    pub(super) async fn attrs_to_writer(&self, inode: &Inode, writer: &WriteHandle<C>) {
        let ours = self.attrs_for(&inode.stat(), inode.kind).metadata;
        replace_ours(&mut writer.state.lock().await.attrs.metadata, ours);
    }

    pub(super) async fn commit(&self, ino: Ino, writer: &WriteHandle<C>) -> FsResult<()> {
        {
            let inode = self.inode(ino)?;
            self.attrs_to_writer(&inode, writer).await;
            writer.state.lock().await.key = inode.key();
        }
        match writer.commit().await {
            Ok(Some(etag)) => {
                tracing::debug!(ino, etag, "committed");
                let size = writer.size().await;
                if let Some(inode) = self.ns.inodes.get(ino) {
                    let kept = inode.kept_attrs();
                    // What S3 has now is exactly what the inode says: fresh for a full TTL.
                    let stat = Stat {
                        etag: Some(etag),
                        size,
                        ..inode.stat()
                    };
                    inode.stored(stat, self.config.metadata_ttl);
                    self.entries_changed(inode.parent());
                    let (left_behind, foreign) = {
                        let s = writer.state.lock().await;
                        (s.attrs_left_behind, s.attrs_of_another_write)
                    };
                    if (left_behind && !kept.is_empty()) || foreign {
                        // A chmod or touch after the multipart upload was created, or an
                        // upload resumed from an interrupted write: S3 gave the object the
                        // attributes of the upload's creation. The data is stored: a copy
                        // that fails is tried again later, not reported. (Times moved only by
                        // the writes themselves are not worth a copy of the object: it keeps
                        // the mtime of the upload's creation.)
                        inode.change_attrs(kept, true);
                        if let Err(e) = self.replace_metadata(&inode).await {
                            tracing::warn!(
                                key = inode.key(),
                                "attributes changed during the upload not stored yet: {e}"
                            );
                            self.defer_metadata(&inode);
                        }
                        return Ok(());
                    }
                }
                // The upload carried the attributes.
                super::lock(&self.deferred.pending).remove(&ino);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => {
                let key = self.ns.inodes.get(ino).map(|i| i.key()).unwrap_or_default();
                tracing::error!(key, "could not store the file in S3: {e}");
                Err(e)
            }
        }
    }

    /// Closes a handle; the last writer of a file commits what is left.
    pub async fn release_file(&self, fh: u64) {
        let ino = match super::lock(&self.handles.files).get(&fh) {
            Some(OpenFile::Write { ino, .. }) => Some(*ino),
            _ => None,
        };
        match ino {
            Some(ino) => {
                let _held = self.hold(ino).await;
                self.release_held(fh).await;
            }
            None => {
                let was_read = matches!(
                    super::lock(&self.handles.files).remove(&fh),
                    Some(OpenFile::Read(_))
                );
                if was_read {
                    self.flush_read_cache(false).await;
                }
            }
        }
    }

    pub(super) async fn release_held(&self, fh: u64) {
        let file = super::lock(&self.handles.files).remove(&fh);
        if let Some(OpenFile::Write { ino, writer, .. }) = file {
            if self.drop_writer(ino).is_none() {
                return; // other descriptors still have it open
            }
            // Changes no close has tried to store yet (a write after the last flush, which
            // mmap can make) are stored now. A commit that failed at a close is not tried
            // again behind the application's back: that close reported the failure, and the
            // file must not appear in S3 afterwards.
            let stored = if writer.commit_due_at_release().await {
                self.commit(ino, &writer).await.is_ok()
            } else {
                !writer.has_unstored_changes().await
            };
            if !stored {
                writer.discard().await;
                // What S3 has is the truth again: forget the changes it never got.
                if let Some(inode) = self.ns.inodes.get(ino) {
                    inode.forget_local_changes();
                    if inode.has_kept_attrs() {
                        // A chmod or touch of the file still holds: it is stored by a copy.
                        self.defer_metadata(&inode);
                    }
                }
            }
        }
    }

    /// fsync: the file's data (see [`S3Filesystem::flush`]) and its deferred attributes.
    pub async fn fsync(&self, ino: Ino, fh: u64) -> FsResult<()> {
        if self.queue.is_some() {
            // Write-back or not, fsync returns once S3 has the file.
            if let Ok((ino, writer)) = self.writer_of_handle(fh) {
                let _held = self.hold(ino).await;
                self.fsync_pending(ino, &writer).await?;
            }
        } else {
            self.flush(fh).await?;
        }
        let _held = self.hold(ino).await;
        if !self.store_metadata_held(ino).await {
            return Err(FsError::Io("attributes not stored in S3".into()));
        }
        Ok(())
    }

    /// The write handle of `inode`, if it is open for writing.
    pub(super) fn writer_of(&self, inode: &Inode) -> Option<Arc<WriteHandle<C>>> {
        super::lock(&self.handles.writers)
            .get(&inode.ino)
            .map(|(w, _)| w.clone())
    }
}
