//! The inode table: numbers, names, keys and cached attributes.
//!
//! An inode's number and kind never change once made; if a name comes back as another kind (a
//! file replaced by a directory), it gets a new inode and the old one lives on, unreachable by
//! name, until the kernel forgets it. Its location (parent, name, key) changes only through
//! [`InodeTable::rename`], because the kernel keeps the inode number across a rename. Cached attributes carry an
//! expiry (the metadata TTL) and are refreshed by the core when stale.
//!
//! Keys: a file's key is the full object key (mount prefix included); a directory's key is its
//! prefix with the trailing `/` (the root's is the mount prefix, possibly empty).
//!
//! Lock order: `InodeTable::tables`, then an inode's `state`; never the other way round.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

pub type Ino = u64;
pub const ROOT_INO: Ino = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Directory,
    Symlink,
    /// A FIFO, socket, character or block device: a zero-byte object whose `x-amz-meta-mode`
    /// has this file type (`S_IFIFO`, `S_IFSOCK`, `S_IFCHR`, `S_IFBLK`), as s3fs stores them.
    Special(u32),
}

/// What S3 told us about an object or a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub size: u64,
    pub mtime: SystemTime,
    pub etag: Option<String>,
    /// Extended attributes (`x-amz-meta-xattr`, see `xattr.rs`).
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// The device number of a character or block device (`x-amz-meta-rdev`).
    pub rdev: Option<u32>,
    /// Status change and access times (`x-amz-meta-ctime`, `-atime`); `None`: as mtime.
    pub ctime: Option<SystemTime>,
    pub atime: Option<SystemTime>,
    /// Permission bits from `x-amz-meta-mode`, when the object has them.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// S3's `Last-Modified` of the version we know, from a HEAD or a listing; `None` right
    /// after a change of ours (S3 does not say it). A copy that replaces the metadata keeps
    /// the ETag but not the `Last-Modified`: this is how a listing tells it apart.
    pub s3_modified: Option<SystemTime>,
    /// Only what a listing says (no HEAD yet): a listing cannot confirm it, as the object's
    /// s3fs metadata is still unknown.
    pub listing_only: bool,
}

/// Attributes an application set (chmod, chown, utimens), as far as S3 does not have them
/// yet: a failed upload of the file's data does not take them back.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime: Option<SystemTime>,
    pub ctime: Option<SystemTime>,
    pub atime: Option<SystemTime>,
    /// The whole map of extended attributes, when it changed.
    pub xattrs: Option<BTreeMap<String, Vec<u8>>>,
}

impl AttrChange {
    pub fn apply(&self, s: &mut Stat) {
        if let Some(m) = self.mode {
            s.mode = Some(m & 0o7777);
        }
        if let Some(u) = self.uid {
            s.uid = Some(u);
        }
        if let Some(g) = self.gid {
            s.gid = Some(g);
        }
        if let Some(t) = self.mtime {
            s.mtime = t;
        }
        if let Some(t) = self.ctime {
            s.ctime = Some(t);
        }
        if let Some(t) = self.atime {
            s.atime = Some(t);
        }
        if let Some(x) = &self.xattrs {
            s.xattrs = x.clone();
        }
    }

    fn merge(&mut self, later: &AttrChange) {
        self.mode = later.mode.or(self.mode);
        self.uid = later.uid.or(self.uid);
        self.gid = later.gid.or(self.gid);
        self.mtime = later.mtime.or(self.mtime);
        self.ctime = later.ctime.or(self.ctime);
        self.atime = later.atime.or(self.atime);
        if later.xattrs.is_some() {
            self.xattrs = later.xattrs.clone();
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == AttrChange::default()
    }

    /// Whether it sets more than mtime and ctime, the times a write or truncation moves.
    pub fn sets_more_than_times(&self) -> bool {
        let Self {
            mode,
            uid,
            gid,
            mtime: _,
            ctime: _,
            atime,
            xattrs,
        } = self;
        mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || xattrs.is_some()
    }
}

impl Stat {
    pub fn directory(mtime: SystemTime) -> Self {
        Self {
            size: 0,
            mtime,
            ctime: None,
            atime: None,
            rdev: None,
            xattrs: BTreeMap::new(),
            etag: None,
            mode: None,
            uid: None,
            gid: None,
            s3_modified: None,
            listing_only: false,
        }
    }

    /// Whether a listing's `listed` entry is the version of the object this stat describes.
    /// Times are compared to the second: a HEAD's `Last-Modified` has no fraction.
    pub fn same_version(&self, listed: &Stat) -> bool {
        let seconds = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        };
        self.etag == listed.etag
            && match (self.s3_modified, listed.s3_modified) {
                (Some(known), Some(seen)) => seconds(known) == seconds(seen),
                _ => true,
            }
    }
}

#[derive(Debug)]
pub struct InodeState {
    pub stat: Stat,
    pub expiry: Instant,
    /// Lookups the kernel holds on this inode (FUSE's nlookup).
    pub lookups: u64,
    /// The stat holds changes S3 does not have yet (a file being written, a chmod or utimens
    /// waiting for the next commit): what S3 says must not overwrite them.
    pub local_changes: bool,
    /// The local changes are attributes only (a chmod or utimens of a closed file): if
    /// another client replaces the object first, its version wins and they are given up.
    pub attrs_only: bool,
    /// Attributes set here that S3 does not have yet, and the ETag of the object they were
    /// set on: they are never given to another object at that key.
    pub kept: AttrChange,
    pub kept_for: Option<String>,
    /// No name leads here any more (unlinked, or replaced by a rename): `fstat` of a
    /// descriptor still open says nlink 0.
    pub unlinked: bool,
    /// For a directory: when this mount last changed its entries. Its mtime and ctime are at
    /// least this (kept in memory: S3 has no directory times to move).
    pub entries_changed_at: Option<SystemTime>,
}

impl InodeState {
    fn forget_kept(&mut self) {
        self.kept = AttrChange::default();
        self.kept_for = None;
    }
}

/// Where an inode is in the tree.
#[derive(Debug, Clone)]
pub struct Location {
    pub parent: Ino,
    pub name: String,
    pub key: String,
}

#[derive(Debug)]
pub struct Inode {
    pub ino: Ino,
    pub kind: Kind,
    location: Mutex<Location>,
    pub state: Mutex<InodeState>,
    /// For a directory: how many times this mount changed its entries (created, removed,
    /// renamed, stored one). A listing that started before a change may miss it.
    changes: std::sync::atomic::AtomicU64,
}

impl Inode {
    pub fn location(&self) -> Location {
        self.location
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn key(&self) -> String {
        self.location
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .key
            .clone()
    }

    pub fn parent(&self) -> Ino {
        self.location
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .parent
    }

    pub fn stat(&self) -> Stat {
        self.lock().stat.clone()
    }

    /// What is cached of it is stale: the next lookup or getattr asks S3 (the root never is).
    pub fn expire(&self) {
        if self.ino != ROOT_INO {
            self.lock().expiry = Instant::now();
        }
    }

    /// This directory's entries changed here (see [`Inode::changes`]).
    pub fn entries_changed(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.lock().entries_changed_at = Some(SystemTime::now());
    }

    /// A mark of this directory's entries as this mount has changed them so far.
    pub fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn is_fresh(&self) -> bool {
        self.lock().expiry > Instant::now()
    }

    /// Takes what S3 says, unless the inode has changes S3 does not have yet.
    pub fn refresh(&self, stat: Stat, ttl: Duration) {
        let mut s = self.lock();
        let replaced = s.attrs_only
            && stat.etag.is_some()
            && s.stat.etag.is_some()
            && stat.etag != s.stat.etag;
        if replaced {
            tracing::info!(
                etag = stat.etag,
                "another client replaced the object: its attributes win over the ones changed here"
            );
            s.local_changes = false;
            s.attrs_only = false;
            s.forget_kept();
        }
        if !s.local_changes {
            // An access seen here is newer than what S3 has of the same version (atime is
            // stored only with other changes): it stays.
            let seen = s
                .stat
                .atime
                .filter(|_| s.stat.etag.is_some() && s.stat.etag == stat.etag);
            s.stat = stat;
            if let Some(seen) = seen {
                s.stat.atime = Some(s.stat.atime.map_or(seen, |a| a.max(seen)));
            }
            // What the application set stays set, on the object it was set on: it is stored
            // with a copy.
            if !s.kept.is_empty() {
                if s.kept_for.is_some() && s.kept_for == s.stat.etag {
                    let kept = s.kept.clone();
                    kept.apply(&mut s.stat);
                    s.local_changes = true;
                    s.attrs_only = true;
                } else {
                    s.forget_kept();
                }
            }
        }
        s.expiry = Instant::now() + ttl;
    }

    /// A listing shows the version of the object this inode describes (see
    /// [`Stat::same_version`]): it stays valid for another `ttl`, and learns the listing's
    /// `Last-Modified` if it had none. Checked and done under the inode's lock, so a change
    /// stored meanwhile is never taken back. Returns whether the listing matched.
    pub fn confirm(&self, listed: &Stat, ttl: Duration) -> bool {
        let mut s = self.lock();
        if s.stat.listing_only || !s.stat.same_version(listed) {
            return false;
        }
        if s.stat.s3_modified.is_none() {
            s.stat.s3_modified = listed.s3_modified;
        }
        s.expiry = Instant::now() + ttl;
        true
    }

    /// The data changes S3 never got are given up: the next lookup takes what S3 says, with
    /// the attributes set here (see [`Inode::kept_attrs`]) on top.
    pub fn forget_local_changes(&self) {
        let mut s = self.lock();
        s.local_changes = false;
        s.attrs_only = false;
        s.expiry = Instant::now();
        // No listing may confirm this stat: only a HEAD replaces it.
        s.stat.etag = None;
        s.stat.s3_modified = None;
    }

    /// The inode changed here; S3 learns of it at the next commit.
    pub fn change_locally(&self, change: impl FnOnce(&mut Stat)) {
        let mut s = self.lock();
        change(&mut s.stat);
        s.local_changes = true;
        s.attrs_only = false;
    }

    /// The attributes changed here: of a closed file (`attrs_only`; S3 learns of them with a
    /// copy), or of one being written (they go with its upload).
    pub fn change_attrs(&self, change: AttrChange, attrs_only: bool) {
        let mut s = self.lock();
        change.apply(&mut s.stat);
        if s.kept.is_empty() {
            s.kept_for = s.stat.etag.clone();
        }
        s.kept.merge(&change);
        s.attrs_only = attrs_only && (!s.local_changes || s.attrs_only);
        s.local_changes = true;
    }

    /// Attributes S3 would not take are given up too: the next lookup takes what S3 says.
    pub fn forget_all_changes(&self) {
        self.lock().forget_kept();
        self.forget_local_changes();
    }

    /// The attributes set here that S3 does not have yet.
    pub fn kept_attrs(&self) -> AttrChange {
        self.lock().kept.clone()
    }

    /// Whether attributes set here wait for a copy to an object S3 has.
    pub fn has_kept_attrs(&self) -> bool {
        let s = self.lock();
        !s.kept.is_empty() && s.kept_for.is_some()
    }

    /// S3 now has exactly `stat` (a commit or a metadata copy just succeeded).
    pub fn stored(&self, stat: Stat, ttl: Duration) {
        let mut s = self.lock();
        s.stat = Stat {
            // The new version's Last-Modified is S3's to say; the next HEAD or listing tells.
            s3_modified: None,
            listing_only: false,
            ..stat
        };
        s.local_changes = false;
        s.attrs_only = false;
        s.forget_kept();
        s.expiry = Instant::now() + ttl;
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, InodeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct Tables {
    by_ino: HashMap<Ino, Arc<Inode>>,
    by_name: HashMap<(Ino, String), Ino>,
    /// How many directories `by_name` has under each directory (for its link count).
    subdirs: HashMap<Ino, u32>,
}

impl Tables {
    fn is_dir(&self, ino: Ino) -> bool {
        self.by_ino
            .get(&ino)
            .is_some_and(|i| i.kind == Kind::Directory)
    }

    /// Points `name` at `ino`; returns what it pointed at before.
    fn link(&mut self, name: (Ino, String), ino: Ino) -> Option<Ino> {
        let parent = name.0;
        let old = self.by_name.insert(name, ino);
        if let Some(old) = old {
            self.count(parent, old, false);
        }
        self.count(parent, ino, true);
        old
    }

    /// Removes `name`; returns what it pointed at.
    fn unlink(&mut self, name: &(Ino, String)) -> Option<Ino> {
        let old = self.by_name.remove(name)?;
        self.count(name.0, old, false);
        Some(old)
    }

    fn count(&mut self, parent: Ino, child: Ino, added: bool) {
        if !self.is_dir(child) {
            return;
        }
        let n = self.subdirs.entry(parent).or_default();
        if added {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
        }
    }
}

pub struct InodeTable {
    tables: RwLock<Tables>,
    next_ino: AtomicU64,
}

impl InodeTable {
    pub fn new(root_key: &str) -> Self {
        let root = Arc::new(Inode {
            ino: ROOT_INO,
            location: Mutex::new(Location {
                parent: ROOT_INO,
                name: String::new(),
                key: root_key.to_string(),
            }),
            kind: Kind::Directory,
            changes: std::sync::atomic::AtomicU64::new(0),
            state: Mutex::new(InodeState {
                stat: Stat::directory(SystemTime::now()),
                // The root never expires: it exists as long as the mount does.
                expiry: Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600),
                lookups: 1,
                local_changes: false,
                attrs_only: false,
                kept: AttrChange::default(),
                kept_for: None,
                unlinked: false,
                entries_changed_at: None,
            }),
        });
        let mut tables = Tables::default();
        tables.by_ino.insert(ROOT_INO, root);
        Self {
            tables: RwLock::new(tables),
            next_ino: AtomicU64::new(ROOT_INO + 1),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tables> {
        self.tables.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, ino: Ino) -> Option<Arc<Inode>> {
        self.read().by_ino.get(&ino).cloned()
    }

    pub fn child(&self, parent: Ino, name: &str) -> Option<Arc<Inode>> {
        let t = self.read();
        t.by_name
            .get(&(parent, name.to_string()))
            .and_then(|ino| t.by_ino.get(ino))
            .cloned()
    }

    /// Records that `parent/name` is `kind` with `stat`, valid for `ttl`. Reuses the inode when
    /// the kind is unchanged, so the kernel's view stays stable across refreshes. The check and
    /// the insert are one step under the table's write lock: two callers racing on one name
    /// (a lookup and a background listing) get the same inode.
    pub fn upsert(
        &self,
        parent: &Inode,
        name: &str,
        kind: Kind,
        stat: Stat,
        ttl: Duration,
    ) -> Arc<Inode> {
        if let Some(existing) = self.child(parent.ino, name).filter(|i| i.kind == kind) {
            existing.refresh(stat, ttl);
            return existing;
        }
        let mut t = self.write();
        let existing = t
            .by_name
            .get(&(parent.ino, name.to_string()))
            .and_then(|ino| t.by_ino.get(ino))
            .filter(|i| i.kind == kind)
            .cloned();
        if let Some(existing) = existing {
            drop(t);
            existing.refresh(stat, ttl);
            return existing;
        }
        let key = child_key(&parent.key(), name, kind);
        let ino = self.next_ino.fetch_add(1, Ordering::Relaxed);
        let inode = Arc::new(Inode {
            ino,
            location: Mutex::new(Location {
                parent: parent.ino,
                name: name.to_string(),
                key,
            }),
            kind,
            changes: std::sync::atomic::AtomicU64::new(0),
            state: Mutex::new(InodeState {
                stat,
                expiry: Instant::now() + ttl,
                lookups: 0,
                local_changes: false,
                attrs_only: false,
                kept: AttrChange::default(),
                kept_for: None,
                unlinked: false,
                entries_changed_at: None,
            }),
        });
        t.by_ino.insert(ino, inode.clone());
        t.link((parent.ino, name.to_string()), ino);
        inode
    }

    /// The name no longer exists (deleted out of band, found missing).
    pub fn remove_name(&self, parent: Ino, name: &str) {
        let mut t = self.write();
        if let Some(ino) = t.unlink(&(parent, name.to_string())) {
            if let Some(inode) = t.by_ino.get(&ino) {
                inode.lock().unlinked = true;
            }
        }
    }

    /// The kernel took one more reference (an entry reply).
    pub fn add_lookup(&self, inode: &Inode) {
        inode.lock().lookups += 1;
    }

    /// The kernel dropped `n` references; an inode nobody references any more is dropped, and
    /// so is its name if the name still points to it.
    pub fn forget(&self, ino: Ino, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut t = self.write();
        let Some(inode) = t.by_ino.get(&ino).cloned() else {
            return;
        };
        let gone = {
            let mut s = inode.lock();
            s.lookups = s.lookups.saturating_sub(n);
            s.lookups == 0
        };
        if gone {
            let loc = inode.location();
            let name_key = (loc.parent, loc.name);
            if t.by_name.get(&name_key) == Some(&ino) {
                t.unlink(&name_key);
            }
            t.by_ino.remove(&ino);
            t.subdirs.remove(&ino);
        }
    }

    /// Moves `inode` to `new_parent/new_name`; a directory's descendants get their new keys.
    /// Whatever was at the new name before is no longer reachable by name.
    pub fn rename(&self, inode: &Inode, new_parent: &Inode, new_name: &str) {
        let mut t = self.write();
        let old = inode.location();
        let new_key = child_key(&new_parent.key(), new_name, inode.kind);
        if t.by_name.get(&(old.parent, old.name.clone())) == Some(&inode.ino) {
            t.unlink(&(old.parent, old.name.clone()));
        }
        let replaced = t.link((new_parent.ino, new_name.to_string()), inode.ino);
        if let Some(target) = replaced.filter(|&t| t != inode.ino) {
            if let Some(target) = t.by_ino.get(&target) {
                target.lock().unlinked = true;
            }
        }
        {
            let mut loc = inode.location.lock().unwrap_or_else(|p| p.into_inner());
            loc.parent = new_parent.ino;
            loc.name = new_name.to_string();
            loc.key = new_key.clone();
        }
        if inode.kind == Kind::Directory {
            for other in t.by_ino.values() {
                if other.ino == inode.ino {
                    continue;
                }
                let mut loc = other.location.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(rest) = loc.key.strip_prefix(&old.key) {
                    loc.key = format!("{new_key}{rest}");
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.read().by_ino.len()
    }

    /// The directories known under directory `ino`.
    pub fn subdirectories(&self, ino: Ino) -> u32 {
        self.read().subdirs.get(&ino).copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The key of `name` in the directory whose key is `parent_key`.
pub fn child_key(parent_key: &str, name: &str, kind: Kind) -> String {
    match kind {
        Kind::Directory => format!("{parent_key}{name}/"),
        Kind::File | Kind::Symlink | Kind::Special(_) => format!("{parent_key}{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(size: u64) -> Stat {
        Stat {
            size,
            ..Stat::directory(SystemTime::UNIX_EPOCH)
        }
    }

    #[test]
    fn upsert_reuses_same_kind_and_replaces_other_kind() {
        let t = InodeTable::new("pre/");
        let root = t.get(ROOT_INO).unwrap();
        let a = t.upsert(&root, "a", Kind::File, stat(1), Duration::from_secs(1));
        assert_eq!(a.key(), "pre/a");
        let again = t.upsert(&root, "a", Kind::File, stat(2), Duration::from_secs(1));
        assert_eq!(a.ino, again.ino);
        assert_eq!(a.stat().size, 2);
        let dir = t.upsert(&root, "a", Kind::Directory, stat(0), Duration::from_secs(1));
        assert_ne!(dir.ino, a.ino);
        assert_eq!(dir.key(), "pre/a/");
        assert_eq!(t.child(ROOT_INO, "a").unwrap().ino, dir.ino);
        assert!(
            t.get(a.ino).is_some(),
            "the old inode lives until forgotten"
        );
    }

    #[test]
    fn racing_upserts_of_one_name_make_one_inode() {
        let t = Arc::new(InodeTable::new(""));
        let root = t.get(ROOT_INO).unwrap();
        let threads = 8;
        let barrier = Arc::new(std::sync::Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (t, root, barrier) = (t.clone(), root.clone(), barrier.clone());
                std::thread::spawn(move || {
                    (0..300)
                        .map(|round| {
                            barrier.wait();
                            let name = format!("n{round}");
                            t.upsert(&root, &name, Kind::File, stat(1), Duration::from_secs(1))
                                .ino
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let inos: Vec<Vec<Ino>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for round in 0..300 {
            let first = inos[0][round];
            assert!(
                inos.iter().all(|per_thread| per_thread[round] == first),
                "round {round}: one name, one inode"
            );
        }
    }

    #[test]
    fn rename_moves_descendant_keys() {
        let t = InodeTable::new("");
        let root = t.get(ROOT_INO).unwrap();
        let d = t.upsert(&root, "d", Kind::Directory, stat(0), Duration::from_secs(1));
        let f = t.upsert(&d, "f", Kind::File, stat(1), Duration::from_secs(1));
        let e = t.upsert(&root, "e", Kind::Directory, stat(0), Duration::from_secs(1));
        t.rename(&d, &e, "moved");
        assert_eq!(d.key(), "e/moved/");
        assert_eq!(f.key(), "e/moved/f");
        assert!(t.child(ROOT_INO, "d").is_none());
        assert_eq!(t.child(e.ino, "moved").unwrap().ino, d.ino);
        assert_eq!(t.child(d.ino, "f").unwrap().ino, f.ino);
    }

    #[test]
    fn forget_drops_unreferenced_inodes() {
        let t = InodeTable::new("");
        let root = t.get(ROOT_INO).unwrap();
        let a = t.upsert(&root, "a", Kind::File, stat(1), Duration::from_secs(1));
        t.add_lookup(&a);
        t.add_lookup(&a);
        t.forget(a.ino, 1);
        assert!(t.get(a.ino).is_some());
        t.forget(a.ino, 1);
        assert!(t.get(a.ino).is_none());
        assert!(t.child(ROOT_INO, "a").is_none());
        t.forget(ROOT_INO, 100);
        assert!(t.get(ROOT_INO).is_some(), "the root is never forgotten");
    }
}
