//! How the kernel reads each open file: through its page cache and the mount (cached), or,
//! with `--cache-passthrough`, straight from a file of the read cache (FUSE passthrough).
//!
//! An object whose every block is in the read cache and trusted
//! ([`S3Filesystem::whole_in_cache`]) is opened in passthrough: the kernel reads the cache's
//! data file for the reader, and no read reaches the mount. The kernel fails (EIO) an open
//! whose mode conflicts with the other open files of its inode: while one file of an inode is
//! open in passthrough, every other open of it must be too, to the same backing file; and no
//! open is given passthrough while one in the page cache's mode is open. So opens are counted
//! per inode here, and decided under one lock with the reply:
//! - passthrough is given only while the inode has no other open file, or only passthrough
//!   ones of the same version (which then share the inode's one backing file, registered
//!   with the first and closed with the last);
//! - an open for writing while passthrough readers have the inode open is refused with
//!   ETXTBSY (as writing a running program is), before anything is changed;
//! - an open of a newer version while they have the older one open is refused with EBUSY:
//!   the kernel would serve the old file to it.
//!
//! Counts drop at RELEASE, which the kernel sends after it has let the file go, so they lag on
//! the safe side. Passthrough needs the kernel's support (Linux 6.9 and later), CAP_SYS_ADMIN
//! to register backing files, and a cache directory not itself on a stacked filesystem
//! (overlayfs): without them the first refusal is logged and opens read through the mount.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{BackingId, Errno, FileHandle, FopenFlags, ReplyOpen};

use crate::fs::S3Filesystem;
use crate::s3::ObjectClient;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long an open that conflicts with passthrough readers waits for them to go: the kernel
/// sends RELEASE after close(2) has returned, so a reader that just closed may not be released
/// here yet.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
const RELEASE_POLL: std::time::Duration = std::time::Duration::from_millis(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Cached,
    Passthrough,
}

struct Backing {
    id: BackingId,
    /// The ETag of the version in the backing file.
    etag: String,
    opens: usize,
}

#[derive(Default)]
struct InodeIo {
    /// Open files in the page cache's mode, and opens for writing under way.
    cached: usize,
    passthrough: Option<Backing>,
}

#[derive(Default)]
struct Table {
    inodes: HashMap<u64, InodeIo>,
    /// Each open file handle's inode and mode.
    handles: HashMap<u64, (u64, Mode)>,
}

/// An open being answered by [`IoModes::reply_open`].
#[derive(Clone, Copy)]
struct Open<'a> {
    ino: u64,
    fh: u64,
    /// Counted by [`IoModes::start_write_open`].
    write: bool,
    /// The ETag it reads, if it is open for reading only.
    version: Option<&'a str>,
    /// The read cache's file holding its whole object, if passthrough may be given.
    whole: Option<&'a Arc<std::fs::File>>,
}

/// Tries `attempt` (which hands `state` back when it cannot go ahead) until it can or
/// [`RELEASE_WAIT`] has passed.
async fn until_released<S, T>(
    mut state: S,
    mut attempt: impl FnMut(S) -> Result<T, S>,
) -> Result<T, S> {
    let until = std::time::Instant::now() + RELEASE_WAIT;
    loop {
        match attempt(state) {
            Err(back) if std::time::Instant::now() < until => {
                state = back;
                tokio::time::sleep(RELEASE_POLL).await;
            }
            done => return done,
        }
    }
}

/// The open files' modes of one mount.
#[derive(Default)]
pub struct IoModes {
    /// The kernel agreed to passthrough at INIT, and no backing file was refused since.
    enabled: AtomicBool,
    table: Mutex<Table>,
}

/// An open for writing may go ahead ([`IoModes::start_write_open`]), or not.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused(pub Errno);

impl IoModes {
    /// Passthrough may be given (`--cache-passthrough`, and the kernel accepted it at INIT).
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    /// Before an open for writing of `ino` touches anything: refused while passthrough readers
    /// have the inode open (after [`RELEASE_WAIT`] for their RELEASE); otherwise counted (no
    /// passthrough is given meanwhile) until [`IoModes::reply_open`] or
    /// [`IoModes::write_open_failed`].
    pub async fn start_write_open(&self, ino: u64) -> Result<(), Refused> {
        let counted = until_released((), |()| {
            let mut table = lock(&self.table);
            let io = table.inodes.entry(ino).or_default();
            if io.passthrough.is_some() {
                return Err(());
            }
            io.cached += 1;
            Ok(())
        })
        .await;
        counted.map_err(|()| {
            tracing::warn!(
                ino,
                "an open for writing is refused (ETXTBSY): readers have the file open in \
                 passthrough (--cache-passthrough)"
            );
            Refused(Errno::ETXTBSY)
        })
    }

    /// An open for writing counted by [`IoModes::start_write_open`] failed.
    pub fn write_open_failed(&self, ino: u64) {
        let mut table = lock(&self.table);
        if let Some(io) = table.inodes.get_mut(&ino) {
            io.cached = io.cached.saturating_sub(1);
            if io.cached == 0 && io.passthrough.is_none() {
                table.inodes.remove(&ino);
            }
        }
    }

    /// Answers the open of `ino` as file handle `fh` (`write`: counted by
    /// [`IoModes::start_write_open`]): in passthrough when the read cache holds the whole object
    /// and the inode's other opens allow it; `Err` when they forbid the open still after
    /// [`RELEASE_WAIT`] (the caller releases `fh` and answers the error).
    pub async fn reply_open<C: ObjectClient>(
        &self,
        fs: &S3Filesystem<C>,
        ino: u64,
        fh: u64,
        write: bool,
        reply: ReplyOpen,
    ) -> Result<(), (Refused, ReplyOpen)> {
        // Looked up once, and outside the table's lock (the cache's check touches files).
        let version = if write { None } else { fs.read_version(fh) };
        let whole = version
            .as_ref()
            .filter(|_| self.enabled.load(Ordering::Relaxed))
            .and_then(|_| fs.whole_in_cache(fh));
        let answered = until_released(reply, |reply| {
            let open = Open {
                ino,
                fh,
                write,
                version: version.as_deref(),
                whole: whole.as_ref(),
            };
            self.try_reply_open(fs, &open, reply)
        })
        .await;
        answered.map_err(|reply| {
            tracing::warn!(
                ino,
                "an open of a newer version is refused (EBUSY) until the readers of the older \
                 one in passthrough (--cache-passthrough) close"
            );
            (Refused(Errno::EBUSY), reply)
        })
    }

    /// One try of [`IoModes::reply_open`]; the reply back if the inode's passthrough readers
    /// have another version open.
    fn try_reply_open<C: ObjectClient>(
        &self,
        fs: &S3Filesystem<C>,
        open: &Open<'_>,
        reply: ReplyOpen,
    ) -> Result<(), ReplyOpen> {
        let Open {
            ino,
            fh,
            write,
            version,
            whole,
        } = *open;
        let mut guard = lock(&self.table);
        let table = &mut *guard;
        let io = table.inodes.entry(ino).or_default();
        if let Some(b) = &mut io.passthrough {
            // Every open of the inode must be in passthrough to this file.
            return match version {
                Some(etag) if etag == b.etag => {
                    b.opens += 1;
                    reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_PASSTHROUGH, &b.id);
                    table.handles.insert(fh, (ino, Mode::Passthrough));
                    fs.passthrough_opened();
                    Ok(())
                }
                _ => Err(reply),
            };
        }
        let whole = version.zip(whole).filter(|_| io.cached == 0);
        if let Some((etag, file)) = whole {
            match reply.open_backing(&**file) {
                Ok(id) => {
                    // Answered under the lock: no other open of the inode is decided before
                    // the kernel has this one.
                    reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_PASSTHROUGH, &id);
                    io.passthrough = Some(Backing {
                        id,
                        etag: etag.to_string(),
                        opens: 1,
                    });
                    table.handles.insert(fh, (ino, Mode::Passthrough));
                    fs.passthrough_opened();
                    return Ok(());
                }
                Err(e) => {
                    if self.enabled.swap(false, Ordering::Relaxed) {
                        tracing::warn!(
                            "the kernel refused a file of the read cache for passthrough ({e}; \
                             it needs CAP_SYS_ADMIN and a cache directory not on overlayfs): \
                             cached objects are read through the mount"
                        );
                    }
                }
            }
        }
        if !write {
            io.cached += 1; // an open for writing was counted when it started
        }
        table.handles.insert(fh, (ino, Mode::Cached));
        drop(guard);
        reply.opened(FileHandle(fh), FopenFlags::empty());
        Ok(())
    }

    /// Counts an open that cannot be in passthrough (a new file).
    pub fn opened(&self, ino: u64, fh: u64) {
        let mut table = lock(&self.table);
        table.inodes.entry(ino).or_default().cached += 1;
        table.handles.insert(fh, (ino, Mode::Cached));
    }

    /// File handle `fh` is released: the backing file goes with the last passthrough open.
    pub fn released(&self, fh: u64) {
        let mut table = lock(&self.table);
        let Some((ino, mode)) = table.handles.remove(&fh) else {
            return;
        };
        let Some(io) = table.inodes.get_mut(&ino) else {
            return;
        };
        match mode {
            Mode::Cached => io.cached = io.cached.saturating_sub(1),
            Mode::Passthrough => {
                if let Some(b) = &mut io.passthrough {
                    b.opens = b.opens.saturating_sub(1);
                    if b.opens == 0 {
                        io.passthrough = None; // closes the backing ID
                    }
                }
            }
        }
        if io.cached == 0 && io.passthrough.is_none() {
            table.inodes.remove(&ino);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_are_counted_until_released_and_writes_from_their_start() {
        let m = IoModes::default();
        m.opened(5, 1);
        m.opened(5, 2);
        assert_eq!(lock(&m.table).inodes[&5].cached, 2);
        m.released(1);
        assert_eq!(lock(&m.table).inodes[&5].cached, 1);
        m.released(2);
        m.released(2); // a second release of one handle changes nothing
        assert!(lock(&m.table).inodes.is_empty());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(m.start_write_open(7)), Ok(()));
        assert_eq!(
            lock(&m.table).inodes[&7].cached,
            1,
            "counted from its start"
        );
        m.write_open_failed(7);
        assert!(lock(&m.table).inodes.is_empty());
    }
}
