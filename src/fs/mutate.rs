//! Everything that changes the bucket: create, open for writing, write, flush/fsync/release,
//! setattr (chmod, chown, utimens, truncate), mkdir, rmdir, unlink, symlink and rename.
//!
//! Writes go through [`super::write::WriteHandle`]: one per inode while any descriptor has it
//! open for writing, shared by all of them, so two descriptors of one file write one spool and
//! the last close leaves the complete file.
//!
//! Metadata is stored as s3fs-fuse stores it: `x-amz-meta-mode` (decimal, with the file-type
//! bits), `-uid`, `-gid`, `-mtime` (seconds). On a file being written it goes into the upload; on
//! a closed file it is applied with CopyObject REPLACE (the data stays on the server).
//!
//! Renames copy then delete: CopyObject for a file (UploadPartCopy in parts above 5 GiB), and
//! every key under the prefix for a directory, 16 at a time. A file renamed while open for
//! writing is committed at its new name.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use super::error::{from_client, FsError, FsResult};
use super::inode::{AttrChange, Ino, Inode, Kind, Stat};
use super::write::{Appended, WriteHandle, MAX_COPY_PART};
use super::{Attr, OpenFile, S3Filesystem};
use crate::s3::{
    CompletedPart, CopySource, ErrorKind, ListRequest, MetadataDirective, ObjectAttributes,
    ObjectClient, PutBody, MAX_DELETE_KEYS,
};

const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;

/// Objects up to this size are renamed with one CopyObject; above, with UploadPartCopy.
const MAX_SINGLE_COPY: u64 = 5 << 30;
/// Keys copied at once in a directory rename.
const RENAME_PARALLELISM: usize = 16;

/// Who is asking, for the ownership of new entries.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// The calling process (thread-group id).
    pub process: u32,
}

/// What [`S3Filesystem::write_now`] did with a write it took: `Done(n)` may be answered at
/// once, `Then(n)` after [`S3Filesystem::after_write_now`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrittenNow {
    Done(u32),
    Then(u32),
}

/// The changes of a `setattr`; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub mtime: Option<SystemTime>,
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `x-amz-meta-*` as s3fs writes them.
fn metadata(mode: u32, uid: u32, gid: u32, mtime: SystemTime) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("mode".to_string(), mode.to_string()),
        ("uid".to_string(), uid.to_string()),
        ("gid".to_string(), gid.to_string()),
        ("mtime".to_string(), unix_seconds(mtime).to_string()),
    ])
}

/// mtime with whole seconds, as it will read back from `x-amz-meta-mtime`.
fn whole_seconds(t: SystemTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(unix_seconds(t))
}

impl<C: ObjectClient> S3Filesystem<C> {
    fn check_writable(&self) -> FsResult<()> {
        if self.config.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// The name must be new in `parent`; returns the parent.
    async fn new_name(&self, parent: Ino, name: &str) -> FsResult<Arc<Inode>> {
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
    fn enter_new(&self, dir: &Inode, name: &str, kind: Kind, stat: Stat) -> Arc<Inode> {
        let inode = self
            .inodes
            .upsert(dir, name, kind, stat, self.config.metadata_ttl);
        self.forget_negative(dir.ino, name);
        self.inodes.add_lookup(&inode);
        self.entries_changed(dir.ino);
        inode
    }

    fn forget_negative(&self, parent: Ino, name: &str) {
        super::lock(&self.negative).remove(&(parent, name.to_string()));
    }

    fn attrs_for(&self, stat: &Stat, kind: Kind) -> ObjectAttributes {
        let type_bits = match kind {
            Kind::File => S_IFREG,
            Kind::Directory => S_IFDIR,
            Kind::Symlink => S_IFLNK,
        };
        let perm = stat.mode.map_or(
            match kind {
                Kind::Directory => self.config.dir_mode as u32,
                Kind::File => self.config.file_mode as u32,
                Kind::Symlink => 0o777,
            },
            |m| m & 0o7777,
        );
        ObjectAttributes {
            metadata: metadata(
                type_bits | perm,
                stat.uid.unwrap_or(self.config.uid),
                stat.gid.unwrap_or(self.config.gid),
                stat.mtime,
            ),
            ..Default::default()
        }
    }

    fn new_stat(mode: u32, caller: Caller) -> Stat {
        Stat {
            size: 0,
            mtime: whole_seconds(SystemTime::now()),
            etag: None,
            mode: Some(mode & 0o7777),
            uid: Some(caller.uid),
            gid: Some(caller.gid),
            s3_modified: None,
            listing_only: false,
        }
    }

    /// The write handle of `inode`, made if this is the first writer.
    fn writer_for(&self, inode: &Inode, attrs: ObjectAttributes) -> FsResult<Arc<WriteHandle<C>>> {
        let mut writers = super::lock(&self.writers);
        if let Some((w, opens)) = writers.get_mut(&inode.ino) {
            *opens += 1;
            return Ok(w.clone());
        }
        let w = Arc::new(WriteHandle::new(
            self.client.clone(),
            self.config.write.clone(),
            self.journal.clone(),
            self.read_ctx.budget.clone(),
            inode.key(),
            attrs,
        )?);
        writers.insert(inode.ino, (w.clone(), 1));
        Ok(w)
    }

    fn register(&self, file: OpenFile<C>) -> u64 {
        let fh = self
            .next_handle
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        super::lock(&self.files).insert(fh, file);
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
        let attrs = self.attrs_for(&stat, Kind::File);
        let inode = self.enter_new(&dir, name, Kind::File, stat);
        let writer = self.writer_for(&inode, attrs)?;
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
        let existing = super::lock(&self.writers)
            .get(&inode.ino)
            .map(|(w, _)| w.clone());
        if let Some(w) = existing {
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
        let (_, stat) = super::stat_of_head(&head);
        let attrs = ObjectAttributes {
            content_type: head.content_type.clone(),
            ..self.attrs_for(&stat, Kind::File)
        };
        inode.refresh(stat, self.config.metadata_ttl);
        let writer = self.writer_for(&inode, attrs)?;
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

    fn drop_writer(&self, ino: Ino) -> Option<Arc<WriteHandle<C>>> {
        let mut writers = super::lock(&self.writers);
        let (w, opens) = writers.get_mut(&ino)?;
        *opens -= 1;
        let w = w.clone();
        if *opens == 0 {
            writers.remove(&ino);
            return Some(w);
        }
        None
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let file = super::lock(&self.files)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        let OpenFile::Write { ino, writer, .. } = file else {
            return Err(FsError::BadHandle);
        };
        let n = writer.write(offset, data).await?;
        let size = writer.size().await;
        self.written(ino, size);
        Ok(n)
    }

    /// [`S3Filesystem::write`] of data copied out of the kernel's request: the copy is freed
    /// as soon as it is taken, before the writer waits for uploads to leave room, so copies
    /// of requests in flight stay few and short-lived.
    pub async fn write_owned(&self, fh: u64, offset: u64, data: bytes::Bytes) -> FsResult<u32> {
        let file = super::lock(&self.files)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        let OpenFile::Write { ino, writer, .. } = file else {
            return Err(FsError::BadHandle);
        };
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
        let (ino, writer) = match super::lock(&self.files).get(&fh) {
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
        let file = super::lock(&self.files)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        match file {
            OpenFile::Write { writer, .. } => writer.seal_full_part().await,
            OpenFile::Read(_) => Err(FsError::BadHandle),
        }
    }

    fn written(&self, ino: Ino, size: u64) {
        if let Some(inode) = self.inodes.get(ino) {
            inode.change_locally(|s| {
                s.size = size;
                s.mtime = whole_seconds(SystemTime::now());
            });
        }
    }

    /// Changes to one inode (commit, setattr, rename) happen one at a time: a close's commit
    /// and a utimens right after it must not overtake each other.
    pub(super) async fn hold(&self, ino: Ino) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = super::lock(&self.changing).entry(ino).or_default().clone();
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
        let file = super::lock(&self.files)
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
            self.commit(ino, &writer).await?;
        }
        Ok(())
    }

    /// The attributes as they are now (chmod or utimens while open) go into the upload.
    async fn attrs_to_writer(&self, inode: &Inode, writer: &WriteHandle<C>) {
        let stat = inode.stat();
        let mut s = writer.state.lock().await;
        let content_type = s.attrs.content_type.clone();
        s.attrs = ObjectAttributes {
            content_type,
            ..self.attrs_for(&stat, inode.kind)
        };
    }

    async fn commit(&self, ino: Ino, writer: &WriteHandle<C>) -> FsResult<()> {
        {
            let inode = self.inode(ino)?;
            self.attrs_to_writer(&inode, writer).await;
            writer.state.lock().await.key = inode.key();
        }
        match writer.commit().await {
            Ok(Some(etag)) => {
                tracing::debug!(ino, etag, "committed");
                let size = writer.size().await;
                if let Some(inode) = self.inodes.get(ino) {
                    let kept = inode.kept_attrs();
                    // What S3 has now is exactly what the inode says: fresh for a full TTL.
                    let stat = Stat {
                        etag: Some(etag),
                        size,
                        ..inode.stat()
                    };
                    inode.stored(stat, self.config.metadata_ttl);
                    self.entries_changed(inode.parent());
                    if writer.state.lock().await.attrs_left_behind {
                        // A chmod or touch after the multipart upload was created: S3 gave
                        // the object the attributes of its creation. The data is stored: a
                        // copy that fails is tried again later, not reported.
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
                super::lock(&self.pending_metadata).remove(&ino);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => {
                let key = self.inodes.get(ino).map(|i| i.key()).unwrap_or_default();
                tracing::error!(key, "could not store the file in S3: {e}");
                Err(e)
            }
        }
    }

    /// Closes a handle; the last writer of a file commits what is left.
    pub async fn release_file(&self, fh: u64) {
        let ino = match super::lock(&self.files).get(&fh) {
            Some(OpenFile::Write { ino, .. }) => Some(*ino),
            _ => None,
        };
        match ino {
            Some(ino) => {
                let _held = self.hold(ino).await;
                self.release_held(fh).await;
            }
            None => {
                super::lock(&self.files).remove(&fh);
            }
        }
    }

    async fn release_held(&self, fh: u64) {
        let file = super::lock(&self.files).remove(&fh);
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
                if let Some(inode) = self.inodes.get(ino) {
                    inode.forget_local_changes();
                    if inode.has_kept_attrs() {
                        // A chmod or touch of the file still holds: it is stored by a copy.
                        self.defer_metadata(&inode);
                    }
                }
            }
        }
    }

    pub async fn setattr(&self, ino: Ino, change: SetAttr) -> FsResult<Attr> {
        let inode = self.inode(ino)?;
        let _held = self.hold(ino).await;
        tracing::debug!(key = inode.key(), ?change, "setattr");
        let only_times = change.mode.is_none()
            && change.uid.is_none()
            && change.gid.is_none()
            && change.size.is_none();
        if !only_times || change.mtime.is_some() {
            self.check_writable()?;
        }
        if change.mode.is_none()
            && change.uid.is_none()
            && change.gid.is_none()
            && change.size.is_none()
            && change.mtime.is_none()
        {
            return Ok(self.attr_of(&inode)); // atime only: S3 keeps no atime
        }
        let writer = super::lock(&self.writers).get(&ino).map(|(w, _)| w.clone());
        if inode.kind == Kind::File && writer.is_none() && !inode.is_fresh() {
            // Bring the cached attributes up to date before changing them.
            self.refresh_from_s3(&inode).await?;
        }
        let attrs = AttrChange {
            mode: change.mode.map(|m| m & 0o7777),
            uid: change.uid,
            gid: change.gid,
            mtime: change.mtime.map(whole_seconds),
        };
        if inode.kind == Kind::Directory {
            // Stored at once: the change shows only once S3 has it.
            let mut stat = inode.stat();
            attrs.apply(&mut stat);
            let object_attrs = self.attrs_for(&stat, Kind::Directory);
            self.client
                .put_object(&inode.key(), PutBody::Bytes(Bytes::new()), &object_attrs)
                .await
                .map_err(from_client)?;
            // A listing does not say a directory's attributes: they are kept here.
            inode.change_locally(|s| attrs.apply(s));
            return Ok(self.attr_of(&inode));
        }
        inode.change_attrs(attrs, writer.is_none() && change.size.is_none());
        match (inode.kind, writer) {
            (Kind::File, Some(w)) => {
                // Open for writing: everything goes into the upload at the next commit.
                if let Some(size) = change.size {
                    w.truncate(size).await?;
                    inode.lock().stat.size = size;
                }
                // Into an upload created from now on, too.
                self.attrs_to_writer(&inode, &w).await;
                w.state.lock().await.touch();
            }
            (Kind::File, None) => {
                if let Some(size) = change.size {
                    let fh = self.open_for_write(inode.clone(), size == 0, None).await?;
                    // This inode is held already: commit and release without taking it again.
                    let result = async {
                        let file = super::lock(&self.files).get(&fh).cloned();
                        if let Some(OpenFile::Write { writer, .. }) = file {
                            writer.truncate(size).await?;
                            self.commit(ino, &writer).await?;
                        }
                        Ok::<_, FsError>(())
                    }
                    .await;
                    self.release_held(fh).await;
                    result?;
                    inode.lock().stat.size = size;
                } else {
                    self.defer_metadata(&inode);
                }
            }
            // A symlink (a directory was stored above).
            _ => self.defer_metadata(&inode),
        }
        Ok(self.attr_of(&inode))
    }

    /// Notes that the closed file `ino` has attributes S3 does not have yet. They are stored
    /// [`METADATA_WRITE_DELAY`] after the last change (by `store_pending_metadata`), at once by
    /// fsync, with the upload of a commit, or with the copy of a rename: `chmod` and `touch`
    /// right before a rename (what rsync does with each file) cost no copy of their own.
    fn defer_metadata(&self, inode: &Arc<Inode>) {
        super::lock(&self.pending_metadata).insert(inode.ino, (Instant::now(), inode.clone()));
    }

    /// Stores the deferred attributes changed more than `older_than` ago; failures are
    /// logged (the call that made the change has returned), and S3's attributes come back.
    /// Returns whether S3 took all of them.
    pub async fn store_pending_metadata(&self, older_than: Duration) -> bool {
        let due: Vec<Ino> = super::lock(&self.pending_metadata)
            .iter()
            .filter(|(_, (changed, _))| changed.elapsed() >= older_than)
            .map(|(ino, _)| *ino)
            .collect();
        use futures_util::StreamExt;
        let stores = due.into_iter().map(|ino| async move {
            let _held = self.hold(ino).await;
            self.store_metadata_held(ino).await
        });
        // As many at once as a renamed directory copies (`chmod -R` of a large tree).
        futures_util::stream::iter(stores)
            .buffer_unordered(RENAME_PARALLELISM)
            .collect::<Vec<bool>>()
            .await
            .into_iter()
            .all(|stored| stored)
    }

    /// Stores `ino`'s deferred attributes now, if it has any; the caller holds the inode.
    /// Returns false if S3 did not take them.
    async fn store_metadata_held(&self, ino: Ino) -> bool {
        let Some((_, inode)) = super::lock(&self.pending_metadata).remove(&ino) else {
            return true;
        };
        match self.replace_metadata(&inode).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(
                    key = inode.key(),
                    "could not store changed attributes (mode, owner, mtime) in S3: {e}"
                );
                inode.forget_all_changes();
                false
            }
        }
    }

    /// fsync: the file's data (see [`S3Filesystem::flush`]) and its deferred attributes.
    pub async fn fsync(&self, ino: Ino, fh: u64) -> FsResult<()> {
        self.flush(fh).await?;
        let _held = self.hold(ino).await;
        if !self.store_metadata_held(ino).await {
            return Err(FsError::Io("attributes not stored in S3".into()));
        }
        Ok(())
    }

    /// Applies the inode's cached attributes to its object with CopyObject REPLACE.
    async fn replace_metadata(&self, inode: &Inode) -> FsResult<()> {
        let key = inode.key();
        tracing::debug!(key, mtime = ?inode.stat().mtime, "copy replace");
        let head = self.client.head_object(&key).await.map_err(from_client)?;
        let (_, now) = super::stat_of_head(&head);
        inode.refresh(now, self.config.metadata_ttl);
        if !inode.lock().local_changes {
            // Another client replaced the object since: its version wins.
            return Ok(());
        }
        let attrs = ObjectAttributes {
            content_type: head.content_type,
            storage_class: head.storage_class,
            sse: head.sse,
            ..self.attrs_for(&inode.stat(), inode.kind)
        };
        let etag = if head.size > MAX_SINGLE_COPY {
            self.multipart_copy(&key, &key, head.size, &attrs).await?
        } else {
            self.client
                .copy_object(&key, &key, &MetadataDirective::Replace(attrs))
                .await
                .map_err(from_client)?
        };
        let stat = Stat {
            etag: Some(etag),
            ..inode.stat()
        };
        inode.stored(stat, self.config.metadata_ttl);
        Ok(())
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
        Ok(self.attr_of(&inode))
    }

    pub async fn symlink(
        &self,
        parent: Ino,
        name: &str,
        target: &str,
        caller: Caller,
    ) -> FsResult<Attr> {
        let dir = self.new_name(parent, name).await?;
        let mut stat = Self::new_stat(0o777, caller);
        stat.size = target.len() as u64;
        let attrs = self.attrs_for(&stat, Kind::Symlink);
        let key = super::inode::child_key(&dir.key(), name, Kind::Symlink);
        let etag = self
            .client
            .put_object(
                &key,
                PutBody::Bytes(Bytes::copy_from_slice(target.as_bytes())),
                &attrs,
            )
            .await
            .map_err(from_client)?;
        stat.etag = Some(etag);
        let inode = self.enter_new(&dir, name, Kind::Symlink, stat);
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
        }
        super::lock(&self.pending_metadata).remove(&inode.ino);
        inode.forget_all_changes();
        self.inodes.remove_name(parent, name);
        self.entry_removed(parent);
        Ok(())
    }

    /// The write handle of `inode`, if it is open for writing.
    fn writer_of(&self, inode: &Inode) -> Option<Arc<WriteHandle<C>>> {
        super::lock(&self.writers)
            .get(&inode.ino)
            .map(|(w, _)| w.clone())
    }

    /// An entry of `dir` is gone. If it was the last one of a directory that exists only
    /// because of its entries (no marker), the directory is gone too: its cached attributes
    /// expire, so the next lookup asks S3.
    fn entry_removed(&self, dir: Ino) {
        self.entries_changed(dir);
        if let Some(d) = self.inodes.get(dir) {
            d.expire();
        }
    }

    /// After waiting for the inode's change lock: fails with ENOENT if `inode` is no longer
    /// `parent/name` (another rename or unlink moved it meanwhile), so a change never lands on
    /// the object at its new place.
    fn still_at(&self, inode: &Inode, parent: Ino, name: &str) -> FsResult<()> {
        let loc = inode.location();
        let linked = loc.parent == parent
            && loc.name == name
            && self
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
    async fn has_children(&self, dir: &Inode) -> FsResult<bool> {
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
        self.inodes.remove_name(parent, name);
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
        let writer = super::lock(&self.writers)
            .get(&source.ino)
            .map(|(w, _)| w.clone());
        match (source.kind, writer) {
            (Kind::Directory, _) => self.rename_prefix(&old_key, &new_key).await?,
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
                if let Some((old_etag, new_etag)) = moved {
                    s.base_moved(&old_key, &old_etag, &new_key, new_etag);
                }
                s.key = new_key.clone();
                s.touch();
            }
            (_, None) => {
                // Deferred attributes travel with the copy.
                let pending = super::lock(&self.pending_metadata).remove(&source.ino);
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
                            super::lock(&self.pending_metadata).insert(source.ino, changed);
                        }
                        return Err(e);
                    }
                }
            }
        }
        if let Some(w) = replaced_writer {
            w.unlinked().await;
        }
        if let Some(r) = &replaced {
            // Its deferred attributes are for an object that is gone.
            super::lock(&self.pending_metadata).remove(&r.ino);
            r.forget_all_changes();
        }
        self.inodes.rename(&source, &target_dir, new_name);
        self.entry_removed(parent);
        self.entries_changed(new_parent);
        self.forget_negative(new_parent, new_name);
        super::lock(&self.negative).insert(
            (parent, name.to_string()),
            std::time::Instant::now() + self.config.metadata_ttl,
        );
        Ok(())
    }

    /// Moves one object, with its metadata replaced by `replace`'s if given; returns its ETag
    /// before and the copy's ETag.
    async fn copy_then_delete(
        &self,
        from: &str,
        to: &str,
        replace: Option<ObjectAttributes>,
    ) -> FsResult<(String, String)> {
        let head = self.client.head_object(from).await.map_err(from_client)?;
        let mut attrs = ObjectAttributes {
            content_type: head.content_type.clone(),
            metadata: head.metadata.clone(),
            storage_class: head.storage_class.clone(),
            sse: head.sse.clone(),
        };
        let replacing = replace.is_some();
        if let Some(r) = replace {
            attrs.metadata.extend(r.metadata); // ours win; other user metadata stays
        }
        let new_etag = if head.size > MAX_SINGLE_COPY {
            self.multipart_copy(from, to, head.size, &attrs).await?
        } else {
            // Not Copy: S3 would store the copy with the bucket's default encryption and
            // storage class, not the object's.
            let directive = if replacing {
                MetadataDirective::Replace(attrs)
            } else {
                MetadataDirective::Keep(attrs)
            };
            self.client
                .copy_object(from, to, &directive)
                .await
                .map_err(from_client)?
        };
        self.client.delete_object(from).await.map_err(from_client)?;
        Ok((head.etag, new_etag))
    }

    /// Copies `from` to `to` server-side in parts (objects over 5 GiB); returns the new ETag.
    async fn multipart_copy(
        &self,
        from: &str,
        to: &str,
        size: u64,
        attrs: &ObjectAttributes,
    ) -> FsResult<String> {
        let id = self
            .client
            .create_multipart_upload(to, attrs)
            .await
            .map_err(from_client)?;
        let mut parts = Vec::new();
        let mut start = 0;
        let mut n = 1;
        while start < size {
            let end = (start + MAX_COPY_PART).min(size);
            match self
                .client
                .upload_part_copy(to, &id, n, CopySource::range(from, start..end))
                .await
            {
                Ok(etag) => parts.push(CompletedPart {
                    part_number: n,
                    etag,
                }),
                Err(e) => {
                    let _ = self.client.abort_multipart_upload(to, &id).await;
                    return Err(from_client(e));
                }
            }
            start = end;
            n += 1;
        }
        match self.client.complete_multipart_upload(to, &id, &parts).await {
            Ok(etag) => Ok(etag),
            Err(e) => {
                let _ = self.client.abort_multipart_upload(to, &id).await;
                Err(from_client(e))
            }
        }
    }

    /// Moves every key under `from` (a directory prefix) to `to`: copies, 16 at a time, then
    /// deletes in batches. The copies finish before any delete, so a failure leaves the
    /// source whole.
    async fn rename_prefix(&self, from: &str, to: &str) -> FsResult<()> {
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
