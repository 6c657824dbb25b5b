//! Attributes as s3fs-fuse stores them: `x-amz-meta-mode` (decimal, with the file-type bits),
//! `-uid`, `-gid`, `-mtime` (seconds), read from HeadObject. setattr (chmod, chown, utimens,
//! truncate); on a file being written the attributes go into the upload, on a closed file
//! they are applied with CopyObject REPLACE (the data stays on the server) after
//! [`super::METADATA_WRITE_DELAY`], by the core's own deferred store.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use super::copy::{MAX_SINGLE_COPY, RENAME_PARALLELISM};
use super::error::{from_client, FsError, FsResult};
use super::inode::{AttrChange, Ino, Inode, Kind, Stat};
use super::{Attr, OpenFile, S3Filesystem, METADATA_WRITE_DELAY};
use crate::s3::{MetadataDirective, ObjectAttributes, ObjectClient, ObjectHead, PutBody};

pub(super) const S_IFMT: u32 = 0o170000;

pub(super) const S_IFLNK: u32 = 0o120000;

pub(super) fn parse_u32(value: Option<&String>) -> Option<u32> {
    value.and_then(|v| v.trim().parse().ok())
}

/// `x-amz-meta-mtime`: seconds since the epoch, possibly with a fraction.
pub(super) fn parse_mtime(value: Option<&String>) -> Option<SystemTime> {
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
pub(super) fn stat_of_head(head: &ObjectHead) -> (Kind, Stat) {
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

pub(super) const S_IFREG: u32 = 0o100000;

pub(super) const S_IFDIR: u32 = 0o040000;

/// Closed files whose changed attributes S3 does not have yet, when they last changed, and
/// the inode (kept even if the kernel forgets it meanwhile); see
/// [`S3Filesystem::defer_metadata`].
#[derive(Default)]
pub(super) struct Deferred {
    pub(super) pending: Mutex<HashMap<Ino, (Instant, Arc<Inode>)>>,
}

/// Who is asking, for the ownership of new entries.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// The calling process (thread-group id).
    pub process: u32,
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

pub(super) fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `x-amz-meta-*` as s3fs writes them.
pub(super) fn metadata(
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("mode".to_string(), mode.to_string()),
        ("uid".to_string(), uid.to_string()),
        ("gid".to_string(), gid.to_string()),
        ("mtime".to_string(), unix_seconds(mtime).to_string()),
    ])
}

/// mtime with whole seconds, as it will read back from `x-amz-meta-mtime`.
pub(super) fn whole_seconds(t: SystemTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(unix_seconds(t))
}

impl<C: ObjectClient> S3Filesystem<C> {
    /// Starts the deferred store: attribute changes of closed files (chmod, utimens) go to S3
    /// [`METADATA_WRITE_DELAY`] after the last one.
    pub fn start_deferred_store(self: &Arc<Self>, rt: &tokio::runtime::Handle) {
        let fs = self.clone();
        rt.spawn(async move {
            let mut tick = tokio::time::interval(METADATA_WRITE_DELAY);
            loop {
                tick.tick().await;
                fs.store_pending_metadata(METADATA_WRITE_DELAY).await;
            }
        });
    }

    /// The mount ends: what is still deferred goes now.
    pub async fn unmounting(&self) -> bool {
        self.store_pending_metadata(Duration::ZERO).await
    }

    pub(super) fn attrs_for(&self, stat: &Stat, kind: Kind) -> ObjectAttributes {
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

    pub(super) fn new_stat(mode: u32, caller: Caller) -> Stat {
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
        let writer = super::lock(&self.handles.writers)
            .get(&ino)
            .map(|(w, _)| w.clone());
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
                        let file = super::lock(&self.handles.files).get(&fh).cloned();
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
    pub(super) fn defer_metadata(&self, inode: &Arc<Inode>) {
        super::lock(&self.deferred.pending).insert(inode.ino, (Instant::now(), inode.clone()));
    }

    /// Stores the deferred attributes changed more than `older_than` ago; failures are
    /// logged (the call that made the change has returned), and S3's attributes come back.
    /// Returns whether S3 took all of them.
    pub async fn store_pending_metadata(&self, older_than: Duration) -> bool {
        let due: Vec<Ino> = super::lock(&self.deferred.pending)
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
    pub(super) async fn store_metadata_held(&self, ino: Ino) -> bool {
        let Some((_, inode)) = super::lock(&self.deferred.pending).remove(&ino) else {
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

    /// Applies the inode's cached attributes to its object with CopyObject REPLACE.
    pub(super) async fn replace_metadata(&self, inode: &Inode) -> FsResult<()> {
        let key = inode.key();
        tracing::debug!(key, mtime = ?inode.stat().mtime, "copy replace");
        let head = self.client.head_object(&key).await.map_err(from_client)?;
        let (_, now) = stat_of_head(&head);
        inode.refresh(now, self.config.metadata_ttl);
        if !inode.lock().local_changes {
            // Another client replaced the object since: its version wins.
            return Ok(());
        }
        // Only ours change: other clients' user metadata stays.
        let ours = self.attrs_for(&inode.stat(), inode.kind);
        let mut metadata = head.metadata;
        metadata.extend(ours.metadata);
        let attrs = ObjectAttributes {
            content_type: head.content_type,
            storage_class: head.storage_class,
            sse: head.sse,
            metadata,
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
}
