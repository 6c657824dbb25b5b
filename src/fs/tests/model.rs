//! A reference model of what a filesystem on S3 must show, and a property test that applies the
//! same random sequence of operations to it and to the core over the mock client, comparing
//! every observable after each step: errnos, read bytes, listings, kinds, sizes, permission
//! bits, and after every remount what S3 holds (mountpoint-s3's reftests do the same).
//!
//! **The model.** Paths of at most two levels over the names `a`, `b`, `c`. A path is a file
//! (its bytes and permission bits), a symlink, a directory with a marker (made by mkdir), or a
//! directory only because something is below it, which is gone when its last entry is. Every
//! descriptor of a file sees one content, which S3 gets at each close and fsync; a file
//! unlinked (or replaced by a rename) while open keeps its content for its descriptors and is
//! never stored again. An operation whose S3 requests were made to fail must change nothing it
//! reports as failed: a failed close returns the file to what S3 has.
//!
//! Two worlds are drawn: a zero metadata TTL with other clients putting and deleting objects
//! out of band (seen at once), and an hour-long TTL where only this mount changes the bucket
//! (every change must show at once from the caches).
//!
//! `S3MOUNT_MODEL_CASES` sets the number of cases (default 48; the note of issue 12 gives a
//! large run). A failing sequence is shrunk, and proptest keeps its seed in
//! `proptest-regressions/fs/tests/model.txt`, run first on every later run; sequences found
//! that way are also written out as named tests at the end of this file.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::super::attributes::{Caller, SetAttr};
use super::super::*;
use crate::s3::{ErrorKind, MockClient, Operation};

const NAMES: [&str; 3] = ["a", "b", "c"];
const PATHS: usize = 12;
const PART_SIZE: u64 = 1024;
const FILE_PERM: u16 = 0o644;
const DIR_PERM: u16 = 0o755;

fn path_of(i: u8) -> String {
    let i = i as usize % PATHS;
    if i < 3 {
        NAMES[i].to_string()
    } else {
        let j = i - 3;
        format!("{}/{}", NAMES[j / 3], NAMES[j % 3])
    }
}

/// The parent directory of `p` ("" for the root) and the name in it.
fn split(p: &str) -> (&str, &str) {
    p.rsplit_once('/').unwrap_or(("", p))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Put,
    Copy,
    Delete,
    Head,
    List,
    Create,
    Part,
    Complete,
}

impl Call {
    fn op(self) -> Operation {
        match self {
            Call::Put => Operation::PutObject,
            Call::Copy => Operation::CopyObject,
            Call::Delete => Operation::DeleteObject,
            Call::Head => Operation::HeadObject,
            Call::List => Operation::ListObjectsV2,
            Call::Create => Operation::CreateMultipartUpload,
            Call::Part => Operation::UploadPart,
            Call::Complete => Operation::CompleteMultipartUpload,
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Create(u8),
    Open {
        path: u8,
        truncate: bool,
    },
    Write {
        handle: u8,
        offset: u16,
        len: u16,
        byte: u8,
    },
    Read {
        handle: u8,
        offset: u16,
        len: u16,
    },
    Truncate {
        path: u8,
        size: u16,
    },
    Close(u8),
    Fsync(u8),
    Unlink(u8),
    Mkdir(u8),
    Rmdir(u8),
    Rename {
        from: u8,
        to: u8,
    },
    Symlink {
        path: u8,
        target: u8,
    },
    Chmod {
        path: u8,
        perm: u16,
    },
    Remount,
    /// Another client puts an object (zero-TTL world only).
    Put {
        path: u8,
        len: u16,
        byte: u8,
    },
    /// Another client deletes an object (zero-TTL world only).
    Delete(u8),
    /// The next request of this kind fails (once), during `op`.
    Fail(Call, Box<Op>),
}

fn plain_op(out_of_band: bool) -> BoxedStrategy<Op> {
    let path = 0u8..PATHS as u8;
    let handle = any::<u8>();
    let mut ops = vec![
        (4, path.clone().prop_map(Op::Create).boxed()),
        (
            2,
            (path.clone(), any::<bool>())
                .prop_map(|(path, truncate)| Op::Open { path, truncate })
                .boxed(),
        ),
        (
            6,
            (handle, 0u16..5000, 1u16..2500, any::<u8>())
                .prop_map(|(handle, offset, len, byte)| Op::Write {
                    handle,
                    offset,
                    len,
                    byte,
                })
                .boxed(),
        ),
        (
            2,
            (handle, 0u16..6000, 1u16..3000)
                .prop_map(|(handle, offset, len)| Op::Read {
                    handle,
                    offset,
                    len,
                })
                .boxed(),
        ),
        (
            1,
            (path.clone(), 0u16..4000)
                .prop_map(|(path, size)| Op::Truncate { path, size })
                .boxed(),
        ),
        (3, handle.prop_map(Op::Close).boxed()),
        (1, handle.prop_map(Op::Fsync).boxed()),
        (2, path.clone().prop_map(Op::Unlink).boxed()),
        (3, path.clone().prop_map(Op::Mkdir).boxed()),
        (1, path.clone().prop_map(Op::Rmdir).boxed()),
        (
            2,
            (path.clone(), path.clone())
                .prop_map(|(from, to)| Op::Rename { from, to })
                .boxed(),
        ),
        (
            1,
            (path.clone(), path.clone())
                .prop_map(|(path, target)| Op::Symlink { path, target })
                .boxed(),
        ),
        (
            1,
            (
                path.clone(),
                prop_oneof![Just(0o600u16), Just(0o640), Just(0o751)],
            )
                .prop_map(|(path, perm)| Op::Chmod { path, perm })
                .boxed(),
        ),
        (1, Just(Op::Remount).boxed()),
    ];
    if out_of_band {
        ops.push((
            2,
            (path.clone(), 1u16..3000, any::<u8>())
                .prop_map(|(path, len, byte)| Op::Put { path, len, byte })
                .boxed(),
        ));
        ops.push((1, path.prop_map(Op::Delete).boxed()));
    }
    proptest::strategy::Union::new_weighted(ops).boxed()
}

fn op(out_of_band: bool) -> BoxedStrategy<Op> {
    let call = prop_oneof![
        Just(Call::Put),
        Just(Call::Copy),
        Just(Call::Delete),
        Just(Call::Head),
        Just(Call::List),
        Just(Call::Create),
        Just(Call::Part),
        Just(Call::Complete),
    ];
    prop_oneof![
        9 => plain_op(out_of_band),
        1 => (call, plain_op(out_of_band)).prop_map(|(c, o)| Op::Fail(c, Box::new(o))),
    ]
    .boxed()
}

/// A world: its TTL, whether other clients change the bucket, and the operations.
fn case() -> impl Strategy<Value = (bool, Vec<Op>)> {
    any::<bool>().prop_flat_map(|zero_ttl| {
        (
            Just(zero_ttl),
            proptest::collection::vec(op(zero_ttl), 1..40),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// The model.

#[derive(Debug, Clone, PartialEq)]
enum Node {
    File(u64),
    /// A directory with a marker; directories without one are derived from what is below.
    Dir(u16),
    Symlink(String),
}

#[derive(Debug, Clone)]
struct File {
    data: Vec<u8>,
    perm: u16,
    /// What S3 has of it (`None`: nothing yet).
    stored: Option<Vec<u8>>,
    /// The mode S3 has, and whether a store of `perm` may have failed (after a failed fsync,
    /// or a remount whose deferred attributes were refused): the core may then show either.
    stored_perm: u16,
    perm_either: bool,
    linked: bool,
}

#[derive(Debug, Clone)]
struct Handle {
    file: u64,
    fh: u64,
}

#[derive(Debug, Clone, Default)]
struct Model {
    nodes: BTreeMap<String, Node>,
    files: HashMap<u64, File>,
    next: u64,
    handles: Vec<Handle>,
}

/// What a path is, as `stat` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    File {
        size: u64,
        perm: u16,
    },
    Dir {
        perm: u16,
    },
    Symlink {
        size: u64,
    },
    /// The model makes none: the core showing one is a mismatch.
    Special,
}

type Errno = i32;

impl Model {
    fn has_below(&self, p: &str) -> bool {
        let prefix = format!("{p}/");
        self.nodes.keys().any(|k| k.starts_with(&prefix))
    }

    fn is_dir(&self, p: &str) -> bool {
        p.is_empty() || matches!(self.nodes.get(p), Some(Node::Dir(_))) || self.has_below(p)
    }

    /// What a lookup of `p` finds, or its errno.
    fn stat(&self, p: &str) -> Result<Seen, Errno> {
        let (parent, _) = split(p);
        if !parent.is_empty() {
            match self.stat(parent)? {
                Seen::Dir { .. } => {}
                // The kernel would follow a symlink; the core sees no directory there.
                _ => return Err(libc::ENOTDIR),
            }
        }
        match self.nodes.get(p) {
            Some(Node::File(id)) => {
                let f = &self.files[id];
                Ok(Seen::File {
                    size: f.data.len() as u64,
                    perm: f.perm,
                })
            }
            Some(Node::Symlink(t)) => Ok(Seen::Symlink {
                size: t.len() as u64,
            }),
            Some(Node::Dir(perm)) => Ok(Seen::Dir { perm: *perm }),
            None if self.has_below(p) => Ok(Seen::Dir { perm: DIR_PERM }),
            None => Err(libc::ENOENT),
        }
    }

    /// The entries of directory `p`: names and whether each is a directory, sorted.
    fn listing(&self, p: &str) -> Vec<(String, Kind)> {
        let prefix = if p.is_empty() {
            String::new()
        } else {
            format!("{p}/")
        };
        let mut out: BTreeMap<String, Kind> = BTreeMap::new();
        for (k, node) in &self.nodes {
            let Some(rest) = k.strip_prefix(&prefix) else {
                continue;
            };
            match rest.split_once('/') {
                Some((dir, _)) => {
                    out.insert(dir.to_string(), Kind::Directory);
                }
                None => {
                    let kind = match node {
                        Node::File(_) => Kind::File,
                        Node::Dir(_) => Kind::Directory,
                        Node::Symlink(_) => Kind::Symlink,
                    };
                    out.entry(rest.to_string()).or_insert(kind);
                }
            }
        }
        out.into_iter().collect()
    }

    /// The parent of `p` must be a directory.
    /// What creating `p` must give: its parent must be a directory and the name free.
    fn may_create(&self, p: &str) -> Result<Outcome, Errno> {
        self.parent_ok(p)?;
        match self.stat(p) {
            Ok(_) => Err(libc::EEXIST),
            Err(_) => Ok(Outcome::Done),
        }
    }

    fn parent_ok(&self, p: &str) -> Result<(), Errno> {
        let (parent, _) = split(p);
        if parent.is_empty() {
            return Ok(());
        }
        match self.stat(parent)? {
            Seen::Dir { .. } => Ok(()),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn new_file(&mut self, data: Vec<u8>, stored: Option<Vec<u8>>) -> u64 {
        self.next += 1;
        self.files.insert(
            self.next,
            File {
                data,
                perm: FILE_PERM,
                stored_perm: FILE_PERM,
                perm_either: false,
                stored,
                linked: true,
            },
        );
        self.next
    }

    fn open_handles_of(&self, file: u64) -> usize {
        self.handles.iter().filter(|h| h.file == file).count()
    }

    /// Whether a file at `p` is open.
    fn is_open(&self, p: &str) -> bool {
        matches!(self.nodes.get(p), Some(Node::File(id)) if self.open_handles_of(*id) > 0)
    }

    /// Whether any file at or below `p` is open.
    fn open_at_or_below(&self, p: &str) -> bool {
        let prefix = format!("{p}/");
        self.nodes.iter().any(|(k, n)| {
            (k == p || k.starts_with(&prefix))
                && matches!(n, Node::File(id) if self.open_handles_of(*id) > 0)
        })
    }

    /// A file's name is gone: its descriptors keep it, S3 never gets it again.
    fn unlink_file(&mut self, id: u64) {
        if let Some(f) = self.files.get_mut(&id) {
            f.linked = false;
        }
    }

    /// A file is committed: S3 has what its descriptors see.
    fn commit(&mut self, id: u64) {
        if let Some(f) = self.files.get_mut(&id) {
            if f.linked {
                // An upload carries the mode (one the data did not need may still be waiting).
                if f.stored.as_ref() != Some(&f.data) {
                    f.stored_perm = f.perm;
                }
                f.stored = Some(f.data.clone());
            }
        }
    }

    /// A failed commit of a file no one else has open: it is what S3 has again.
    fn revert(&mut self, id: u64) {
        let Some(f) = self.files.get(&id).cloned() else {
            return;
        };
        if !f.linked || self.open_handles_of(id) > 0 {
            return;
        }
        match f.stored {
            Some(data) => self.files.get_mut(&id).expect("present").data = data,
            None => self.nodes.retain(|_, n| *n != Node::File(id)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running a case.

struct Run {
    mock: Arc<MockClient>,
    fs: S3Filesystem<MockClient>,
    model: Model,
    ttl: Duration,
    zero_ttl: bool,
    log: Vec<String>,
}

fn me() -> Caller {
    Caller {
        uid: 1000,
        gid: 1000,
        process: 1,
    }
}

fn new_fs(mock: &Arc<MockClient>, ttl: Duration) -> S3Filesystem<MockClient> {
    let config = FsConfig {
        metadata_ttl: ttl,
        uid: 1000,
        gid: 1000,
        write: write::WriteConfig {
            part_size: PART_SIZE,
            upload_concurrency: 2,
            ..Default::default()
        },
        ..FsConfig::default()
    };
    S3Filesystem::new(mock.clone(), config)
}

fn errno<T>(r: FsResult<T>) -> Result<T, Errno> {
    r.map_err(|e| e.errno())
}

/// The operations on one name in a directory that `Run::at_name` applies.
enum NameOp<'a> {
    Unlink,
    Mkdir,
    Rmdir,
    Symlink(&'a str),
}

/// What an operation on a handle gives when no handle is open: nothing to compare.
const NOTHING_OPEN: Both = (Ok(Outcome::Done), Ok(Outcome::Done), None);

/// The model's expected outcome of one operation, the core's, and for a close, which handle
/// and file it was.
type Both = (
    Result<Outcome, Errno>,
    Result<Outcome, Errno>,
    Option<(usize, u64)>,
);

/// Outcomes the model and the core must agree on.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    Data(Vec<u8>),
}

impl Run {
    fn new(zero_ttl: bool) -> Self {
        let ttl = if zero_ttl {
            Duration::ZERO
        } else {
            Duration::from_secs(3600)
        };
        let mock = Arc::new(MockClient::new("b"));
        let fs = new_fs(&mock, ttl);
        Self {
            mock,
            fs,
            model: Model::default(),
            ttl,
            zero_ttl,
            log: Vec::new(),
        }
    }

    /// The inode at `p` through lookups from the root.
    async fn resolve(&self, p: &str) -> Result<Attr, Errno> {
        let mut attr = errno(self.fs.getattr(ROOT_INO).await)?;
        for name in p.split('/').filter(|s| !s.is_empty()) {
            if attr.kind != Kind::Directory {
                return Err(libc::ENOTDIR);
            }
            attr = errno(self.fs.lookup(attr.ino, name).await)?;
        }
        Ok(attr)
    }

    async fn parent_and_name(&self, p: &str) -> Result<(Ino, String), Errno> {
        let (parent, name) = split(p);
        let dir = self.resolve(parent).await?;
        if dir.kind != Kind::Directory {
            return Err(libc::ENOTDIR);
        }
        Ok((dir.ino, name.to_string()))
    }

    /// A change of the name `p` in its parent directory, in the core.
    async fn at_name(&self, p: &str, op: NameOp<'_>) -> Result<Outcome, Errno> {
        let (dir, name) = self.parent_and_name(p).await?;
        match op {
            NameOp::Unlink => errno(self.fs.unlink(dir, &name).await)?,
            NameOp::Rmdir => errno(self.fs.rmdir(dir, &name).await)?,
            NameOp::Mkdir => errno(self.fs.mkdir(dir, &name, 0o40755, me()).await).map(|_| ())?,
            NameOp::Symlink(target) => {
                errno(self.fs.symlink(dir, &name, target, me()).await).map(|_| ())?
            }
        }
        Ok(Outcome::Done)
    }

    /// setattr of the path `p` in the core.
    async fn setattr_at(&self, p: &str, change: SetAttr) -> Result<Outcome, Errno> {
        let attr = self.resolve(p).await?;
        errno(self.fs.setattr(attr.ino, change).await).map(|_| Outcome::Done)
    }

    fn handle(&self, i: u8) -> Option<(usize, Handle)> {
        if self.model.handles.is_empty() {
            return None;
        }
        let at = i as usize % self.model.handles.len();
        Some((at, self.model.handles[at].clone()))
    }

    /// Applies `op` to the core, and what the model expects, and checks they agree. With a
    /// failure injected, a failed operation must leave the model as it was.
    async fn step(&mut self, op: &Op) -> Result<(), String> {
        self.log.push(format!("{op:?}"));
        match op {
            Op::Fail(call, inner) => {
                // A directory rename is many copies and deletes: a failure in the middle leaves
                // what S3 cannot undo (SEMANTICS.md); the model checks the other cases.
                let partial = matches!(**inner, Op::Rename { .. })
                    && matches!(call, Call::Copy | Call::Delete);
                if partial || matches!(**inner, Op::Fail(..)) {
                    return Ok(());
                }
                self.mock.fail_next(call.op(), ErrorKind::InternalError, 1);
                let before = self.model.clone();
                let result = self.apply(inner, true).await;
                self.mock.clear_failures();
                match result {
                    // The core reported a failure: nothing it did may show, but a failed close.
                    Err(Mismatch::CoreFailed(close_of)) => {
                        self.model = before;
                        if let Op::Fsync(h) = **inner {
                            // Attributes S3 refused are given up.
                            if let Some((_, h)) = self.handle(h) {
                                if let Some(f) = self.model.files.get_mut(&h.file) {
                                    f.perm_either = true;
                                }
                            }
                        }
                        if let Some((at, file)) = close_of {
                            self.model.handles.remove(at);
                            self.model.revert(file);
                        }
                        Ok(())
                    }
                    Err(Mismatch::Differs(why)) => Err(why),
                    Ok(()) => Ok(()),
                }
            }
            _ => match self.apply(op, false).await {
                Ok(()) => Ok(()),
                Err(Mismatch::Differs(why)) => Err(why),
                Err(Mismatch::CoreFailed(_)) => Err("the core failed without a failure".into()),
            },
        }
    }

    /// Runs `op` on both. `lenient`: a core failure where the model succeeds is a failure the
    /// test injected, reported as `CoreFailed`.
    async fn apply(&mut self, op: &Op, lenient: bool) -> Result<(), Mismatch> {
        let (expected, got, close_of) = self.both(op).await;
        if expected == got {
            return Ok(());
        }
        if lenient && expected.is_ok() && got.is_err() {
            return Err(Mismatch::CoreFailed(close_of));
        }
        if lenient && expected.is_err() && got.is_err() {
            return Ok(());
        }
        Err(Mismatch::Differs(format!(
            "{op:?}: the model says {expected:?}, the core {got:?}"
        )))
    }

    /// The model's expected outcome (applied to it when it succeeds), the core's, and for a
    /// close, which handle and file it was.
    async fn both(&mut self, op: &Op) -> Both {
        match op {
            Op::Create(p) => {
                let p = path_of(*p);
                let expected = self.model.may_create(&p);
                let got = async {
                    let (dir, name) = self.parent_and_name(&p).await?;
                    errno(self.fs.create(dir, &name, 0o100644, me()).await).map(|(_, fh)| fh)
                }
                .await;
                if let (Ok(_), Ok(fh)) = (&expected, &got) {
                    let id = self.model.new_file(Vec::new(), None);
                    self.model.nodes.insert(p, Node::File(id));
                    self.model.handles.push(Handle { file: id, fh: *fh });
                }
                (expected, got.map(|_| Outcome::Done), None)
            }
            Op::Open { path, truncate } => {
                let p = path_of(*path);
                let expected = match self.model.stat(&p) {
                    Err(e) => Err(e),
                    Ok(Seen::Dir { .. }) => Err(libc::EISDIR),
                    Ok(Seen::Symlink { .. } | Seen::Special) => Err(libc::EINVAL),
                    Ok(Seen::File { .. }) => Ok(Outcome::Done),
                };
                let got = match self.resolve(&p).await {
                    Err(e) => Err(e),
                    Ok(attr) => errno(self.fs.open(attr.ino, true, *truncate).await),
                };
                if let (Ok(_), Ok(fh)) = (&expected, &got) {
                    let Some(Node::File(id)) = self.model.nodes.get(&p).cloned() else {
                        unreachable!("a file");
                    };
                    if *truncate {
                        self.model.files.get_mut(&id).expect("file").data.clear();
                    }
                    self.model.handles.push(Handle { file: id, fh: *fh });
                }
                (expected, got.map(|_| Outcome::Done), None)
            }
            Op::Write {
                handle,
                offset,
                len,
                byte,
            } => {
                let Some((_, h)) = self.handle(*handle) else {
                    return NOTHING_OPEN;
                };
                let data = vec![*byte; *len as usize];
                let got = errno(self.fs.write(h.fh, *offset as u64, &data).await);
                if got.is_ok() {
                    let f = self.model.files.get_mut(&h.file).expect("file");
                    let end = *offset as usize + data.len();
                    if f.data.len() < end {
                        f.data.resize(end, 0);
                    }
                    f.data[*offset as usize..end].copy_from_slice(&data);
                }
                (Ok(Outcome::Done), got.map(|_| Outcome::Done), None)
            }
            Op::Read {
                handle,
                offset,
                len,
            } => {
                let Some((_, h)) = self.handle(*handle) else {
                    return NOTHING_OPEN;
                };
                let data = &self.model.files[&h.file].data;
                let from = (*offset as usize).min(data.len());
                let to = (*offset as usize + *len as usize).min(data.len());
                let expected = Ok(Outcome::Data(data[from..to].to_vec()));
                let got = errno(self.fs.read(h.fh, *offset as u64, *len as u32).await)
                    .map(|b| Outcome::Data(b.to_vec()));
                (expected, got, None)
            }
            Op::Truncate { path, size } => {
                let p = path_of(*path);
                // The kernel refuses directories and follows symlinks: files only.
                let Ok(Seen::File { .. }) = self.model.stat(&p) else {
                    return (Ok(Outcome::Done), Ok(Outcome::Done), None);
                };
                let change = SetAttr {
                    size: Some(*size as u64),
                    ..SetAttr::default()
                };
                let got = self.setattr_at(&p, change).await;
                if got.is_ok() {
                    let Some(Node::File(id)) = self.model.nodes.get(&p).cloned() else {
                        unreachable!("a file");
                    };
                    self.model
                        .files
                        .get_mut(&id)
                        .expect("file")
                        .data
                        .resize(*size as usize, 0);
                    // A closed file is rewritten at once.
                    if self.model.open_handles_of(id) == 0 {
                        self.model.commit(id);
                    }
                }
                (Ok(Outcome::Done), got, None)
            }
            Op::Close(handle) => {
                let Some((at, h)) = self.handle(*handle) else {
                    return (Ok(Outcome::Done), Ok(Outcome::Done), None);
                };
                let flushed = errno(self.fs.flush(h.fh).await);
                self.fs.release_file(h.fh).await;
                if flushed.is_ok() {
                    self.model.handles.remove(at);
                    self.model.commit(h.file);
                }
                (
                    Ok(Outcome::Done),
                    flushed.map(|_| Outcome::Done),
                    Some((at, h.file)),
                )
            }
            Op::Fsync(handle) => {
                let Some((_, h)) = self.handle(*handle) else {
                    return NOTHING_OPEN;
                };
                let ino = self.fs.handle_ino(h.fh).unwrap_or(ROOT_INO);
                let got = errno(self.fs.fsync(ino, h.fh).await);
                if got.is_ok() {
                    self.model.commit(h.file);
                }
                (Ok(Outcome::Done), got.map(|_| Outcome::Done), None)
            }
            Op::Unlink(p) => {
                let p = path_of(*p);
                let expected = match self.model.stat(&p) {
                    Err(e) => Err(e),
                    Ok(Seen::Dir { .. }) => Err(libc::EISDIR),
                    Ok(_) => Ok(Outcome::Done),
                };
                let got = self.at_name(&p, NameOp::Unlink).await;
                if let (Ok(_), Ok(_)) = (&expected, &got) {
                    if let Some(Node::File(id)) = self.model.nodes.remove(&p) {
                        self.model.unlink_file(id);
                    }
                }
                (expected, got, None)
            }
            Op::Mkdir(p) => {
                let p = path_of(*p);
                let expected = self.model.may_create(&p);
                let got = self.at_name(&p, NameOp::Mkdir).await;
                if let (Ok(_), Ok(_)) = (&expected, &got) {
                    self.model.nodes.insert(p, Node::Dir(DIR_PERM));
                }
                (expected, got, None)
            }
            Op::Rmdir(p) => {
                let p = path_of(*p);
                let expected = match self.model.stat(&p) {
                    Err(e) => Err(e),
                    Ok(Seen::Dir { .. }) if self.model.has_below(&p) => Err(libc::ENOTEMPTY),
                    Ok(Seen::Dir { .. }) => Ok(Outcome::Done),
                    Ok(_) => Err(libc::ENOTDIR),
                };
                let got = self.at_name(&p, NameOp::Rmdir).await;
                if let (Ok(_), Ok(_)) = (&expected, &got) {
                    self.model.nodes.remove(&p);
                }
                (expected, got, None)
            }
            Op::Rename { from, to } => self.rename(&path_of(*from), &path_of(*to)).await,
            Op::Symlink { path, target } => {
                let p = path_of(*path);
                let target = format!("../{}", path_of(*target));
                let expected = self.model.may_create(&p);
                let got = self.at_name(&p, NameOp::Symlink(&target)).await;
                if let (Ok(_), Ok(_)) = (&expected, &got) {
                    self.model.nodes.insert(p, Node::Symlink(target));
                }
                (expected, got, None)
            }
            Op::Chmod { path, perm } => {
                let p = path_of(*path);
                let seen = self.model.stat(&p);
                // The kernel follows symlinks for chmod.
                if matches!(seen, Ok(Seen::Symlink { .. })) {
                    return (Ok(Outcome::Done), Ok(Outcome::Done), None);
                }
                let expected = seen.map(|_| Outcome::Done);
                let change = SetAttr {
                    mode: Some(*perm as u32),
                    ..SetAttr::default()
                };
                let got = self.setattr_at(&p, change).await;
                if let (Ok(_), Ok(_)) = (&expected, &got) {
                    match self.model.nodes.get(&p).cloned() {
                        Some(Node::File(id)) => {
                            self.model.files.get_mut(&id).expect("file").perm = *perm;
                        }
                        // A directory gets a marker carrying its mode.
                        _ => {
                            self.model.nodes.insert(p, Node::Dir(*perm));
                        }
                    }
                }
                (expected, got, None)
            }
            Op::Remount => {
                let got = self.remount().await;
                (Ok(Outcome::Done), got.map(|_| Outcome::Done), None)
            }
            Op::Put { path, len, byte } => {
                let p = path_of(*path);
                let (parent, _) = split(&p);
                // Only what cannot shadow or be shadowed, and nothing open.
                let clear = self.model.parent_ok(&p).is_ok()
                    && !self.model.is_dir(&p)
                    && !self.model.is_open(&p)
                    && !matches!(self.model.nodes.get(parent), Some(Node::File(_)));
                if clear {
                    let data = vec![*byte; *len as usize];
                    self.mock.insert(&p, data.clone());
                    let id = self.model.new_file(data.clone(), Some(data));
                    self.model.nodes.insert(p, Node::File(id));
                }
                (Ok(Outcome::Done), Ok(Outcome::Done), None)
            }
            Op::Delete(path) => {
                let p = path_of(*path);
                let closed_file = matches!(
                    self.model.nodes.get(&p),
                    Some(Node::File(_) | Node::Symlink(_))
                ) && !self.model.is_open(&p);
                if closed_file {
                    self.mock.remove(&p);
                    self.model.nodes.remove(&p);
                }
                (Ok(Outcome::Done), Ok(Outcome::Done), None)
            }
            Op::Fail(..) => (Ok(Outcome::Done), Ok(Outcome::Done), None),
        }
    }

    async fn rename(
        &mut self,
        from: &str,
        to: &str,
    ) -> (
        Result<Outcome, Errno>,
        Result<Outcome, Errno>,
        Option<(usize, u64)>,
    ) {
        let src = self.model.stat(from);
        let dst = self.model.stat(to);
        // As the kernel checks: both parent directories, then the source, then the target.
        let parents = self.model.parent_ok(from).and(self.model.parent_ok(to));
        let expected = match (parents, &src, &dst) {
            (Err(e), _, _) => Err(e),
            (_, Err(e), _) => Err(*e),
            _ if from == to => Ok(Outcome::Done),
            (_, Ok(Seen::Dir { .. }), _) if to.starts_with(&format!("{from}/")) => {
                Err(libc::EINVAL)
            }
            (_, Ok(Seen::Dir { .. }), Ok(Seen::Dir { .. })) if self.model.has_below(to) => {
                Err(libc::ENOTEMPTY)
            }
            (_, Ok(Seen::Dir { .. }), Ok(Seen::File { .. } | Seen::Symlink { .. })) => {
                Err(libc::ENOTDIR)
            }
            (_, Ok(Seen::File { .. } | Seen::Symlink { .. }), Ok(Seen::Dir { .. })) => {
                Err(libc::EISDIR)
            }
            _ => Ok(Outcome::Done),
        };
        // Directories with files open below them are a case of their own; not drawn here.
        if matches!(src, Ok(Seen::Dir { .. })) && self.model.open_at_or_below(from) {
            return (Ok(Outcome::Done), Ok(Outcome::Done), None);
        }
        let got = match (
            self.parent_and_name(from).await,
            self.parent_and_name(to).await,
        ) {
            (Err(e), _) | (_, Err(e)) => Err(e),
            (Ok((a, an)), Ok((b, bn))) => {
                errno(self.fs.rename(a, &an, b, &bn, false).await).map(|_| Outcome::Done)
            }
        };
        if let (Ok(_), Ok(_)) = (&expected, &got) {
            if from != to {
                // Whatever was at the target goes (a file open there keeps its bytes).
                if let Some(Node::File(id)) = self.model.nodes.remove(to) {
                    self.model.unlink_file(id);
                }
                let prefix = format!("{from}/");
                let moved: Vec<(String, Node)> = self
                    .model
                    .nodes
                    .iter()
                    .filter(|(k, _)| *k == from || k.starts_with(&prefix))
                    .map(|(k, n)| (k.clone(), n.clone()))
                    .collect();
                for (k, n) in moved {
                    self.model.nodes.remove(&k);
                    let new = format!("{to}{}", &k[from.len()..]);
                    self.model.nodes.insert(new, n);
                }
            }
        }
        (expected, got, None)
    }

    /// Closes every handle (S3 gets what each shows), stores deferred attributes, and mounts
    /// again from what S3 has.
    async fn remount(&mut self) -> Result<(), Errno> {
        // One at a time: the handles not closed yet count as open.
        while !self.model.handles.is_empty() {
            let h = self.model.handles.remove(0);
            if self.fs.flush(h.fh).await.is_ok() {
                self.model.commit(h.file);
            } else {
                self.model.revert(h.file);
            }
            self.fs.release_file(h.fh).await;
        }
        let all_stored = self.fs.store_pending_metadata(Duration::ZERO).await;
        self.fs = new_fs(&self.mock, self.ttl);
        for f in self.model.files.values_mut() {
            if !all_stored && f.perm != f.stored_perm {
                f.perm_either = true;
            } else if f.stored.is_some() {
                f.stored_perm = f.perm;
            }
        }
        Ok(())
    }

    /// Where a store of attributes may have failed, takes the mode the core shows if it is
    /// the one S3 had before.
    async fn settle_perms(&mut self) {
        let uncertain: Vec<(String, u64)> = self
            .model
            .nodes
            .iter()
            .filter_map(|(p, n)| match n {
                Node::File(id) if self.model.files[id].perm_either => Some((p.clone(), *id)),
                _ => None,
            })
            .collect();
        for (p, id) in uncertain {
            let seen = self.resolve(&p).await.map(|a| a.perm);
            let closed = self.model.open_handles_of(id) == 0;
            let f = self.model.files.get_mut(&id).expect("file");
            if seen == Ok(f.stored_perm) {
                f.perm = f.stored_perm;
            }
            f.perm_either = false;
            if f.stored.is_some() && closed {
                f.stored_perm = f.perm;
            }
        }
    }

    /// Every path and every directory listing, as the core shows them, against the model.
    async fn check_view(&self) -> Result<(), String> {
        for i in 0..PATHS as u8 {
            let p = path_of(i);
            let expected = self.model.stat(&p);
            let got = self.resolve(&p).await.map(|a| match a.kind {
                Kind::File => Seen::File {
                    size: a.size,
                    perm: a.perm,
                },
                Kind::Directory => Seen::Dir { perm: a.perm },
                Kind::Symlink => Seen::Symlink { size: a.size },
                Kind::Special(_) => Seen::Special,
            });
            if expected != got {
                return Err(format!(
                    "stat {p}: the model says {expected:?}, the core {got:?}"
                ));
            }
        }
        let mut dirs = vec![String::new()];
        dirs.extend(
            (0..PATHS as u8)
                .map(path_of)
                .filter(|p| self.model.is_dir(p) && self.model.stat(p).is_ok()),
        );
        for d in dirs {
            let expected = self.model.listing(&d);
            let ino = self.resolve(&d).await.map_err(|e| format!("{d}: {e}"))?.ino;
            let fh = self
                .fs
                .opendir(ino)
                .await
                .map_err(|e| format!("opendir {d}: {e}"))?;
            let got: Vec<(String, Kind)> = self
                .fs
                .readdir(ino, fh, 2)
                .map_err(|e| format!("readdir {d}: {e}"))?
                .into_iter()
                .map(|(_, e)| (e.name, e.attr.kind))
                .collect();
            self.fs.releasedir(fh);
            if expected != got {
                return Err(format!(
                    "listing of '{d}': the model says {expected:?}, the core {got:?}"
                ));
            }
        }
        Ok(())
    }

    /// What S3 holds against the model (after a remount, when nothing is open): every file's
    /// bytes, every symlink's target, every marker.
    fn check_stored(&self) -> Result<(), String> {
        for key in self.mock.keys() {
            let (path, marker) = match key.strip_suffix('/') {
                Some(p) => (p.to_string(), true),
                None => (key.clone(), false),
            };
            let ok = match (self.model.nodes.get(&path), marker) {
                (Some(Node::Dir(_)), true) => true,
                (Some(Node::File(id)), false) => {
                    self.mock.object(&key).map(|o| o.data.to_vec()) == self.model.files[id].stored
                }
                (Some(Node::Symlink(t)), false) => {
                    self.mock.object(&key).map(|o| o.data.to_vec()) == Some(t.as_bytes().to_vec())
                }
                _ => false,
            };
            if !ok {
                return Err(format!("S3 holds {key} that the model does not"));
            }
        }
        for (path, node) in &self.model.nodes {
            let key = match node {
                Node::Dir(_) => format!("{path}/"),
                _ => path.clone(),
            };
            if self.mock.object(&key).is_none() {
                return Err(format!("S3 lacks {key}"));
            }
        }
        Ok(())
    }

    /// Every file's bytes read back through the core.
    async fn check_contents(&self) -> Result<(), String> {
        for (path, node) in &self.model.nodes {
            let Node::File(id) = node else { continue };
            let attr = self
                .resolve(path)
                .await
                .map_err(|e| format!("{path}: {e}"))?;
            let fh = self
                .fs
                .open(attr.ino, false, false)
                .await
                .map_err(|e| format!("open {path}: {e}"))?;
            let got = self.fs.read(fh, 0, 1 << 20).await;
            self.fs.release_file(fh).await;
            let got = got.map_err(|e| format!("read {path}: {e}"))?;
            if got[..] != self.model.files[id].data[..] {
                return Err(format!(
                    "{path}: the core reads {} bytes, the model has {}",
                    got.len(),
                    self.model.files[id].data.len()
                ));
            }
        }
        Ok(())
    }
}

/// A failure the core reported where the model would succeed, under an injected failure: the
/// close's handle and file, if it was a close.
enum Mismatch {
    CoreFailed(Option<(usize, u64)>),
    Differs(String),
}

async fn run_case(zero_ttl: bool, ops: &[Op]) -> Result<(), String> {
    let mut run = Run::new(zero_ttl);
    for op in ops {
        if !run.zero_ttl && matches!(op, Op::Put { .. } | Op::Delete(_)) {
            continue;
        }
        let checked = match run.step(op).await {
            Ok(()) => {
                run.settle_perms().await;
                run.check_view().await
            }
            Err(e) => Err(e),
        };
        if let Err(why) = checked {
            return Err(format!("{why}\nafter {:#?}", run.log));
        }
    }
    let end = async {
        run.remount().await.map_err(|e| format!("remount: {e}"))?;
        run.settle_perms().await;
        run.check_view().await?;
        run.check_stored()?;
        run.check_contents().await
    };
    end.await
        .map_err(|why| format!("{why}\nafter {:#?} and a remount", run.log))
}

fn check(zero_ttl: bool, ops: &[Op]) -> Result<(), String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run_case(zero_ttl, ops))
}

fn cases() -> u32 {
    std::env::var("S3MOUNT_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_core_behaves_as_the_model((zero_ttl, ops) in case()) {
        if let Err(why) = check(zero_ttl, &ops) {
            prop_assert!(false, "{}", why);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What the model found, shrunk, kept as named cases. Paths: 0 a, 1 b, 2 c, 3 a/a, 4 a/b, ...

use Op::*;

fn write(handle: u8, offset: u16, len: u16) -> Op {
    Write {
        handle,
        offset,
        len,
        byte: 0,
    }
}

fn fail(call: Call, op: Op) -> Op {
    Fail(call, Box::new(op))
}

fn chmod(path: u8) -> Op {
    Chmod { path, perm: 0o600 }
}

#[test]
fn rmdir_counts_a_file_being_written_in_it() {
    check(false, &[Mkdir(0), Create(3), Rmdir(0)]).unwrap();
}

#[test]
fn a_part_that_failed_while_the_writer_went_on_is_sent_again_at_close() {
    check(
        false,
        &[Create(0), fail(Call::Part, write(0, 20, 2029)), Close(0)],
    )
    .unwrap();
}

#[test]
fn a_chmod_after_the_multipart_upload_began_is_stored() {
    check(false, &[Create(0), write(0, 772, 1276), chmod(0)]).unwrap();
    check(false, &[Create(0), write(0, 0, 1024), chmod(0)]).unwrap();
    check(
        false,
        &[
            Create(1),
            write(0, 0, 1024),
            chmod(1),
            fail(Call::Head, Remount),
        ],
    )
    .unwrap();
}

#[test]
fn a_chmod_before_the_first_part_goes_into_the_upload() {
    check(
        false,
        &[
            Create(0),
            chmod(0),
            write(0, 0, 1024),
            fail(Call::Copy, Remount),
        ],
    )
    .unwrap();
}

#[test]
fn open_with_truncate_shows_size_zero_at_once() {
    check(
        false,
        &[
            Create(1),
            write(0, 0, 1),
            Open {
                path: 1,
                truncate: true,
            },
        ],
    )
    .unwrap();
}

#[test]
fn a_directory_moved_into_itself_is_einval_before_anything_else() {
    check(
        false,
        &[Mkdir(1), Create(7), Close(0), Rename { from: 1, to: 7 }],
    )
    .unwrap();
}

#[test]
fn a_directory_chmod_that_s3_refused_does_not_show() {
    check(false, &[Mkdir(2), fail(Call::Put, chmod(2))]).unwrap();
}

#[test]
fn another_clients_newer_object_wins_over_a_deferred_chmod() {
    let ops = [
        Mkdir(0),
        Create(4),
        Close(0),
        chmod(4),
        Put {
            path: 4,
            len: 1,
            byte: 0,
        },
    ];
    check(true, &ops).unwrap();
}

#[test]
fn a_failed_close_does_not_take_back_an_earlier_chmod() {
    let ops = [
        Create(0),
        Remount,
        fail(Call::Put, chmod(0)),
        Open {
            path: 0,
            truncate: false,
        },
        Truncate {
            path: 0,
            size: 1025,
        },
        fail(Call::Create, Close(0)),
    ];
    check(false, &ops).unwrap();
}

#[test]
fn attributes_kept_for_one_object_never_go_to_another_at_its_name() {
    // A never-stored file's chmod, then a symlink at its name.
    let ops = [
        Create(2),
        fail(Call::Put, chmod(2)),
        write(0, 0, 1024),
        fail(Call::Complete, Close(0)),
        Symlink { path: 2, target: 0 },
    ];
    check(true, &ops).unwrap();
    // A deferred chmod of a file another one is renamed over (both empty: the same ETag).
    let ops = [
        fail(Call::Create, Create(1)),
        Close(0),
        Create(2),
        chmod(1),
        Rename { from: 2, to: 1 },
    ];
    check(false, &ops).unwrap();
}

#[test]
fn a_rename_of_an_open_file_fails_when_s3_cannot_say_whether_it_has_it() {
    check(
        false,
        &[
            Create(0),
            Fsync(0),
            fail(Call::Head, Rename { from: 0, to: 1 }),
        ],
    )
    .unwrap();
}

#[test]
fn a_rename_over_an_object_removes_it_even_if_the_commit_then_fails() {
    let ops = [
        Mkdir(0),
        Create(4),
        Put {
            path: 2,
            len: 1,
            byte: 0,
        },
        write(0, 85, 940),
        Rename { from: 4, to: 2 },
        fail(Call::Complete, Remount),
    ];
    check(true, &ops).unwrap();
}

#[test]
fn a_second_descriptor_stores_what_the_first_close_could_not() {
    check(
        true,
        &[
            Create(1),
            Open {
                path: 1,
                truncate: false,
            },
            fail(Call::Put, Remount),
        ],
    )
    .unwrap();
}
