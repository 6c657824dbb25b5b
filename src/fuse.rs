//! The FUSE adapter: `impl fuser::Filesystem` over the core [`S3Filesystem`].
//!
//! Each callback does one thing: it hands the request to a tokio task that calls one async
//! method of the core and turns the result into `reply.*(...)` or `reply.error(errno)`. The
//! FUSE thread never waits on the network, so the kernel can keep many requests (readahead of
//! several files, a parallel `ls`) in flight at once. Everything with behaviour lives in the
//! core, which is tested without FUSE; this file only translates types.

use std::ffi::OsStr;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::activity::Activity;
use crate::fs::error::{FsError, FsResult};
use crate::fs::inode::Kind;
use crate::fs::{Attr, S3Filesystem};
use crate::fs::{Caller, SetAttr, WrittenNow};
use crate::iomode::{IoModes, Refused};
use crate::s3::ObjectClient;

/// Largest read and write the kernel sends us (it asks for at most this much readahead too).
const MAX_IO: u32 = 1024 * 1024;

pub struct FuseAdapter<C: ObjectClient> {
    fs: Arc<S3Filesystem<C>>,
    runtime: tokio::runtime::Handle,
    ownership: Ownership,
    activity: Option<Arc<Activity>>,
    io: Arc<IoModes>,
}

/// Owner and permission bits the mount shows for every entry whatever S3's metadata says
/// (`uid=`, `gid=`, `file_mode=`, `dir_mode=`, `umask=`: s3fs's meaning). Only what is
/// shown changes: the core still reads and stores the objects' own `x-amz-meta-*`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ownership {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub file_mode: Option<u16>,
    pub dir_mode: Option<u16>,
    /// Bits cleared from the permissions of every file and directory.
    pub umask: Option<u16>,
}

impl Ownership {
    fn apply(&self, mut a: FileAttr) -> FileAttr {
        if let Some(uid) = self.uid {
            a.uid = uid;
        }
        if let Some(gid) = self.gid {
            a.gid = gid;
        }
        let forced = match a.kind {
            FileType::RegularFile => self.file_mode,
            FileType::Directory => self.dir_mode,
            // A symlink's bits mean nothing (always 777, as on Linux file systems).
            _ => return a,
        };
        if let Some(mode) = forced {
            a.perm = mode;
        }
        if let Some(mask) = self.umask {
            a.perm &= !mask;
        }
        a
    }
}

impl<C: ObjectClient> FuseAdapter<C> {
    pub fn new(fs: Arc<S3Filesystem<C>>, runtime: tokio::runtime::Handle) -> Self {
        Self {
            fs,
            runtime,
            ownership: Ownership::default(),
            activity: None,
            io: Arc::default(),
        }
    }

    /// Shows every entry with these owner and permission overrides.
    pub fn with_ownership(mut self, ownership: Ownership) -> Self {
        self.ownership = ownership;
        self
    }

    /// Tells `activity` how many bytes applications write into each file.
    pub fn with_activity(mut self, activity: Arc<Activity>) -> Self {
        self.activity = Some(activity);
        self
    }

    /// Counts a write of `n` bytes into inode `ino` for `s3mount status`.
    fn note_written(&self, ino: INodeNo, n: u32) {
        note_written(self.activity.as_deref(), &self.fs, ino, n);
    }

    fn spawn<F>(&self, task: impl FnOnce(Arc<S3Filesystem<C>>) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.runtime.spawn(task(self.fs.clone()));
    }
}

fn note_written<C: ObjectClient>(
    activity: Option<&Activity>,
    fs: &S3Filesystem<C>,
    ino: INodeNo,
    n: u32,
) {
    if let Some(activity) = activity {
        if let Some(key) = fs.key_of(ino.0) {
            activity.written(&key, u64::from(n));
        }
    }
}

fn errno(e: &FsError, what: &str) -> Errno {
    e.log_if_unexpected(what);
    Errno::from_i32(e.errno())
}

/// Replies to an entry-making request (lookup, mkdir, symlink, mknod).
fn reply_entry(
    reply: ReplyEntry,
    ttl: std::time::Duration,
    own: Ownership,
    result: FsResult<Attr>,
    what: &str,
) {
    match result {
        Ok(attr) => reply.entry(&ttl, &own.apply(file_attr(&attr)), Generation(0)),
        Err(e) => reply.error(errno(&e, what)),
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Directory => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Special(libc::S_IFIFO) => FileType::NamedPipe,
        Kind::Special(libc::S_IFSOCK) => FileType::Socket,
        Kind::Special(libc::S_IFCHR) => FileType::CharDevice,
        Kind::Special(_) => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        flags: 0,
        // The preferred I/O size: cp, cat and friends size their buffers by it, and one
        // large write is one FUSE request instead of eight.
        blksize: MAX_IO,
    }
}

fn time_or_now(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// An xattr value or name list: its size when asked for (`size` 0), ERANGE when it does not
/// fit the caller's buffer.
fn reply_xattr(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::from_i32(libc::ERANGE));
    } else {
        reply.data(data);
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        process: process_of(req.pid()),
    }
}

/// The process (thread-group id) of the thread `pid` that made a request: FUSE names the
/// thread, and a file opened by one thread of a program may be closed by another.
fn process_of(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(pid)
}

/// A name as the core takes it: names that are not UTF-8 cannot be S3 keys, and every callback
/// refuses them the same way (EILSEQ).
fn utf8(name: &OsStr) -> Result<String, Errno> {
    name.to_str()
        .map(str::to_string)
        .ok_or_else(|| Errno::from_i32(FsError::NotUtf8.errno()))
}

impl<C: ObjectClient> Filesystem for FuseAdapter<C> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Best effort: an older kernel that refuses one of these still mounts.
        let _ = config.set_max_readahead(MAX_IO);
        let _ = config.set_max_write(MAX_IO);
        let _ = config.add_capabilities(
            InitFlags::FUSE_DO_READDIRPLUS
                | InitFlags::FUSE_READDIRPLUS_AUTO
                | InitFlags::FUSE_PARALLEL_DIROPS
                | InitFlags::FUSE_ASYNC_READ
                | InitFlags::FUSE_CACHE_SYMLINKS,
        );
        let _ = config.set_max_background(64);
        // Whole objects of the read cache are read by the kernel itself (see iomode.rs).
        if self.fs.cache_passthrough()
            && config.set_max_stack_depth(1).is_ok()
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
        {
            self.io.enable();
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = match utf8(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let own = self.ownership;
        self.spawn(|fs| async move {
            reply_entry(
                reply,
                fs.ttl(),
                own,
                fs.lookup(parent.0, &name).await,
                &format!("lookup {name:?}"),
            )
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let own = self.ownership;
        self.spawn(|fs| async move {
            match fs.getattr(ino.0).await {
                Ok(attr) => reply.attr(&fs.ttl(), &own.apply(file_attr(&attr))),
                Err(e) => reply.error(errno(&e, "getattr")),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = SetAttr {
            mode,
            uid,
            gid,
            size,
            mtime: mtime.map(time_or_now),
            atime: atime.map(time_or_now),
        };
        let own = self.ownership;
        self.spawn(|fs| async move {
            match fs.setattr(ino.0, change).await {
                Ok(attr) => reply.attr(&fs.ttl(), &own.apply(file_attr(&attr))),
                Err(e) => reply.error(errno(&e, "setattr")),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn(|fs| async move {
            match fs.readlink(ino.0).await {
                Ok(target) => reply.data(&target),
                Err(e) => reply.error(errno(&e, "readlink")),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let name = match utf8(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let caller = caller(req);
        let own = self.ownership;
        self.spawn(|fs| async move {
            let made = async {
                if mode & libc::S_IFMT != libc::S_IFREG {
                    return fs.mknod(parent.0, &name, mode, rdev, caller).await;
                }
                let (attr, fh) = fs.create(parent.0, &name, mode, caller).await?;
                let flushed = fs.flush(fh).await;
                fs.release_file(fh).await;
                flushed.map(|()| attr)
            };
            reply_entry(reply, fs.ttl(), own, made.await, "mknod")
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let name = match utf8(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let caller = caller(req);
        let own = self.ownership;
        self.spawn(|fs| async move {
            reply_entry(
                reply,
                fs.ttl(),
                own,
                fs.mkdir(parent.0, &name, mode, caller).await,
                "mkdir",
            )
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = match utf8(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.spawn(|fs| async move {
            match fs.unlink(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e, "unlink")),
            }
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = match utf8(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.spawn(|fs| async move {
            match fs.rmdir(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e, "rmdir")),
            }
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        // The target is the object's content: it must be UTF-8 too.
        let (name, target) = match (utf8(name), utf8(target.as_os_str())) {
            (Ok(n), Ok(t)) => (n, t),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        let caller = caller(req);
        let own = self.ownership;
        self.spawn(|fs| async move {
            reply_entry(
                reply,
                fs.ttl(),
                own,
                fs.symlink(parent.0, &name, &target, caller).await,
                "symlink",
            )
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, newname) = match (utf8(name), utf8(newname)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return reply.error(errno(
                &FsError::Invalid("RENAME_EXCHANGE and RENAME_WHITEOUT are not supported"),
                "rename",
            ));
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        self.spawn(|fs| async move {
            match fs
                .rename(parent.0, &name, newparent.0, &newname, no_replace)
                .await
            {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e, "rename")),
            }
        });
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(errno(&FsError::NotPermitted("hard links"), "link"));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        let truncate = flags.0 & libc::O_TRUNC != 0;
        let opener = write.then(|| process_of(req.pid()));
        let io = self.io.clone();
        self.spawn(|fs| async move {
            // An open for writing is refused, before it truncates anything, while readers
            // have the file open in passthrough.
            if write {
                if let Err(Refused(e)) = io.start_write_open(ino.0).await {
                    return reply.error(e);
                }
            }
            match fs.open_by(ino.0, write, truncate, opener).await {
                Ok(fh) => {
                    let answered = io.reply_open(&fs, ino.0, fh, write, reply).await;
                    if let Err((Refused(e), reply)) = answered {
                        fs.release_file(fh).await;
                        reply.error(e);
                    }
                }
                Err(e) => {
                    if write {
                        io.write_open_failed(ino.0);
                    }
                    reply.error(errno(&e, "open"))
                }
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Data already on local disk needs no task.
        if let Some(read) = self.fs.read_now(fh.0, offset, size) {
            return match read {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(&e, "read")),
            };
        }
        self.spawn(|fs| async move {
            match fs.read(fh.0, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(&e, "read")),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // A sequential write into memory needs no task (nor a copy of the data for one); one
        // that completes a part waits for its upload to have room before it is answered.
        match self.fs.write_now(fh.0, offset, data) {
            Some(WrittenNow::Done(n)) => {
                self.note_written(ino, n);
                return reply.written(n);
            }
            Some(WrittenNow::Then(n)) => {
                self.note_written(ino, n);
                return self.spawn(|fs| async move {
                    match fs.after_write_now(fh.0).await {
                        Ok(()) => reply.written(n),
                        Err(e) => reply.error(errno(&e, "write")),
                    }
                });
            }
            None => {}
        }
        let data = bytes::Bytes::copy_from_slice(data);
        let activity = self.activity.clone();
        self.spawn(|fs| async move {
            match fs.write_owned(fh.0, offset, data).await {
                Ok(n) => {
                    note_written(activity.as_deref(), &fs, ino, n);
                    reply.written(n)
                }
                Err(e) => reply.error(errno(&e, "write")),
            }
        });
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let closer = process_of(req.pid());
        self.spawn(|fs| async move {
            match fs.flush_by(fh.0, Some(closer)).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e, "close")),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The kernel sends RELEASE after close(2) returned and waits for no answer, so an
        // unmount can complete while it is in flight; answered after the work, the reply would
        // then fail ("Failed to send FUSE reply") on a clean unmount. Answered first, it cannot.
        reply.ok();
        self.io.released(fh.0);
        self.spawn(|fs| async move {
            fs.release_file(fh.0).await;
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn(|fs| async move {
            match fs.fsync(ino.0, fh.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e, "fsync")),
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.spawn(|fs| async move {
            match fs.opendir(ino.0).await {
                Ok(fh) => {
                    reply.opened(FileHandle(fh), FopenFlags::empty());
                    fs.prefetch_subdirectories(fh);
                }
                Err(e) => reply.error(errno(&e, "opendir")),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let added = self.fs.readdir_with(ino.0, fh.0, offset, |next, e| {
            reply.add(INodeNo(e.attr.ino), next, file_type(e.attr.kind), &e.name)
        });
        match added {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "readdir")),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ttl = self.fs.ttl();
        let added = self.fs.readdir_with(ino.0, fh.0, offset, |next, e| {
            let full = reply.add(
                INodeNo(e.attr.ino),
                next,
                &e.name,
                &ttl,
                &self.ownership.apply(file_attr(&e.attr)),
                Generation(0),
            );
            // The kernel holds a reference on every entry but `.` and `..`.
            if !full && e.name != "." && e.name != ".." {
                self.fs.entry_returned(e.attr.ino);
            }
            full
        });
        match added {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "readdirplus")),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks, s.bfree, s.bfree, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let name = match utf8(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let value = value.to_vec();
        let (create, replace) = (
            flags & libc::XATTR_CREATE != 0,
            flags & libc::XATTR_REPLACE != 0,
        );
        self.spawn(|fs| async move {
            match fs
                .set_xattr(ino.0, &name, Some(&value), create, replace)
                .await
            {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e, "setxattr")),
            }
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = match utf8(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        if let Some(now) = self.fs.getxattr_now(ino.0, &name) {
            return match now {
                Ok(value) => reply_xattr(reply, size, &value),
                Err(e) => reply.error(errno(&e, "getxattr")),
            };
        }
        self.spawn(|fs| async move {
            match fs.getxattr(ino.0, &name).await {
                Ok(value) => reply_xattr(reply, size, &value),
                Err(e) => reply.error(errno(&e, "getxattr")),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.spawn(|fs| async move {
            match fs.listxattr(ino.0).await {
                Ok(names) => {
                    let mut list = Vec::new();
                    for n in names {
                        list.extend_from_slice(n.as_bytes());
                        list.push(0);
                    }
                    reply_xattr(reply, size, &list)
                }
                Err(e) => reply.error(errno(&e, "listxattr")),
            }
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = match utf8(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.spawn(|fs| async move {
            match fs.set_xattr(ino.0, &name, None, false, false).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e, "removexattr")),
            }
        });
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let name = match utf8(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let caller = caller(req);
        let own = self.ownership;
        let io = self.io.clone();
        self.spawn(|fs| async move {
            match fs.create(parent.0, &name, mode, caller).await {
                Ok((attr, fh)) => {
                    io.opened(attr.ino, fh);
                    reply.created(
                        &fs.ttl(),
                        &own.apply(file_attr(&attr)),
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                    )
                }
                Err(e) => reply.error(errno(&e, "create")),
            }
        });
    }
}
