//! Attributes as s3fs-fuse stores them: `x-amz-meta-mode` (decimal, with the file-type bits),
//! `-uid`, `-gid`, `-mtime` (seconds), read from HeadObject. setattr (chmod, chown, utimens,
//! truncate); on a file being written the attributes go into the upload, on a closed file
//! they are applied with CopyObject REPLACE (the data stays on the server) after
//! [`super::METADATA_WRITE_DELAY`], by the core's own deferred store.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use super::copy::{kept_with_ours, MAX_SINGLE_COPY, RENAME_PARALLELISM};
use super::error::{from_client, FsError, FsResult};
use super::inode::{AttrChange, Ino, Inode, Kind, Stat, ROOT_INO};
use super::write::max_file_size;
use super::xattr;
use super::{Attr, OpenFile, S3Filesystem, METADATA_WRITE_DELAY};
use crate::s3::{
    ErrorKind, MetadataDirective, ObjectAttributes, ObjectClient, ObjectHead, PutBody,
};

pub(super) const S_IFMT: u32 = 0o170000;

pub(super) const S_IFLNK: u32 = 0o120000;

pub(super) fn parse_u32(value: Option<&String>) -> Option<u32> {
    value.and_then(|v| v.trim().parse().ok())
}

/// `x-amz-meta-mtime` (`-ctime`, `-atime`): seconds since the epoch, possibly with a decimal
/// fraction (s3fs-fuse writes nine digits, rclone fewer).
pub(super) fn parse_time(value: Option<&String>) -> Option<SystemTime> {
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
    let kind = if is_old_directory(head, mode) {
        Kind::Directory
    } else {
        kind_of_mode(mode.unwrap_or(S_IFREG))
    };
    let stat = Stat {
        size: head.size,
        mtime: parse_time(head.metadata.get("mtime")).unwrap_or(head.last_modified),
        ctime: parse_time(head.metadata.get("ctime")),
        atime: parse_time(head.metadata.get("atime")),
        rdev: parse_u32(head.metadata.get("rdev")),
        xattrs: head
            .metadata
            .get(xattr::HEADER)
            .map(|h| xattr::decode(h))
            .unwrap_or_default(),
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

/// The file types an object can stand for besides files, directories and symlinks.
pub(super) const SPECIAL_TYPES: [u32; 4] =
    [libc::S_IFIFO, libc::S_IFSOCK, libc::S_IFCHR, libc::S_IFBLK];

/// Whether `head` is a directory in the old s3fs-fuse format: a zero-byte object named
/// without the trailing `/`, typed `application/x-directory` (or Nextcloud's
/// `httpd/unix-directory`), or with a directory's mode.
pub(super) fn is_old_directory(head: &ObjectHead, mode: Option<u32>) -> bool {
    let typed = head.content_type.as_deref().is_some_and(|t| {
        let t = t.split(';').next().unwrap_or("").trim();
        t == DIRECTORY_TYPE || t == "httpd/unix-directory"
    });
    head.size == 0 && (typed || mode.is_some_and(|m| m & S_IFMT == S_IFDIR))
}

/// The suffix of the zero-byte objects Hadoop's S3 file systems (and older tools) mark a
/// directory `dir` with: `dir_$folder$`.
pub(super) const FOLDER_SUFFIX: &str = "_$folder$";

/// What an object is by the file type of its `x-amz-meta-mode` (a regular file when it has
/// none, or one this mount cannot show).
pub(super) fn kind_of_mode(mode: u32) -> Kind {
    match mode & S_IFMT {
        S_IFLNK => Kind::Symlink,
        t if SPECIAL_TYPES.contains(&t) => Kind::Special(t),
        _ => Kind::File,
    }
}

/// The file-type bits of `kind`.
pub(super) fn type_bits(kind: Kind) -> u32 {
    match kind {
        Kind::File => S_IFREG,
        Kind::Directory => S_IFDIR,
        Kind::Symlink => S_IFLNK,
        Kind::Special(t) => t,
    }
}

pub(super) const S_IFDIR: u32 = 0o040000;

/// The Content-Type of directory markers, as s3fs-fuse writes them (and reads the old
/// zero-byte `dir` objects by).
pub(super) const DIRECTORY_TYPE: &str = "application/x-directory";

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
    pub atime: Option<SystemTime>,
}

/// A time as s3fs-fuse writes it: whole seconds since the epoch, with nine digits of
/// nanoseconds when there are any.
pub(super) fn format_time(t: SystemTime) -> String {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    match d.subsec_nanos() {
        0 => d.as_secs().to_string(),
        n => format!("{}.{n:09}", d.as_secs()),
    }
}

/// `x-amz-meta-*` as s3fs writes them, from the attributes a stat shows.
pub(super) fn metadata(mode: u32, uid: u32, gid: u32, stat: &Stat) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("mode".to_string(), mode.to_string()),
        ("uid".to_string(), uid.to_string()),
        ("gid".to_string(), gid.to_string()),
        ("mtime".to_string(), format_time(stat.mtime)),
        (
            "ctime".to_string(),
            format_time(stat.ctime.unwrap_or(stat.mtime)),
        ),
        (
            "atime".to_string(),
            format_time(stat.atime.unwrap_or(stat.mtime)),
        ),
    ])
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
        let stored = self.store_pending_metadata(Duration::ZERO).await;
        self.write_back_unmounting();
        self.flush_read_cache(true).await;
        stored
    }

    pub(super) fn attrs_for(&self, stat: &Stat, kind: Kind) -> ObjectAttributes {
        let perm = stat
            .mode
            .map_or(self.default_perm(kind) as u32, |m| m & 0o7777);
        let mut metadata = metadata(
            type_bits(kind) | perm,
            stat.uid.unwrap_or(self.config.uid),
            stat.gid.unwrap_or(self.config.gid),
            stat,
        );
        if let Some(rdev) = stat.rdev {
            metadata.insert("rdev".to_string(), rdev.to_string());
        }
        if let Some(x) = xattr::encode(&stat.xattrs) {
            metadata.insert(xattr::HEADER.to_string(), x);
        }
        ObjectAttributes {
            // A directory marker has the type s3fs-fuse gives it.
            content_type: (kind == Kind::Directory).then(|| DIRECTORY_TYPE.to_string()),
            metadata,
            ..Default::default()
        }
    }

    pub(super) fn new_stat(mode: u32, caller: Caller) -> Stat {
        let now = SystemTime::now();
        Stat {
            size: 0,
            mtime: now,
            ctime: Some(now),
            atime: Some(now),
            rdev: None,
            xattrs: BTreeMap::new(),
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
        let only_atime = change.mode.is_none()
            && change.uid.is_none()
            && change.gid.is_none()
            && change.size.is_none()
            && change.mtime.is_none();
        if only_atime && (change.atime.is_none() || self.config.read_only) {
            return Ok(self.attr_of(&inode));
        }
        if !only_atime {
            self.check_writable()?;
        }
        let limit = max_file_size(self.config.write.part_size);
        if change.size.is_some_and(|size| size > limit) {
            // Refused before anything changes (EFBIG, as a local file system past its limit).
            return Err(FsError::FileTooLarge(format!(
                "a size past {limit} bytes, the most S3's 10,000 parts hold"
            )));
        }
        self.up_to_date(&inode).await?;
        let now = SystemTime::now();
        // Every change moves ctime; a truncation moves mtime as a write does (POSIX says so of
        // truncate and ftruncate even when the size stays, and O_TRUNC comes here too).
        let attrs = AttrChange {
            mode: change.mode.map(|m| m & 0o7777),
            uid: change.uid,
            gid: change.gid,
            mtime: change.mtime.or(change.size.map(|_| now)),
            ctime: Some(now),
            atime: change.atime,
            xattrs: None,
        };
        self.change(&inode, attrs, change.size).await
    }

    /// Brings a closed file's cached attributes up to date before they are changed or read
    /// whole (a listing's entry has no metadata yet).
    async fn up_to_date(&self, inode: &Arc<Inode>) -> FsResult<()> {
        if !self.metadata_known(inode) {
            self.refresh_from_s3(inode).await?;
        }
        Ok(())
    }

    /// Whether the cached attributes of `inode` are what S3 has, metadata included: fresh and
    /// from a HEAD, or ours (a file being written), or a directory's (kept here).
    fn metadata_known(&self, inode: &Inode) -> bool {
        let written = super::lock(&self.handles.writers).contains_key(&inode.ino);
        let s = inode.lock();
        let fresh = s.expiry > std::time::Instant::now() && !s.stat.listing_only;
        inode.kind == Kind::Directory || inode.ino == ROOT_INO || written || fresh
    }

    /// [`S3Filesystem::getxattr`] when it needs no request (the attributes are fresh, or the
    /// file is being written), else `None`. The kernel asks for `security.capability` at
    /// each write: that must not cost a task, let alone a request.
    pub fn getxattr_now(&self, ino: Ino, name: &str) -> Option<FsResult<Vec<u8>>> {
        let inode = match self.inode(ino) {
            Ok(i) => i,
            Err(e) => return Some(Err(e)),
        };
        let known = self.metadata_known(&inode)
            // `ls -l` asks every entry for its ACL and security label: an entry only a large
            // listing showed is not worth a HeadObject each for that. Once its attributes
            // expire, the kernel's next lookup of it reads its metadata.
            || (inode.lock().stat.listing_only
                && !(name.starts_with("user.") || name.starts_with("trusted.")));
        let value = known.then(|| inode.lock().stat.xattrs.get(name).cloned());
        value.map(|v| v.ok_or(FsError::NoAttribute))
    }

    /// The value of extended attribute `name` (ENODATA when the file has none of that name).
    pub async fn getxattr(&self, ino: Ino, name: &str) -> FsResult<Vec<u8>> {
        let inode = self.inode(ino)?;
        self.up_to_date(&inode).await?;
        let value = inode.lock().stat.xattrs.get(name).cloned();
        value.ok_or(FsError::NoAttribute)
    }

    /// The names of the file's extended attributes.
    pub async fn listxattr(&self, ino: Ino) -> FsResult<Vec<String>> {
        let inode = self.inode(ino)?;
        self.up_to_date(&inode).await?;
        let names = inode.lock().stat.xattrs.keys().cloned().collect();
        Ok(names)
    }

    /// Sets (`value`) or removes (`None`) extended attribute `name`; `create` fails on an
    /// existing name (XATTR_CREATE), `replace` on a missing one (XATTR_REPLACE). Stored as
    /// chmod is: with the upload of a file being written, by the deferred copy of a closed
    /// one, at once on a directory's marker.
    pub async fn set_xattr(
        &self,
        ino: Ino,
        name: &str,
        value: Option<&[u8]>,
        create: bool,
        replace: bool,
    ) -> FsResult<()> {
        if !xattr::allowed(name) {
            return Err(FsError::NotSupported(
                "extended attributes outside the user, trusted, security and POSIX ACL names",
            ));
        }
        self.check_writable()?;
        let inode = self.inode(ino)?;
        let _held = self.hold(ino).await;
        self.up_to_date(&inode).await?;
        let mut stat = inode.stat();
        let exists = stat.xattrs.contains_key(name);
        // An access ACL sets the mode's bits (cp -p and cp -a set permissions this way); one
        // that says no more than the mode is kept as the mode alone.
        let acl = value
            .filter(|_| name == "system.posix_acl_access")
            .and_then(xattr::acl_mode);
        let mode = acl.map(|(bits, _)| {
            let old = stat
                .mode
                .unwrap_or(u32::from(self.default_perm(inode.kind)));
            old & !0o777 | bits
        });
        match value {
            _ if create && exists => return Err(FsError::Exists),
            Some(_) if replace && !exists && acl.is_none() => return Err(FsError::NoAttribute),
            None if !exists => return Err(FsError::NoAttribute),
            Some(_) if acl.is_some_and(|(_, minimal)| minimal) => drop(stat.xattrs.remove(name)),
            Some(v) => drop(stat.xattrs.insert(name.to_string(), v.to_vec())),
            None => drop(stat.xattrs.remove(name)),
        }
        let size = xattr::metadata_size(&self.attrs_for(&stat, inode.kind).metadata);
        if size > xattr::METADATA_LIMIT {
            return Err(FsError::TooBig(format!(
                "the object's metadata would take {size} bytes, past S3's {} byte limit",
                xattr::METADATA_LIMIT
            )));
        }
        let attrs = AttrChange {
            mode: mode.map(|m| m & 0o7777),
            ctime: Some(SystemTime::now()),
            xattrs: Some(stat.xattrs),
            ..Default::default()
        };
        self.change(&inode, attrs, None).await.map(drop)
    }

    /// Applies `attrs` (and a new `size`) to `inode`, which the caller holds: at once on a
    /// directory's marker, into the upload of a file being written, by a truncating rewrite,
    /// or by the deferred copy of a closed file.
    async fn change(
        &self,
        inode: &Arc<Inode>,
        attrs: AttrChange,
        size: Option<u64>,
    ) -> FsResult<Attr> {
        let ino = inode.ino;
        let writer = super::lock(&self.handles.writers)
            .get(&ino)
            .map(|(w, _)| w.clone());
        if ino == ROOT_INO {
            // The mount's root has no object of its own (on a whole-bucket mount its key would
            // be the empty key, a request about the bucket): changes last as long as the mount.
            inode.change_locally(|s| attrs.apply(s));
            return Ok(self.attr_of(inode));
        }
        if inode.kind == Kind::Directory {
            // Stored at once: the change shows only once S3 has it.
            let mut stat = inode.stat();
            attrs.apply(&mut stat);
            self.store_directory_attrs(&inode.key(), &stat).await?;
            // A listing does not say a directory's attributes: they are kept here.
            inode.change_locally(|s| attrs.apply(s));
            return Ok(self.attr_of(inode));
        }
        // Set by the caller, not only moved by a truncation.
        let set = size.is_none() || attrs.sets_more_than_times();
        inode.change_attrs(attrs, writer.is_none() && size.is_none());
        match (inode.kind, writer) {
            (Kind::File, Some(w)) => {
                // Open for writing (or pending in the write-back queue): everything goes into
                // the upload at the next commit.
                if let Some(size) = size {
                    self.pending_changes(ino).await?;
                    w.truncate(size).await?;
                    inode.lock().stat.size = size;
                }
                // Into an upload created from now on, too. Times a truncation moves, as a
                // write's, are not worth a copy of an object stored without them.
                self.attrs_to_writer(inode, &w).await;
                {
                    let mut s = w.state.lock().await;
                    if set {
                        s.attrs_set();
                    }
                    s.touch();
                }
                self.pending_changed(ino).await?;
            }
            (Kind::File, None) => {
                if let Some(size) = size {
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
                    self.defer_metadata(inode);
                }
            }
            // A symlink (a directory was stored above).
            _ => self.defer_metadata(inode),
        }
        Ok(self.attr_of(inode))
    }

    /// Stores a directory's attributes on its marker `key`: a copy onto itself that keeps
    /// what the marker has besides ours (other clients' metadata, its Content-Type), or a new
    /// marker where the directory had none (an implicit directory).
    async fn store_directory_attrs(&self, key: &str, stat: &Stat) -> FsResult<()> {
        let ours = self.attrs_for(stat, Kind::Directory);
        match self.client.head_object(key).await {
            Ok(head) => {
                let attrs = kept_with_ours(&head, ours.metadata);
                self.client
                    .copy_object(key, key, &MetadataDirective::Replace(attrs))
                    .await
                    .map_err(from_client)?;
            }
            Err(e) if e.kind == ErrorKind::NoSuchKey => {
                self.client
                    .put_object(key, PutBody::Bytes(Bytes::new()), &ours)
                    .await
                    .map_err(from_client)?;
            }
            Err(e) => return Err(from_client(e)),
        }
        Ok(())
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
        let attrs = kept_with_ours(&head, self.attrs_for(&inode.stat(), inode.kind).metadata);
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
