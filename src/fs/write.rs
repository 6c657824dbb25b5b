//! Writing objects: spooled, streaming multipart uploads.
//!
//! **Spool.** Each open-for-write file has a sparse temporary file holding the file's bytes;
//! RAM holds only bookkeeping, whatever the file's size. (The spool needs disk space up to the
//! file's size while the file is open.)
//!
//! **Parts.** The file is cut into parts of fixed, growing sizes: 1,000 parts of `part_size`,
//! then 1,000 of twice that, and so on, so the 10,000 parts S3 allows reach past its 5 TiB
//! object limit without knowing the size in advance. As soon as a part is completely written
//! it is uploaded (UploadPart, several at once, streamed from the spool), while the writer goes
//! on. Writes may arrive out of order (the kernel does that): a part counts as complete when
//! its whole range has been written, in any order. A write into a part already uploaded marks
//! it for upload again. When too many parts wait for upload, the writer waits.
//!
//! **Commit.** `flush` (every `close`) and `fsync` upload what is left and complete the
//! upload; they return only when S3 has the object, and fail (EIO, with a log line) when it
//! could not be stored, after aborting the multipart upload so nothing half-written remains.
//! A file smaller than one part is one PutObject. Writes after a commit (through a duplicated
//! descriptor) make the handle dirty again, and the next commit uploads the whole file again,
//! so the last close always leaves the complete file.
//!
//! **Changing an existing object.** A file opened without O_TRUNC starts from its object (the
//! *base*, pinned by ETag) without downloading it: the spool is a hole of the object's size.
//! Bytes not written yet are fetched from the base only where needed: a read of them, or a part
//! that is partly written (its other bytes must go up with it). A part nobody wrote is copied
//! server-side (UploadPartCopy), so changing one byte of a 10 GiB file moves one part over the
//! network, not 10 GiB. If the object changes underneath, the fetch or copy fails with ESTALE
//! instead of mixing two versions. After each commit the new object becomes the base.
//!
//! **Sequential writes skip the page cache.** Copying into a buffered spool costs more CPU than
//! anything else on the write path (measured: 4.4 CPU-s per 2 GiB here, against 0.6 s for
//! O_DIRECT). So a part written from its first byte onwards, in order (what cp, rsync and dd
//! do), is gathered in an aligned memory buffer instead; once full it goes to the spool with
//! O_DIRECT (kept for reads back and re-uploads) and is uploaded, and hashed, from memory. Any
//! other write pattern spills the buffer into the spool and goes on there.
//!
//! **Memory.** Part buffers and each part upload in flight hold memory from the filesystem's
//! budget (shared with reads); when the budget is full, the writer waits.
//!
//! **Metadata.** Mode, owner and mtime go into the upload itself as `x-amz-meta-*`, in the
//! format s3fs-fuse uses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::error::{from_client, FsError, FsResult};
use super::growth::{Change, Growth};
use super::journal::{Adopted, JournalEntry, LostCreate, PartLog, RecordedPart, UploadJournal};
use super::local_io;
use super::memory::{MemoryBudget, PartBuffer, BUFFER_ALIGN};
use crate::s3::{
    Checksum, ClientError, CompletedPart, Condition, CopySource, ErrorKind, ObjectAttributes,
    ObjectClient, PutBody,
};

/// S3 allows at most this many parts.
pub const MAX_PARTS: u64 = 10_000;
/// The most one UploadPartCopy copies. S3 allows 5 GiB, but a server copying that much sends
/// nothing for longer than the read timeout (Garage: over 30 s for 5 GiB).
pub const MAX_COPY_PART: u64 = 512 << 20;
/// CreateMultipartUpload requests sent again after one whose answer was lost.
const CREATE_RETRIES: usize = 2;
/// Parts of one size before the size doubles.
const PARTS_PER_SIZE: u64 = 1_000;
/// Reads through a write handle fetch missing base bytes in aligned blocks of this size.
const FILL_BLOCK: u64 = 1 << 20;
/// What one part upload from the spool holds in memory: the hashing buffer and the body chunks
/// being sent.
const PART_UPLOAD_MEMORY: u64 = 3 << 20;
/// Spool space for a part held in memory is reserved in steps of this size.
const RESERVE_STEP: u64 = 1 << 20;

/// What a part upload holds in memory while it runs, besides a body that carries its own.
enum PartMemory {
    /// Buffers for reading it from the spool, reserved when the upload starts.
    Reserve(u64),
    /// A body from memory (its buffer holds its reservation), or a server-side copy.
    None,
}

/// What [`WriteHandle::append_now`] did with a write; both carry the file's new size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Taken(u64),
    /// The write completed its part: [`WriteHandle::seal_full_part`] must follow.
    PartFull(u64),
}

/// A part being written in order from its first byte, held in memory until it is full.
struct Filling {
    part: u64,
    data: PartBuffer,
}

impl Filling {
    fn len(&self) -> u64 {
        self.data.len()
    }

    fn push(&mut self, bytes: &[u8]) {
        self.data.push(bytes);
    }

    fn into_parts(self) -> (u64, bytes::Bytes) {
        (self.part, self.data.freeze())
    }
}

/// A second descriptor of the spool with O_DIRECT, when the file system allows it.
/// Part uploads a file starts with at once; `--upload-concurrency` is the most it grows to.
const UPLOAD_SLOTS_START: usize = 2;
/// Epochs are at least this long (and at least four rounds of the slots' parts).
const SLOTS_EPOCH_MIN: u64 = 128 << 20;

/// How many part uploads of one file run at once, sized to what the link gives ([`Growth`],
/// the read-ahead window's rule): it starts at two, and grows while that pays, up to
/// `--upload-concurrency`. On a loopback server two are as fast as eight (129-135 MiB/s for a
/// 1 GiB cp here either way) at half the memory (45 against 93 MiB of peak RSS).
#[derive(Debug)]
struct UploadSlots {
    growth: Growth,
    /// The file's size when last told.
    seen: u64,
}

enum Resize {
    Keep,
    Grow(usize),
    Shrink(usize),
}

impl UploadSlots {
    fn new(now: usize, max: usize) -> Self {
        Self {
            growth: Growth::new(now as u64, max as u64),
            seen: 0,
        }
    }

    /// Every slot, for good.
    fn all(max: usize) -> Self {
        Self {
            growth: Growth::fixed(max as u64),
            seen: 0,
        }
    }

    fn now(&self) -> usize {
        self.growth.size as usize
    }

    /// The writer has written up to `size`, and had to wait for uploads if `waited`.
    fn written(&mut self, size: u64, waited: bool, part_size: u64) -> Resize {
        self.written_at(size, waited, part_size, std::time::Instant::now())
    }

    fn written_at(
        &mut self,
        size: u64,
        waited: bool,
        part_size: u64,
        now: std::time::Instant,
    ) -> Resize {
        let n = size.saturating_sub(std::mem::replace(&mut self.seen, size));
        let epoch = (4 * self.growth.size * part_size).max(SLOTS_EPOCH_MIN);
        let change = self.growth.moved_at(n, waited, epoch, now);
        let slots = self.growth.size;
        match change {
            Change::Kept => Resize::Keep,
            Change::Grown(from) => {
                tracing::debug!(slots, "part uploads grown");
                Resize::Grow((slots - from) as usize)
            }
            Change::Settled(from) => {
                tracing::debug!(slots, "part uploads settled");
                Resize::Shrink((from - slots) as usize)
            }
        }
    }
}

/// Parts shorter than this go to the spool through the page cache, not O_DIRECT.
const DIRECT_MIN: usize = 1 << 20;

fn open_direct(spool: &std::fs::File) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", spool.as_raw_fd()))
        .ok()
}

#[derive(Debug, Clone)]
pub struct WriteConfig {
    /// Size of the first 1,000 parts.
    pub part_size: u64,
    /// Part uploads in flight per file.
    pub upload_concurrency: usize,
    /// Where spool files are made (`None`: the system's temporary directory, `$TMPDIR`).
    pub spool_dir: Option<std::path::PathBuf>,
    /// How long an interrupted multipart upload is kept for a later write of the same file to
    /// resume; zero aborts it at once.
    pub resume_window: Duration,
    /// Spools are named files in `spool_dir` (write-back keeps them across restarts), removed
    /// when the handle ends unless kept ([`WriteHandle::keep_locally`]).
    pub named_spools: bool,
    /// Commits are conditional writes: they store the file only over the object it was
    /// opened on (or none, for a new file). See [`Expect`].
    pub conditional: bool,
}

impl Default for WriteConfig {
    fn default() -> Self {
        Self {
            part_size: 8 * 1024 * 1024,
            upload_concurrency: 8,
            spool_dir: None,
            resume_window: Duration::from_secs(24 * 3600),
            named_spools: false,
            conditional: false,
        }
    }
}

/// The byte range of part `index` (0-based).
pub fn part_range(index: u64, base: u64) -> Range<u64> {
    let group = index / PARTS_PER_SIZE;
    let within = index % PARTS_PER_SIZE;
    // Bytes covered by the full groups before this one: base * 1000 * (2^group - 1).
    let before = base * PARTS_PER_SIZE * ((1u64 << group) - 1);
    let size = base << group;
    let start = before + within * size;
    start..start + size
}

/// The part holding byte `offset`.
pub fn part_index(offset: u64, base: u64) -> u64 {
    let mut group = 0;
    let mut group_start = 0;
    loop {
        let group_bytes = (base << group) * PARTS_PER_SIZE;
        if offset < group_start + group_bytes {
            return group * PARTS_PER_SIZE + (offset - group_start) / (base << group);
        }
        group_start += group_bytes;
        group += 1;
    }
}

/// A part S3 has: what the complete request names it by.
#[derive(Debug, Clone)]
struct PartDone {
    etag: String,
    /// Its CRC32C, for an upload whose parts carry one.
    crc32c: Option<u32>,
}

impl PartDone {
    fn copied(etag: String) -> Self {
        Self { etag, crc32c: None }
    }
}

type PartTask = JoinHandle<Result<PartDone, ClientError>>;

enum PartState {
    Uploading(PartTask),
    Done(PartDone),
}

struct Upload {
    key: String,
    id: String,
    parts: BTreeMap<u64, PartState>,
    /// When it was created, and its entry in the journal (removed once it is completed or
    /// aborted).
    created: SystemTime,
    /// A digest of the attributes it was created with: S3 gives the object these, whatever
    /// changed since.
    attrs: String,
    /// [`WriteState::attrs_set`] when it was created: a change set after it is not in `attrs`
    /// (times moved by writes and truncations alone are not such a change).
    attrs_set: u64,
    /// What its parts are sent with, fixed when it was created.
    checksum: Checksum,
    entry: Option<JournalEntry>,
    /// Where parts are recorded as S3 stores them.
    log: Option<PartLog>,
    /// Parts an interrupted upload this one resumes has stored (verified by ListParts), by
    /// part index: one whose bytes come out the same is not sent again.
    reusable: BTreeMap<u64, RecordedPart>,
    /// Parts and bytes of those that were the same.
    reused: Arc<std::sync::atomic::AtomicU64>,
    reused_bytes: Arc<std::sync::atomic::AtomicU64>,
    /// It resumes an interrupted upload.
    resumed: bool,
    /// Creates of this upload whose answers were lost: looked for once it is over.
    lost: Vec<LostCreate>,
}

/// A digest of `attrs`, to tell whether an upload was created with the attributes a file
/// has now (also across processes, through the journal).
fn attrs_digest(attrs: &ObjectAttributes) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(format!("{attrs:?}").as_bytes())[..12])
}

/// Whether the ETag is the MD5 of the part's bytes, as S3 makes it (not under SSE-KMS).
fn md5_like(etag: &str) -> bool {
    let t = etag.trim_matches('"');
    t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The stored part `known` (of an upload being resumed) as the complete request names it, if
/// `body` holds its bytes: the same size and SHA-256, or else the MD5 its ETag is; and the
/// same CRC32C where one was recorded. A CRC32C alone is not enough: 32 bits tell changed
/// bytes apart only by chance. `crc32c`: the upload's parts carry one.
fn same_bytes(
    body: &PutBody,
    known: &RecordedPart,
    crc32c: bool,
) -> std::io::Result<Option<PartDone>> {
    use md5::Digest as _;
    let by_md5 = known.sha256_hex.is_none() && md5_like(&known.etag);
    if body.len() != known.size || (known.sha256_hex.is_none() && !by_md5) {
        return Ok(None);
    }
    let mut sha = known.sha256_hex.as_ref().map(|_| sha2::Sha256::new());
    let mut md5 = by_md5.then(md5::Md5::new);
    let mut crc = (crc32c || known.crc32c.is_some()).then_some(0u32);
    body.for_each_chunk(|bytes| {
        if let Some(h) = sha.as_mut() {
            sha2::Digest::update(h, bytes);
        }
        if let Some(h) = md5.as_mut() {
            h.update(bytes);
        }
        if let Some(c) = crc.as_mut() {
            *c = crc32c::crc32c_append(*c, bytes);
        }
    })?;
    let digest_same = match (sha, md5) {
        (Some(h), _) => known.sha256_hex.as_deref() == Some(&hex::encode(h.finalize())),
        (_, Some(h)) => hex::encode(h.finalize()) == known.etag.trim_matches('"'),
        _ => false,
    };
    let crc_same = known.crc32c.is_none() || known.crc32c == crc;
    Ok((digest_same && crc_same).then(|| PartDone {
        etag: known.etag.clone(),
        crc32c: crc.filter(|_| crc32c),
    }))
}

/// Which bytes of each part have been written, as sorted disjoint ranges.
#[derive(Default)]
struct Coverage {
    parts: HashMap<u64, Vec<Range<u64>>>,
}

impl Coverage {
    fn add(&mut self, part: u64, range: Range<u64>) {
        let ranges = self.parts.entry(part).or_default();
        ranges.push(range);
        ranges.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
        for r in ranges.drain(..) {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        *ranges = merged;
    }

    /// The bytes of `range` (inside part `part`) not written or fetched yet.
    fn missing(&self, part: u64, range: Range<u64>) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut pos = range.start;
        for r in self.parts.get(&part).into_iter().flatten() {
            if r.end <= pos {
                continue;
            }
            if r.start >= range.end {
                break;
            }
            if r.start > pos {
                out.push(pos..r.start);
            }
            pos = pos.max(r.end);
        }
        if pos < range.end {
            out.push(pos..range.end);
        }
        out
    }

    fn untouched(&self, part: u64) -> bool {
        self.parts.get(&part).is_none_or(|r| r.is_empty())
    }

    /// Where part `part`, written in order from `start` with no gap, ends; `None` if it was
    /// not written that way.
    fn written_in_order(&self, part: u64, start: u64) -> Option<u64> {
        match self.parts.get(&part).map(Vec::as_slice) {
            None | Some([]) => Some(start),
            Some([only]) if only.start == start => Some(only.end),
            Some(_) => None,
        }
    }

    fn is_full(&self, part: u64, range: &Range<u64>) -> bool {
        self.parts
            .get(&part)
            .is_some_and(|r| r.len() == 1 && r[0].start <= range.start && r[0].end >= range.end)
    }

    /// Forgets everything at or after `offset` (truncation).
    fn truncate(&mut self, offset: u64) {
        self.parts.retain(|_, ranges| {
            ranges.retain(|r| r.start < offset);
            if let Some(last) = ranges.last_mut() {
                last.end = last.end.min(offset);
            }
            !ranges.is_empty()
        });
    }
}

/// The stored object a handle's unwritten bytes come from.
struct Base {
    key: String,
    etag: String,
    /// Bytes `0..len` of the file not written yet are the object's; past it they are zeros
    /// (a truncation shortens it).
    len: u64,
}

/// What a conditional commit requires of the object it replaces: the version the file was
/// opened on, so that a write queued while another client changed the object never silently
/// replaces that change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Expect {
    /// Not known (the file moved with its directory): no condition.
    #[default]
    Any,
    /// A new file: there must be no object at its key.
    Absent,
    /// The object must still have this ETag.
    Etag(String),
}

impl Expect {
    pub fn condition(&self) -> Condition<'_> {
        match self {
            Expect::Any => Condition::None,
            Expect::Absent => Condition::Absent,
            Expect::Etag(e) => Condition::Etag(e),
        }
    }
}

/// What [`WriteHandle::keep_locally`] made durable in the spool.
#[derive(Debug, Clone)]
pub struct KeptLocally {
    pub size: u64,
    pub attrs: ObjectAttributes,
    pub expect: Expect,
    /// The spool's path.
    pub spool: std::path::PathBuf,
    /// The file's bytes, when it is small enough to be made durable with its record instead
    /// (the spool is then not synced).
    pub inline: Option<Vec<u8>>,
}

pub struct WriteState {
    /// Where the object goes; a rename while open changes it.
    pub key: String,
    pub size: u64,
    pub attrs: ObjectAttributes,
    spool: Arc<std::fs::File>,
    /// The spool opened with O_DIRECT, for whole aligned parts.
    direct: Option<Arc<std::fs::File>>,
    /// Parts held in memory on their way into the spool; awaited before the spool is read.
    spooling: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// Which bytes the spool holds (written, or fetched from the base).
    coverage: Coverage,
    /// The part being written in order, not in the spool yet.
    filling: Option<Filling>,
    base: Option<Base>,
    upload: Option<Upload>,
    dirty: bool,
    /// Spool space reserved for the part held in memory, up to this offset (see
    /// `reserve_spool`).
    reserved_to: u64,
    /// Whether the spool's file system can reserve space (fallocate); if not, a full disk is
    /// found when the held part is copied there.
    can_reserve: bool,
    /// Set once a write could not be kept (the local disk failed or was full): the file is
    /// no longer what the application wrote, so it is never stored; every later write and
    /// the commit fail with this.
    failed: Option<Failure>,
    /// The last commit failed and nothing changed since: the last release must not try again
    /// behind the application's back (its close was told of the failure).
    commit_failed: bool,
    /// A part `append_now` completed, for `seal_full_part` to start.
    completed: Option<u64>,
    /// The file was unlinked while open: it stays readable and writable through its
    /// descriptors, and is never stored again.
    unlinked: bool,
    /// The last commit stored an object without `attrs` as they were then (a chmod or touch
    /// after its multipart upload was created): they need a copy of their own.
    pub attrs_left_behind: bool,
    /// Attribute changes made while the file is open (see [`WriteState::attrs_set`]); an
    /// upload created before the last of them was created without it.
    attrs_set: u64,
    /// The last commit completed an interrupted upload it resumed, created with other
    /// attributes than the file has: all of them need a copy.
    pub attrs_of_another_write: bool,
    /// The spool's name, when it has one (`named_spools`): removed when the handle ends,
    /// unless `keep_spool`.
    spool_path: Option<std::path::PathBuf>,
    /// The spool holds a version S3 does not have yet, recorded for a later mount: it stays.
    pub keep_spool: bool,
    /// What a conditional commit requires of the object it replaces.
    pub expect: Expect,
    /// How many part uploads run at once (`uploads` has as many permits).
    slots: UploadSlots,
    /// Where the spool goes when the handle ends and it is not kept (named spools).
    spools: Option<Arc<SpoolPool>>,
    /// The spool can hold another file once this handle ends: no record of the queue's log
    /// names it without carrying its data (see `queue_log`), so a crash before the record of
    /// its removal is durable never takes another file's bytes for this one's.
    spool_reusable: bool,
}

/// Named spools of write handles that ended, kept for new ones (write-back): on ext4, making
/// and removing a file for each small file written costs more than the rest of its close
/// (the inode allocator searches past the inodes removed recently).
#[derive(Debug, Default)]
pub struct SpoolPool {
    free: std::sync::Mutex<Vec<(std::fs::File, std::path::PathBuf)>>,
}

/// Spools kept for reuse at most.
const SPOOLS_KEPT: usize = 64;

impl SpoolPool {
    /// Removes the spools kept (at unmount).
    pub fn clear(&self) {
        for (_, path) in std::mem::take(&mut *super::lock(&self.free)) {
            let _ = std::fs::remove_file(path);
        }
    }

    fn take(&self) -> Option<(std::fs::File, std::path::PathBuf)> {
        super::lock(&self.free).pop()
    }

    /// Keeps `file` (at `path`) for a new handle, emptied; false when the pool is full or the
    /// file cannot be emptied.
    fn keep(&self, file: std::fs::File, path: &std::path::Path) -> bool {
        let mut free = super::lock(&self.free);
        if free.len() >= SPOOLS_KEPT || file.set_len(0).is_err() {
            return false;
        }
        free.push((file, path.to_path_buf()));
        true
    }
}

impl Drop for WriteState {
    fn drop(&mut self) {
        if let Some(path) = self.spool_path.as_ref().filter(|_| !self.keep_spool) {
            if let Some(pool) = self.spools.as_ref().filter(|_| self.spool_reusable) {
                // Nothing else (a copy into it under way) holds the spool.
                if Arc::strong_count(&self.spool) == 1 {
                    if let Ok(file) = self.spool.try_clone() {
                        if pool.keep(file, path) {
                            return;
                        }
                    }
                }
            }
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("could not remove the spool file {}: {e}", path.display());
                }
            }
        }
    }
}

/// Why a handle failed, kept to answer every later call the same way.
#[derive(Debug, Clone)]
struct Failure {
    no_space: bool,
    message: String,
}

impl Failure {
    fn error(&self) -> FsError {
        if self.no_space {
            FsError::NoSpace(self.message.clone())
        } else {
            FsError::Io(self.message.clone())
        }
    }
}

impl WriteState {
    /// Fails with what made the handle fail, if it did.
    fn check(&self) -> FsResult<()> {
        self.failed.as_ref().map_or(Ok(()), |f| Err(f.error()))
    }

    /// A write to the spool failed while `what`: the handle no longer holds what the
    /// application wrote, so it fails for good (a size past the file system's limit changes
    /// nothing and does not).
    fn spool_failed(&mut self, what: &str, e: std::io::Error) -> FsError {
        let err = FsError::local(&format!("spool file of {}: {what}", self.key), e);
        let failure = match &err {
            FsError::NoSpace(m) => Some(Failure {
                no_space: true,
                message: m.clone(),
            }),
            FsError::Io(m) => Some(Failure {
                no_space: false,
                message: m.clone(),
            }),
            _ => None,
        };
        if self.failed.is_none() {
            self.failed = failure;
        }
        err
    }

    /// Something changed: the next commit stores it, and so may the last release.
    fn changed(&mut self) {
        self.dirty = true;
        self.commit_failed = false;
    }

    /// Reserves spool space for the part held in memory up to `upto` (rounded up to
    /// [`RESERVE_STEP`], within the part), so a full disk fails the write that needs the space,
    /// not a later copy into the spool. Off where the file system cannot reserve.
    fn reserve_spool(&mut self, part_end: u64, upto: u64) -> FsResult<()> {
        if !self.can_reserve || upto <= self.reserved_to {
            return Ok(());
        }
        let to = upto
            .div_ceil(RESERVE_STEP)
            .saturating_mul(RESERVE_STEP)
            .min(part_end);
        use std::os::unix::io::AsRawFd;
        // SAFETY: fallocate on a descriptor this handle owns; the range is within i64.
        let r = unsafe {
            libc::fallocate(
                self.spool.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                self.reserved_to as i64,
                (to - self.reserved_to) as i64,
            )
        };
        if r == 0 {
            self.reserved_to = to;
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENODEV) => {
                self.can_reserve = false;
                Ok(())
            }
            _ => Err(self.spool_failed("reserving space for the data", e)),
        }
    }

    /// Something besides the data changed (metadata, the key): commit again.
    pub fn touch(&mut self) {
        self.changed();
    }

    /// Attributes were set on the open file (chmod, chown, touch, an extended attribute): an
    /// upload created before does not carry them, and its commit stores them with a copy.
    pub fn attrs_set(&mut self) {
        self.attrs_set += 1;
    }

    /// The object at `from` with ETag `etag` was copied to `to` as `new_etag` (a rename while
    /// open): unwritten bytes now come from there.
    pub fn base_moved(&mut self, from: &str, etag: &str, to: &str, new_etag: String) {
        if let Some(base) = self
            .base
            .as_mut()
            .filter(|b| b.key == from && b.etag == etag)
        {
            base.key = to.to_string();
            base.etag = new_etag;
        }
    }
}

/// What every write handle of a filesystem shares: the client, the settings, the journal of
/// uploads in progress and the memory budget that part buffers are taken from.
pub struct WriteContext<C> {
    pub client: Arc<C>,
    pub config: WriteConfig,
    pub journal: Option<Arc<UploadJournal>>,
    pub budget: Arc<MemoryBudget>,
    /// The mount's GETs of file data in flight, shared with reads (see
    /// [`super::get::read_connections`]): filling the spool from the stored object takes one.
    pub gets: Arc<tokio::sync::Semaphore>,
    /// S3 cannot be reached (write-back's worker says so): parts are not sent while writing,
    /// only kept in the spool, so a writer never waits on an outage (the commit sends them).
    pub offline: Arc<std::sync::atomic::AtomicBool>,
    /// Named spools kept for reuse.
    pub spools: Arc<SpoolPool>,
}

impl<C> Clone for WriteContext<C> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            config: self.config.clone(),
            journal: self.journal.clone(),
            budget: self.budget.clone(),
            gets: self.gets.clone(),
            offline: self.offline.clone(),
            spools: self.spools.clone(),
        }
    }
}

/// The largest file S3's 10,000 parts of our growing sizes can hold, from `part_size`.
pub fn max_file_size(part_size: u64) -> u64 {
    part_range(MAX_PARTS - 1, part_size).end
}

pub struct WriteHandle<C> {
    ctx: WriteContext<C>,
    uploads: Arc<Semaphore>,
    pub state: tokio::sync::Mutex<WriteState>,
}

impl<C: ObjectClient> WriteHandle<C> {
    /// A handle for a new (or truncated) object at `key`.
    pub fn new(ctx: WriteContext<C>, key: String, attrs: ObjectAttributes) -> FsResult<Self> {
        let named = ctx.config.named_spools;
        let reused = if named { ctx.spools.take() } else { None };
        let (spool, path) = local_io(|| match (reused, &ctx.config.spool_dir) {
            (Some((f, p)), _) => Ok((f, Some(p))),
            (None, Some(dir)) if named => tempfile::Builder::new()
                .prefix("spool-")
                .tempfile_in(dir)
                .and_then(|f| f.keep().map_err(|e| e.error))
                .map(|(f, p)| (f, Some(p))),
            (None, Some(dir)) => tempfile::tempfile_in(dir).map(|f| (f, None)),
            (None, None) => tempfile::tempfile().map(|f| (f, None)),
        })
        .map_err(|e| FsError::local(&format!("creating the spool file of {key}"), e))?;
        let handle = Self::with_spool(ctx, key, attrs, spool);
        {
            let s = &mut handle.state.try_lock().expect("new");
            s.spools = path.as_ref().map(|_| handle.ctx.spools.clone());
            s.spool_path = path;
            s.spool_reusable = true;
        }
        Ok(handle)
    }

    /// A handle for a file a write-back spool at `path` holds whole (`size` bytes), found at
    /// mount: it is stored as a new upload of all of it (an interrupted one is resumed).
    pub fn recovered(
        ctx: WriteContext<C>,
        key: String,
        kept: KeptLocally,
        spool: std::fs::File,
    ) -> Self {
        let handle = Self::with_spool(ctx, key, kept.attrs, spool);
        {
            let s = &mut handle.state.try_lock().expect("new");
            s.size = kept.size;
            let part_size = handle.ctx.config.part_size;
            if kept.size > 0 {
                for part in 0..=part_index(kept.size - 1, part_size) {
                    let r = part_range(part, part_size);
                    s.coverage.add(part, r.start..r.end.min(kept.size));
                }
            }
            s.spool_path = Some(kept.spool);
            s.keep_spool = true;
            s.expect = kept.expect;
            // What a reopen would write with O_DIRECT goes buffered: one descriptor per file.
            s.direct = None;
        }
        handle
    }

    /// Makes the file as it is now whole in its (named) spool: what is held in memory or on
    /// its way is written, and bytes only the base object has are fetched. A file of at most
    /// `inline_max` bytes is read back for the caller to make durable with its record;
    /// a larger one's spool is synced. The spool then outlives the handle. Fails as the
    /// handle fails (and then the file must not be stored).
    pub async fn keep_locally(&self, inline_max: u64) -> FsResult<KeptLocally> {
        let mut s = self.state.lock().await;
        s.check()?;
        let Some(path) = s.spool_path.clone() else {
            return Err(FsError::internal("a spool without a name cannot be kept"));
        };
        self.spill(&mut s).await?;
        let size = s.size;
        self.fill(&mut s, 0..size).await?;
        let mut inline = None;
        if size <= inline_max {
            let mut data = vec![0u8; size as usize];
            if let Err(e) = local_io(|| s.spool.read_exact_at(&mut data, 0)) {
                return Err(s.spool_failed("reading it back", e));
            }
            inline = Some(data);
        } else if let Err(e) = local_io(|| s.spool.sync_data()) {
            return Err(s.spool_failed("syncing it to disk", e));
        }
        s.spool_reusable = inline.is_some();
        s.keep_spool = true;
        // Closed: O_DIRECT was for the sequential writer.
        s.direct = None;
        Ok(KeptLocally {
            size,
            attrs: s.attrs.clone(),
            expect: s.expect.clone(),
            spool: path,
            inline,
        })
    }

    /// The file's local version is no longer needed (S3 has it, or it was removed): its spool
    /// goes with the handle.
    pub async fn release_locally(&self) {
        self.state.lock().await.keep_spool = false;
    }

    /// A handle whose spool is `spool` (an empty file).
    fn with_spool(
        ctx: WriteContext<C>,
        key: String,
        attrs: ObjectAttributes,
        spool: std::fs::File,
    ) -> Self {
        let direct = open_direct(&spool).map(Arc::new);
        let max = ctx.config.upload_concurrency.max(1);
        let slots = UPLOAD_SLOTS_START.min(max);
        Self {
            uploads: Arc::new(Semaphore::new(slots)),
            ctx,
            state: tokio::sync::Mutex::new(WriteState {
                key,
                size: 0,
                attrs,
                spool: Arc::new(spool),
                direct,
                spooling: Vec::new(),
                coverage: Coverage::default(),
                filling: None,
                base: None,
                upload: None,
                // A new file exists once committed, even when nothing is written to it.
                dirty: true,
                reserved_to: 0,
                can_reserve: true,
                failed: None,
                commit_failed: false,
                completed: None,
                unlinked: false,
                attrs_left_behind: false,
                attrs_set: 0,
                attrs_of_another_write: false,
                spool_path: None,
                keep_spool: false,
                expect: Expect::Any,
                spools: None,
                spool_reusable: false,
                slots: UploadSlots::new(slots, max),
            }),
        }
    }

    pub async fn size(&self) -> u64 {
        self.state.lock().await.size
    }

    /// The largest file S3's 10,000 parts of our growing sizes can hold (past its 5 TiB
    /// object limit with the default part size).
    fn max_size(&self) -> u64 {
        max_file_size(self.ctx.config.part_size)
    }

    fn too_large(&self) -> FsError {
        FsError::FileTooLarge(format!(
            "S3 objects made of {MAX_PARTS} parts from {} MiB hold at most {} bytes",
            self.ctx.config.part_size >> 20,
            self.max_size()
        ))
    }

    /// Starts from the stored object (opening without O_TRUNC): `size` bytes with ETag `etag`,
    /// fetched or copied only as needed. Nothing to commit until something changes.
    pub async fn start_from(&self, etag: String, size: u64) -> FsResult<()> {
        let mut s = self.state.lock().await;
        if let Err(e) = local_io(|| s.spool.set_len(size)) {
            return Err(FsError::local(
                &format!("sizing the spool file of {}", s.key),
                e,
            ));
        }
        s.size = size;
        s.coverage = Coverage::default();
        s.base = Some(Base {
            key: s.key.clone(),
            etag,
            len: size,
        });
        s.dirty = false;
        Ok(())
    }

    /// Reads back from the spool (a file open for reading and writing), fetching bytes of the
    /// base not there yet.
    pub async fn read(&self, offset: u64, len: u64) -> FsResult<bytes::Bytes> {
        let mut s = self.state.lock().await;
        self.spill(&mut s).await?;
        let end = offset.saturating_add(len).min(s.size);
        if offset >= end {
            return Ok(bytes::Bytes::new());
        }
        let block = offset - offset % FILL_BLOCK..end.div_ceil(FILL_BLOCK) * FILL_BLOCK;
        self.fill(&mut s, block).await?;
        let mut buf = vec![0u8; (end - offset) as usize];
        local_io(|| s.spool.read_exact_at(&mut buf, offset))
            .map_err(|e| FsError::local(&format!("reading the spool file of {}", s.key), e))?;
        Ok(bytes::Bytes::from(buf))
    }

    /// Fetches the bytes of `range` that the spool lacks and the base has.
    async fn fill(&self, s: &mut WriteState, range: Range<u64>) -> FsResult<()> {
        // Reading the spool (here and in the uploads that follow) needs what is on its way.
        self.spooled(s).await?;
        let Some((base_key, base_etag, base_len)) = s
            .base
            .as_ref()
            .map(|b| (b.key.clone(), b.etag.clone(), b.len))
        else {
            return Ok(());
        };
        let range = range.start..range.end.min(base_len);
        if range.is_empty() {
            return Ok(());
        }
        let part_size = self.ctx.config.part_size;
        // Missing pieces, merged across part boundaries: one GET each.
        let mut missing: Vec<Range<u64>> = Vec::new();
        for part in part_index(range.start, part_size)..=part_index(range.end - 1, part_size) {
            let p = part_range(part, part_size);
            for m in s
                .coverage
                .missing(part, range.start.max(p.start)..range.end.min(p.end))
            {
                match missing.last_mut() {
                    Some(last) if last.end == m.start => last.end = m.end,
                    _ => missing.push(m),
                }
            }
        }
        for m in missing {
            let _get = super::get::get_slot(&self.ctx.gets).await;
            let mut out = self
                .ctx
                .client
                .get_object(&base_key, Some(m.clone()), Some(&base_etag))
                .await
                .map_err(from_client)?;
            let mut pos = m.start;
            while let Some(chunk) = out.body.next_chunk().await.map_err(from_client)? {
                if let Err(e) = local_io(|| s.spool.write_all_at(&chunk, pos)) {
                    return Err(s.spool_failed("keeping bytes of the stored object", e));
                }
                pos += chunk.len() as u64;
            }
            if pos != m.end {
                return Err(FsError::internal(&format!(
                    "GetObject of bytes {m:?} of {base_key} ended at {pos}"
                )));
            }
            for part in part_index(m.start, part_size)..=part_index(m.end - 1, part_size) {
                let p = part_range(part, part_size);
                s.coverage.add(part, m.start.max(p.start)..m.end.min(p.end));
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset`; starts uploads of parts it completes, then waits until the
    /// uploads in flight leave room.
    pub async fn write(&self, offset: u64, data: &[u8]) -> FsResult<u32> {
        let n = self.take(offset, data).await?;
        self.room().await?;
        Ok(n)
    }

    /// Waits until the uploads in flight leave room for more parts (back-pressure).
    pub async fn room(&self) -> FsResult<()> {
        let mut s = self.state.lock().await;
        self.wait_for_room(&mut s).await
    }

    /// Takes `data` at `offset` (into the part held in memory, or the spool) and starts
    /// uploads of parts it completes; `data` is no longer needed when it returns. Never waits
    /// for memory: a part that cannot have a buffer now goes to the spool.
    pub async fn take(&self, offset: u64, data: &[u8]) -> FsResult<u32> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= self.max_size())
            .ok_or_else(|| self.too_large())?;
        if data.is_empty() {
            return Ok(0);
        }
        let mut s = self.state.lock().await;
        s.check()?;
        // A part filled by `append_now` whose sealing has not run yet goes first.
        self.seal_if_full(&mut s).await?;
        s.changed();
        let base = self.ctx.config.part_size;
        for part in part_index(offset, base)..=part_index(end - 1, base) {
            let range = part_range(part, base);
            let piece = offset.max(range.start)..end.min(range.end);
            let bytes = &data[(piece.start - offset) as usize..(piece.end - offset) as usize];
            // Rewritten after upload: it goes up again.
            if let Some(upload) = s.upload.as_mut() {
                if let Some(PartState::Uploading(task)) = upload.parts.remove(&part) {
                    task.abort();
                }
            }
            if !self.gather(&mut s, part, piece.start, bytes).await? {
                if s.filling.as_ref().is_some_and(|f| f.part == part) {
                    self.spill(&mut s).await?;
                }
                // Nothing may land in the spool under a write still on its way.
                self.spooled(&mut s).await?;
                if let Err(e) = local_io(|| s.spool.write_all_at(bytes, piece.start)) {
                    return Err(s.spool_failed("writing", e));
                }
                s.coverage.add(part, piece.clone());
            }
            s.size = s.size.max(piece.end);
            let gathered = s.filling.as_ref().is_some_and(|f| f.part == part);
            if gathered && s.filling.as_ref().map(Filling::len) == Some(range.end - range.start) {
                self.seal(&mut s).await?;
            } else if !gathered
                && s.coverage.is_full(part, &range)
                && range.end <= s.size
                && self.online()
            {
                // The data is safe in the spool: if the upload cannot start now, the commit
                // tries again and reports the failure to close/fsync.
                if let Err(e) = self.start_part(&mut s, part).await {
                    tracing::warn!("part {} of {} not uploaded yet: {e}", part + 1, s.key);
                }
            }
        }
        Ok(data.len() as u32)
    }

    /// Takes a write in order into the part held in memory at once, on the caller's thread,
    /// when nothing needs waiting for: it continues the part, or starts one (memory is there
    /// now), and the handle is not busy. `None` leaves the write to [`WriteHandle::write`]. A
    /// write that completes its part returns [`Appended::PartFull`]: the caller must then
    /// run [`WriteHandle::seal_full_part`] (which starts its upload and waits for room)
    /// before answering the writer.
    pub fn append_now(&self, offset: u64, data: &[u8]) -> Option<Appended> {
        let mut s = self.state.try_lock().ok()?;
        if s.failed.is_some() || data.is_empty() {
            return None;
        }
        let base = self.ctx.config.part_size;
        let end = offset.checked_add(data.len() as u64)?;
        let part = part_index(offset, base);
        let range = part_range(part, base);
        if end > range.end {
            return None;
        }
        let in_memory = match &s.filling {
            Some(f) if f.part == part => {
                if range.start + f.len() != offset {
                    return None;
                }
                true
            }
            // Another part is held unfinished: `write` moves it to the spool first.
            Some(_) => return None,
            // The first byte of an untouched part: held in memory if there is room now.
            None if offset == range.start && s.coverage.untouched(part) => {
                match self
                    .ctx
                    .budget
                    .part_buffer_now((range.end - range.start) as usize)
                {
                    Some(data) => {
                        s.reserved_to = range.start;
                        s.filling = Some(Filling { part, data });
                        true
                    }
                    None => false,
                }
            }
            None => false,
        };
        if in_memory {
            // A full disk is `write`'s to report (the failure is recorded here).
            s.reserve_spool(range.end, end).ok()?;
            s.filling.as_mut()?.push(data);
        } else {
            // Memory is short: a part written in order goes straight into the spool, from
            // the kernel's request (no copy), and up from there once complete.
            if s.coverage.written_in_order(part, range.start) != Some(offset) {
                return None;
            }
            let rewritten = s
                .upload
                .as_ref()
                .is_some_and(|u| u.parts.contains_key(&part));
            if rewritten {
                return None;
            }
            if let Err(e) = local_io(|| s.spool.write_all_at(data, offset)) {
                s.spool_failed("writing", e);
                return None;
            }
            s.coverage.add(part, offset..end);
        }
        s.size = s.size.max(end);
        s.changed();
        Some(if end == range.end {
            s.completed = Some(part);
            Appended::PartFull(s.size)
        } else {
            Appended::Taken(s.size)
        })
    }

    /// After [`Appended::PartFull`]: starts the upload of the full part (from memory, or
    /// from the spool), then waits until the uploads in flight leave room.
    pub async fn seal_full_part(&self) -> FsResult<()> {
        let mut s = self.state.lock().await;
        self.seal_if_full(&mut s).await?;
        // A part completed in the spool.
        if let Some(part) = s.completed.take() {
            let range = part_range(part, self.ctx.config.part_size);
            let started = s
                .upload
                .as_ref()
                .is_some_and(|u| u.parts.contains_key(&part));
            if !started && s.coverage.is_full(part, &range) && range.end <= s.size && self.online()
            {
                if let Err(e) = self.start_part(&mut s, part).await {
                    tracing::warn!("part {} of {} not uploaded yet: {e}", part + 1, s.key);
                }
            }
        }
        self.wait_for_room(&mut s).await
    }

    /// Seals the part held in memory if it is full.
    async fn seal_if_full(&self, s: &mut WriteState) -> FsResult<()> {
        let full = s.filling.as_ref().is_some_and(|f| {
            let range = part_range(f.part, self.ctx.config.part_size);
            f.len() == range.end - range.start
        });
        if full {
            self.seal(s).await?;
        }
        Ok(())
    }

    /// Adds `bytes` at `offset` of `part` to the part held in memory, or starts holding the
    /// part when this write is its first byte. False when this write is not sequential.
    async fn gather(
        &self,
        s: &mut WriteState,
        part: u64,
        offset: u64,
        bytes: &[u8],
    ) -> FsResult<bool> {
        let range = part_range(part, self.ctx.config.part_size);
        let end = offset + bytes.len() as u64;
        if let Some(f) = s.filling.as_ref().filter(|f| f.part == part) {
            if range.start + f.len() != offset {
                return Ok(false);
            }
            s.reserve_spool(range.end, end)?;
            if let Some(f) = s.filling.as_mut() {
                f.push(bytes);
            }
            return Ok(true);
        }
        if offset != range.start || !s.coverage.untouched(part) {
            return Ok(false);
        }
        // A part left unfinished (the writer moved on) goes to the spool first.
        self.spill(s).await?;
        // Memory is never waited for here: the write's data, copied out of the kernel's
        // request, is held until it is taken. Without room now, the part goes to the spool.
        let capacity = range.end - range.start;
        let Some(buffer) = self.ctx.budget.part_buffer_now(capacity as usize) else {
            return Ok(false);
        };
        s.reserved_to = range.start;
        s.reserve_spool(range.end, end)?;
        let mut f = Filling { part, data: buffer };
        f.push(bytes);
        s.filling = Some(f);
        Ok(true)
    }

    /// Moves the part held in memory to the spool, unfinished (a non-sequential write, a read,
    /// a truncation), and waits until everything on its way there has arrived.
    async fn spill(&self, s: &mut WriteState) -> FsResult<()> {
        if let Some(f) = s.filling.take() {
            let (part, data) = f.into_parts();
            self.to_spool(s, part, data);
        }
        self.spooled(s).await
    }

    /// Waits for the spool writes under way; the spool is complete afterwards.
    async fn spooled(&self, s: &mut WriteState) -> FsResult<()> {
        for task in std::mem::take(&mut s.spooling) {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(s.spool_failed("copying a part into it", e)),
                Err(e) => {
                    let e = std::io::Error::other(format!("the copying task failed: {e}"));
                    return Err(s.spool_failed("copying a part into it", e));
                }
            }
        }
        s.check()
    }

    /// Starts writing part `part` (from its first byte) into the spool, off the writer's path:
    /// with O_DIRECT when it is large and aligned, else buffered (a small one written directly
    /// would wait for the disk, and be read from it again by a commit or a read). The coverage
    /// counts it at once; readers of the spool wait for it (`spooled`).
    fn to_spool(&self, s: &mut WriteState, part: u64, data: bytes::Bytes) {
        let start = part_range(part, self.ctx.config.part_size).start;
        s.coverage.add(part, start..start + data.len() as u64);
        let aligned = start % BUFFER_ALIGN as u64 == 0
            && data.len() >= DIRECT_MIN
            && data.len() % BUFFER_ALIGN == 0
            && data.as_ptr().align_offset(BUFFER_ALIGN) == 0;
        let direct = s.direct.clone().filter(|_| aligned);
        let spool = s.spool.clone();
        s.spooling.push(tokio::task::spawn_blocking(move || {
            if let Some(direct) = direct {
                match direct.write_all_at(&data, start) {
                    Ok(()) => return Ok(()),
                    // Some file systems refuse O_DIRECT; buffered writes still work.
                    Err(e) => tracing::debug!("O_DIRECT spool write refused ({e}); buffered"),
                }
            }
            spool.write_all_at(&data, start)
        }));
    }

    /// The part held in memory is complete (full, or the file's last): starts its copy into
    /// the spool, and returns its data (which holds its memory) for the upload.
    async fn settle_filling(&self, s: &mut WriteState) -> FsResult<Option<(u64, bytes::Bytes)>> {
        let Some(f) = s.filling.take() else {
            return Ok(None);
        };
        // Do not let spool writes pile up behind a slow disk.
        if s.spooling.len() >= 4 {
            self.spooled(s).await?;
        }
        let (part, data) = f.into_parts();
        self.to_spool(s, part, data.clone());
        Ok(Some((part, data)))
    }

    /// A full part held in memory: into the spool, and up from memory.
    async fn seal(&self, s: &mut WriteState) -> FsResult<()> {
        if let Some((part, data)) = self.settle_filling(s).await? {
            if !self.online() {
                return Ok(()); // in the spool; the commit sends it
            }
            let key = s.key.clone();
            match self.upload(s).await {
                Ok(upload) => self.spawn_upload(upload, part, PutBody::Bytes(data)),
                // The data is safe in the spool: the commit tries again and reports the
                // failure to close/fsync.
                Err(e) => {
                    tracing::warn!("part {} of {key} not uploaded yet: {e}", part + 1);
                    if self.ctx.config.named_spools {
                        // Under write-back, the next parts wait in the spool for the commit
                        // instead of each waiting out its retries here.
                        super::writeback::went_offline(&self.ctx.offline);
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether parts go up while the file is written (not while S3 is known to be away).
    fn online(&self) -> bool {
        !self.ctx.offline.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Changes the size (truncate or extend with zeros).
    pub async fn truncate(&self, size: u64) -> FsResult<()> {
        if size > self.max_size() {
            return Err(self.too_large());
        }
        let mut s = self.state.lock().await;
        s.check()?;
        self.spill(&mut s).await?;
        if let Err(e) = local_io(|| s.spool.set_len(size)) {
            // Nothing changed: the size is refused, the handle is as it was.
            return Err(FsError::local(
                &format!("resizing the spool file of {}", s.key),
                e,
            ));
        }
        s.reserved_to = 0;
        s.size = size;
        s.coverage.truncate(size);
        if let Some(base) = s.base.as_mut() {
            base.len = base.len.min(size);
        }
        s.changed();
        let base = self.ctx.config.part_size;
        if let Some(upload) = s.upload.as_mut() {
            let from = part_index(size, base);
            upload.parts.retain(|part, state| {
                let keep = *part < from;
                if let (false, PartState::Uploading(task)) = (keep, &*state) {
                    task.abort();
                }
                keep
            });
        }
        Ok(())
    }

    /// The multipart upload of the handle, created on first use.
    ///
    /// The journal records the upload before the request goes out. CreateMultipartUpload is
    /// not idempotent: a request whose answer is lost may have made an upload whose id we
    /// never learn. Such a request is recorded as a lost create (found and aborted by key and
    /// time once this upload is over) and sent again.
    async fn upload<'a>(&self, s: &'a mut WriteState) -> FsResult<&'a mut Upload> {
        if s.upload.is_none() {
            let upload = match self.adopt(s).await {
                Some(adopted) => adopted,
                None => self.create(s).await?,
            };
            s.upload = Some(upload);
        }
        Ok(s.upload.as_mut().expect("made above"))
    }

    /// An upload with no parts yet, in the journal.
    fn new_upload(
        &self,
        s: &WriteState,
        id: String,
        entry: Option<JournalEntry>,
        checksum: Checksum,
    ) -> Upload {
        Upload {
            key: s.key.clone(),
            id,
            parts: BTreeMap::new(),
            created: entry.as_ref().map_or_else(SystemTime::now, |e| e.started()),
            attrs: attrs_digest(&s.attrs),
            attrs_set: s.attrs_set,
            checksum,
            log: entry.as_ref().map(JournalEntry::part_log),
            entry,
            reusable: BTreeMap::new(),
            reused: Default::default(),
            reused_bytes: Default::default(),
            resumed: false,
            lost: Vec::new(),
        }
    }

    /// Takes over an interrupted upload of the same key, if the journal has one and the file
    /// is written anew (no base object): its parts that S3 still has (ListParts) can be
    /// reused where the new bytes are the same.
    async fn adopt(&self, s: &WriteState) -> Option<Upload> {
        let journal = self.ctx.journal.as_ref()?;
        let window = self.ctx.config.resume_window;
        if s.base.is_some() || window.is_zero() {
            return None;
        }
        let (entry, adopted) = journal.adopt(&s.key, self.ctx.config.part_size, window)?;
        let Adopted {
            upload_id,
            parts: recorded,
            attrs,
            checksum,
        } = adopted;
        let mut listed = Vec::new();
        let mut marker = None;
        loop {
            match self.ctx.client.list_parts(&s.key, &upload_id, marker).await {
                Ok(page) => {
                    listed.extend(page.parts);
                    match page.next_part_number_marker {
                        Some(m) => marker = Some(m),
                        None => break,
                    }
                }
                Err(e) if e.kind == ErrorKind::NoSuchUpload => {
                    tracing::info!(key = s.key, "the interrupted upload to resume is gone");
                    entry.remove();
                    return None;
                }
                Err(e) => {
                    tracing::warn!(
                        key = s.key,
                        "cannot tell what the interrupted upload holds ({e}); starting anew"
                    );
                    entry.keep();
                    return None;
                }
            }
        }
        let mut reusable = BTreeMap::new();
        for p in listed {
            let known = match recorded.get(&p.part_number) {
                Some(r) if r.etag == p.etag && r.size == p.size => r.clone(),
                // Its answer never reached the journal: its ETag may still tell its bytes.
                _ if md5_like(&p.etag) => RecordedPart {
                    size: p.size,
                    etag: p.etag,
                    sha256_hex: None,
                    crc32c: None,
                },
                _ => continue,
            };
            reusable.insert(u64::from(p.part_number) - 1, known);
        }
        tracing::info!(
            key = s.key,
            "resuming an interrupted upload: S3 has {} parts ({} bytes) of it",
            reusable.len(),
            reusable.values().map(|p| p.size).sum::<u64>()
        );
        let mut upload = self.new_upload(s, upload_id, Some(entry), checksum);
        upload.attrs = attrs.unwrap_or_default();
        upload.reusable = reusable;
        upload.resumed = true;
        Some(upload)
    }

    /// Creates the multipart upload, recorded in the journal before the request goes out.
    async fn create(&self, s: &WriteState) -> FsResult<Upload> {
        let part_size = self.ctx.config.part_size;
        let entry = self
            .ctx
            .journal
            .as_ref()
            .map(|j| j.begin(&s.key, part_size));
        let mut lost = Vec::new();
        // Parts copied from a base object carry no checksum of ours, and an upload created
        // with CRC32C wants one on every part. A base with no bytes left (an empty object, or
        // one truncated to nothing, as `cp` over an existing file does) has nothing to copy.
        let checksum = match self.ctx.client.upload_checksum() {
            Checksum::Crc32c if s.base.as_ref().is_some_and(|b| b.len > 0) => Checksum::Sha256,
            c => c,
        };
        let id = loop {
            let sent = SystemTime::now();
            match self
                .ctx
                .client
                .create_multipart_upload(&s.key, &s.attrs, checksum)
                .await
            {
                Ok(id) => break id,
                Err(e) => {
                    if e.outcome_unknown() {
                        tracing::warn!(
                            key = s.key,
                            "CreateMultipartUpload got no answer ({e}); the upload it may have made will be aborted"
                        );
                        if let Some(j) = &self.ctx.journal {
                            lost.push(j.lost_create(&s.key, sent, SystemTime::now()));
                        }
                        if lost.len() <= CREATE_RETRIES {
                            continue;
                        }
                    }
                    if let Some(entry) = entry {
                        entry.remove();
                    }
                    self.find_lost(lost);
                    return Err(from_client(e));
                }
            }
        };
        let digest = attrs_digest(&s.attrs);
        if let Some(entry) = &entry {
            let base = s.base.as_ref().map(|b| b.etag.as_str());
            entry.created(&id, base, &digest, checksum);
        }
        let mut upload = self.new_upload(s, id, entry, checksum);
        upload.lost = lost;
        Ok(upload)
    }

    /// Searches, in the background, for the uploads lost creates may have made.
    fn find_lost(&self, lost: Vec<LostCreate>) {
        let Some(journal) = self.ctx.journal.clone() else {
            return;
        };
        if lost.is_empty() {
            return;
        }
        let client = self.ctx.client.clone();
        tokio::spawn(async move {
            for l in lost {
                journal.find_lost(&*client, l).await;
            }
        });
    }

    /// Starts uploading part `part` from the spool.
    async fn start_part(&self, s: &mut WriteState, part: u64) -> FsResult<()> {
        self.spooled(s).await?;
        let range = part_range(part, self.ctx.config.part_size);
        let body = PutBody::File {
            file: s.spool.clone(),
            offset: range.start,
            len: range.end.min(s.size) - range.start,
        };
        let upload = self.upload(s).await?;
        self.spawn_upload(upload, part, body);
        Ok(())
    }

    /// Starts sending part `part` with `body`; a part the upload resumes with the same bytes
    /// is not sent again. A stored part is recorded in the journal.
    fn spawn_upload(&self, upload: &mut Upload, part: u64, body: PutBody) {
        let memory = match body {
            PutBody::File { .. } => PartMemory::Reserve(PART_UPLOAD_MEMORY),
            PutBody::Bytes(_) => PartMemory::None,
        };
        let known = upload.reusable.remove(&part);
        let (log, checksum) = (upload.log.clone(), upload.checksum);
        let (reused, reused_bytes) = (upload.reused.clone(), upload.reused_bytes.clone());
        self.spawn_part(upload, part, memory, move |client, key, id| async move {
            let number = part as u32 + 1;
            if let Some(known) = known {
                let (theirs, size) = (body.clone(), known.size);
                let crc32c = checksum == Checksum::Crc32c;
                // Cannot read the spool back: send it (the send reads it too, and reports).
                let same = tokio::task::spawn_blocking(move || same_bytes(&theirs, &known, crc32c))
                    .await
                    .ok()
                    .and_then(|r| r.ok().flatten());
                if let Some(done) = same {
                    use std::sync::atomic::Ordering::Relaxed;
                    reused.fetch_add(1, Relaxed);
                    reused_bytes.fetch_add(size, Relaxed);
                    return Ok(done);
                }
            }
            send_part(&*client, &key, &id, number, body, log, checksum).await
        });
    }

    /// Starts a task that sends part `part` with `send` (given the client, key and upload id)
    /// once an upload slot and its memory are there.
    fn spawn_part<F, Fut>(&self, upload: &mut Upload, part: u64, memory: PartMemory, send: F)
    where
        F: FnOnce(Arc<C>, String, String) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<PartDone, ClientError>> + Send,
    {
        let (client, key, id, sem, budget) = (
            self.ctx.client.clone(),
            upload.key.clone(),
            upload.id.clone(),
            self.uploads.clone(),
            self.ctx.budget.clone(),
        );
        let task = tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.expect("never closed");
            let _memory = match memory {
                PartMemory::Reserve(bytes) => Some(budget.reserve(bytes).await),
                PartMemory::None => None,
            };
            send(client, key, id).await
        });
        upload.parts.insert(part, PartState::Uploading(task));
    }

    /// Starts copying part `part`, unchanged, from the base object server-side.
    /// The copy may cover the following parts too (`range` ends where they end): it goes up
    /// as part `part` alone, and they are left out of the object's part list.
    async fn start_copy(&self, s: &mut WriteState, part: u64, range: Range<u64>) -> FsResult<()> {
        let base = s.base.as_ref().expect("only parts of the base are copied");
        let (source, etag) = (base.key.clone(), base.etag.clone());
        let upload = self.upload(s).await?;
        self.spawn_part(
            upload,
            part,
            PartMemory::None,
            move |client, key, id| async move {
                let source = CopySource {
                    key: &source,
                    range: Some((range.start, range.end)),
                    if_match: Some(&etag),
                };
                client
                    .upload_part_copy(&key, &id, part as u32 + 1, source)
                    .await
                    .map(PartDone::copied)
            },
        );
        Ok(())
    }

    /// Part `part` holds nothing new and lies within the base: it can be copied server-side.
    fn copyable(&self, s: &WriteState, part: u64) -> bool {
        let range = part_range(part, self.ctx.config.part_size);
        s.base
            .as_ref()
            .is_some_and(|b| range.end.min(s.size) <= b.len && s.coverage.untouched(part))
    }

    async fn wait_for_room(&self, s: &mut WriteState) -> FsResult<()> {
        // Parts written in memory wait here with their buffers: keep just enough queued to
        // keep every upload slot busy.
        let limit = s.slots.now() + 1;
        let written = s.size;
        let Some(upload) = s.upload.as_mut() else {
            return Ok(());
        };
        let mut waited = false;
        loop {
            let in_flight: Vec<u64> = upload
                .parts
                .iter()
                .filter(|(_, st)| matches!(st, PartState::Uploading(_)))
                .map(|(p, _)| *p)
                .collect();
            if in_flight.len() < limit {
                break;
            }
            waited = true;
            let oldest = in_flight[0];
            // A part whose retries were spent is left out: it is in the spool, and the commit
            // sends it again (and reports to close/fsync if that fails too).
            if let Err(e) = settle(upload, oldest).await {
                tracing::warn!(
                    "part {} of {} not stored yet, sent again at close: {e}",
                    oldest + 1,
                    upload.key
                );
            }
        }
        match s.slots.written(written, waited, self.ctx.config.part_size) {
            Resize::Grow(n) => self.uploads.add_permits(n),
            // Best effort: slots busy now stay until they end; the limit above holds anyway.
            Resize::Shrink(n) => drop(self.uploads.forget_permits(n)),
            Resize::Keep => {}
        }
        Ok(())
    }

    /// Uploads whatever is not uploaded yet and completes the object. Returns the new ETag, or
    /// `None` when there was nothing to commit.
    pub async fn commit(&self) -> FsResult<Option<String>> {
        let mut s = self.state.lock().await;
        let result = match s.check() {
            // What the application wrote was not all kept: nothing may be stored.
            Err(e) => Err(e),
            Ok(()) if !s.dirty || s.unlinked => return Ok(None),
            Ok(()) => self.commit_locked(&mut s).await,
        };
        if result.is_err() {
            if let Some(upload) = s.upload.take() {
                self.give_up(upload);
            }
            s.commit_failed = true;
        }
        let etag = result?;
        s.dirty = false;
        s.commit_failed = false;
        s.expect = Expect::Etag(etag.clone());
        // S3 has all of it now: the new object is where unwritten bytes come from.
        s.coverage = Coverage::default();
        s.base = Some(Base {
            key: s.key.clone(),
            etag: etag.clone(),
            len: s.size,
        });
        Ok(Some(etag))
    }

    /// Starts the upload of part `part` and returns the last part number it covers: a run of
    /// unchanged parts is one copy, up to MAX_COPY_PART (part numbers need not be consecutive,
    /// so the run's other numbers go unused); anything else goes up from the spool.
    async fn start_run(&self, s: &mut WriteState, part: u64, last: u64) -> FsResult<u64> {
        let base = self.ctx.config.part_size;
        if !self.copyable(s, part) {
            let range = part_range(part, base);
            self.fill(s, range.start..range.end.min(s.size)).await?;
            self.start_part(s, part).await?;
            return Ok(part);
        }
        let start = part_range(part, base).start;
        let mut through = part;
        while through < last
            && missing(s, through + 1)
            && self.copyable(s, through + 1)
            && part_range(through + 1, base).end - start <= MAX_COPY_PART
        {
            through += 1;
        }
        let end = part_range(through, base).end.min(s.size);
        self.start_copy(s, part, start..end).await?;
        Ok(through)
    }

    async fn commit_locked(&self, s: &mut WriteState) -> FsResult<String> {
        let base = self.ctx.config.part_size;
        // Parts whose uploads ended before the close: one that failed gets one more round,
        // as the application could not be told while it wrote. A part failing during the
        // close is reported (its retry budget is the close's time limit).
        let ended_before: HashSet<u64> = s.upload.as_ref().map_or_else(HashSet::new, |u| {
            u.parts
                .iter()
                .filter(|(_, st)| matches!(st, PartState::Uploading(t) if t.is_finished()))
                .map(|(p, _)| *p)
                .collect()
        });
        // A rename since the upload began: it cannot move, so start over at the new key.
        if s.upload.as_ref().is_some_and(|u| u.key != s.key) {
            let stale = s.upload.take().expect("checked");
            self.abort(stale);
        }
        // A last part written in order goes up from memory; anything else held there moves to
        // the spool first.
        let mut in_memory = match &s.filling {
            Some(f) if part_range(f.part, base).start + f.len() == s.size => {
                self.settle_filling(s).await?
            }
            _ => {
                self.spill(s).await?;
                None
            }
        };
        if s.size <= base && s.upload.as_ref().is_none_or(|u| u.parts.is_empty()) {
            if let Some(unused) = s.upload.take() {
                self.abort(unused);
            }
            let body = match in_memory {
                Some((_, data)) => PutBody::Bytes(data),
                None => {
                    self.fill(s, 0..s.size).await?;
                    PutBody::File {
                        file: s.spool.clone(),
                        offset: 0,
                        len: s.size,
                    }
                }
            };
            s.attrs_left_behind = false;
            s.attrs_of_another_write = false;
            let condition = self.condition(s);
            return match self
                .ctx
                .client
                .put_object_if(&s.key, body.clone(), &s.attrs, condition)
                .await
            {
                // A conditional PUT retried after its first answer was lost finds its own
                // object there.
                Err(e) if e.kind == ErrorKind::PreconditionFailed => {
                    match self.put_anyway(&s.key, &body).await {
                        Some(etag) => Ok(etag),
                        None => Err(from_client(e)),
                    }
                }
                answer => answer.map_err(from_client),
            };
        }
        let last = part_index(s.size.max(1) - 1, base);
        // What is left goes from the spool, which holds little memory per part: with every
        // slot (nothing measured how many the link wants if the file was not written in order).
        let max = self.ctx.config.upload_concurrency.max(1);
        if s.slots.now() < max {
            self.uploads.add_permits(max - s.slots.now());
            s.slots = UploadSlots::all(max);
        }
        let mut part = 0;
        while part <= last {
            if !missing(s, part) {
                part += 1;
                continue;
            }
            if in_memory.as_ref().is_some_and(|(p, _)| *p == part) {
                let (_, data) = in_memory.take().expect("checked");
                let upload = self.upload(s).await?;
                self.spawn_upload(upload, part, PutBody::Bytes(data));
            } else {
                part = self.start_run(s, part, last).await?;
            }
            part += 1;
        }
        let numbers: Vec<u64> = s
            .upload
            .as_ref()
            .expect("started above")
            .parts
            .keys()
            .copied()
            .collect();
        let mut completed = Vec::with_capacity(numbers.len());
        for part in numbers {
            let upload = s.upload.as_mut().expect("started above");
            let done = match settle(upload, part).await {
                Ok(done) => done,
                Err(e) if !ended_before.contains(&part) => return Err(e),
                // Its retries were spent while the application went on writing: the bytes
                // are in the spool (or the base object).
                Err(e) => {
                    tracing::warn!(
                        "part {} of {} failed, sending it again: {e}",
                        part + 1,
                        s.key
                    );
                    self.start_run(s, part, last).await?;
                    settle(s.upload.as_mut().expect("started above"), part).await?
                }
            };
            completed.push(CompletedPart {
                part_number: part as u32 + 1,
                etag: done.etag,
                crc32c: done.crc32c,
            });
        }
        let upload = s.upload.take().expect("present");
        let answer = match self
            .ctx
            .client
            .complete_multipart_upload_if(&upload.key, &upload.id, &completed, self.condition(s))
            .await
        {
            // A retried CompleteMultipartUpload whose first answer was lost finds the upload
            // gone (or, conditional, the object there): it may be because that first request
            // completed it.
            Err(e)
                if matches!(
                    e.kind,
                    ErrorKind::NoSuchUpload | ErrorKind::PreconditionFailed
                ) =>
            {
                match self.completed_anyway(&upload, &completed, s.size).await {
                    Some(etag) => Ok(etag),
                    None => Err(e),
                }
            }
            answer => answer,
        };
        match answer {
            Ok(etag) => {
                let differs = upload.attrs != attrs_digest(&s.attrs);
                // The writes' own times differ too, but are not worth a copy of the object.
                s.attrs_left_behind = differs && upload.attrs_set != s.attrs_set;
                s.attrs_of_another_write = differs && upload.resumed;
                if upload.resumed {
                    use std::sync::atomic::Ordering::Relaxed;
                    tracing::info!(
                        key = upload.key,
                        "completed a resumed upload: {} parts ({} bytes) were in S3 already and not sent again",
                        upload.reused.load(Relaxed),
                        upload.reused_bytes.load(Relaxed)
                    );
                }
                let Upload { entry, lost, .. } = upload;
                if let Some(entry) = entry {
                    entry.remove();
                }
                self.find_lost(lost);
                Ok(etag)
            }
            Err(e) => {
                s.upload = Some(upload);
                Err(from_client(e))
            }
        }
    }

    /// Whether the object at `key` is `body`, stored by a PUT whose answer was lost: its
    /// ETag is the body's MD5. Returns its ETag.
    async fn put_anyway(&self, key: &str, body: &PutBody) -> Option<String> {
        use md5::Digest;
        let head = self.ctx.client.head_object(key).await.ok()?;
        let mut md5 = md5::Md5::new();
        local_io(|| body.for_each_chunk(|b| md5.update(b))).ok()?;
        let ours = format!("\"{}\"", hex::encode(md5.finalize()));
        (head.size == body.len() && head.etag == ours).then_some(head.etag)
    }

    /// The condition a commit's write carries (none unless commits are conditional).
    fn condition<'s>(&self, s: &'s WriteState) -> Condition<'s> {
        if self.ctx.config.conditional {
            s.expect.condition()
        } else {
            Condition::None
        }
    }

    /// Whether the object at the upload's key is the upload, completed by a request whose
    /// answer was lost: its ETag is the one S3 gives these parts (MD5 of the parts' MD5s,
    /// then the part count), or, where part ETags are not MD5s (SSE-KMS), it has the upload's
    /// size and part count and was written after the upload began. Returns its ETag.
    async fn completed_anyway(
        &self,
        upload: &Upload,
        parts: &[CompletedPart],
        size: u64,
    ) -> Option<String> {
        let head = self.ctx.client.head_object(&upload.key).await.ok()?;
        let expected = multipart_etag(parts);
        let ours = match &expected {
            Some(etag) => head.etag == *etag,
            None => {
                let count_suffix = format!("-{}", parts.len());
                head.size == size
                    && head.etag.trim_matches('"').ends_with(&count_suffix)
                    && head.last_modified + Duration::from_secs(5) >= upload.created
            }
        };
        if ours {
            tracing::warn!(
                key = upload.key,
                "the answer to CompleteMultipartUpload was lost; S3 has the object it completed"
            );
            return Some(head.etag);
        }
        None
    }

    /// Whether the last release should commit: there are changes, and neither a local
    /// failure nor a failed commit (already reported to a close) stands in the way.
    pub async fn commit_due_at_release(&self) -> bool {
        let s = self.state.lock().await;
        s.dirty && s.failed.is_none() && !s.commit_failed && !s.unlinked
    }

    /// Whether something changed that S3 does not have (and should).
    pub async fn has_unstored_changes(&self) -> bool {
        let s = self.state.lock().await;
        s.dirty && !s.unlinked
    }

    /// The file's object is about to go (unlinked, or replaced by a rename) while the file is
    /// open: fetches into the spool the bytes it has only in S3, so it stays readable.
    pub async fn keep_bytes(&self) -> FsResult<()> {
        let mut s = self.state.lock().await;
        let size = s.size;
        self.spill(&mut s).await?;
        self.fill(&mut s, 0..size).await
    }

    /// The file's name is gone (after [`WriteHandle::keep_bytes`]): what is open of it stays
    /// readable and writable, nothing of it is stored any more, and an upload under way is
    /// aborted.
    pub async fn unlinked(&self) {
        let mut s = self.state.lock().await;
        s.base = None;
        s.unlinked = true;
        if let Some(upload) = s.upload.take() {
            self.abort(upload);
        }
    }

    /// Gives up (on release of a handle whose commit failed): any multipart upload is left
    /// for a later write of the file to resume, or aborted.
    pub async fn discard(&self) {
        let mut s = self.state.lock().await;
        s.filling = None;
        let _ = self.spooled(&mut s).await;
        if let Some(upload) = s.upload.take() {
            self.give_up(upload);
        }
        s.dirty = false;
    }

    /// An upload that cannot be completed now (its close failed): kept in the journal for the
    /// resume window, so that writing the file again (by this mount or the next) sends only
    /// what S3 does not have; aborted when nothing would resume it.
    fn give_up(&self, mut upload: Upload) {
        let window = self.ctx.config.resume_window;
        let Some(entry) = upload.entry.take().filter(|_| !window.is_zero()) else {
            return self.abort(upload);
        };
        for state in std::mem::take(&mut upload.parts).into_values() {
            if let PartState::Uploading(task) = state {
                task.abort();
            }
        }
        tracing::warn!(
            key = upload.key,
            "the unfinished upload is kept for {} s: writing the file again from its start resumes it",
            window.as_secs()
        );
        entry.keep();
        self.find_lost(std::mem::take(&mut upload.lost));
    }

    /// Aborts `upload` in the background, so a close that failed reports it at once; the
    /// journal forgets the upload only once S3 has, so a later mount can try again.
    fn abort(&self, upload: Upload) {
        let Upload {
            key,
            id,
            parts,
            entry,
            lost,
            ..
        } = upload;
        for state in parts.into_values() {
            if let PartState::Uploading(task) = state {
                task.abort();
            }
        }
        let client = self.ctx.client.clone();
        let journal = self.ctx.journal.clone();
        tokio::spawn(async move {
            match client.abort_multipart_upload(&key, &id).await {
                Ok(()) => {}
                Err(e) if e.kind == ErrorKind::NoSuchUpload => {}
                Err(e) => {
                    tracing::warn!("could not abort the multipart upload of {key} (the next mount tries again): {e}");
                    return;
                }
            }
            if let Some(entry) = entry {
                entry.remove();
            }
            if let Some(j) = journal {
                for l in lost {
                    j.find_lost(&*client, l).await;
                }
            }
        });
    }
}

/// The ETag S3 gives a multipart object of `parts`, when their ETags are MD5s (they are not
/// under SSE-KMS): the MD5 of the parts' MD5s, a dash, the part count.
fn multipart_etag(parts: &[CompletedPart]) -> Option<String> {
    use md5::Digest;
    let mut md5s = Vec::with_capacity(parts.len() * 16);
    for p in parts {
        let digest = hex::decode(p.etag.trim_matches('"')).ok()?;
        if digest.len() != 16 {
            return None;
        }
        md5s.extend(digest);
    }
    Some(format!(
        "\"{}-{}\"",
        hex::encode(md5::Md5::digest(&md5s)),
        parts.len()
    ))
}

/// Sends part `number` of upload `id` and records it in `log` once S3 has it.
async fn send_part<C: ObjectClient>(
    client: &C,
    key: &str,
    id: &str,
    number: u32,
    body: PutBody,
    log: Option<PartLog>,
    checksum: Checksum,
) -> Result<PartDone, ClientError> {
    let size = body.len();
    let stored = client.upload_part(key, id, number, body, checksum).await?;
    if let Some(log) = log {
        let record = RecordedPart {
            size,
            etag: stored.etag.clone(),
            sha256_hex: stored.sha256_hex,
            crc32c: stored.crc32c,
        };
        local_io(|| log.stored(number, &record));
    }
    Ok(PartDone {
        etag: stored.etag,
        crc32c: stored.crc32c,
    })
}

/// Whether part `part` is neither uploaded nor under way.
fn missing(s: &WriteState, part: u64) -> bool {
    s.upload
        .as_ref()
        .is_none_or(|u| !u.parts.contains_key(&part))
}

/// Waits for part `part`'s upload and returns its ETag. A failed part is no longer in the
/// upload (a commit sends it again).
async fn settle(upload: &mut Upload, part: u64) -> FsResult<PartDone> {
    let state = upload
        .parts
        .remove(&part)
        .ok_or_else(|| FsError::internal(&format!("part {} was never started", part + 1)))?;
    let done = match state {
        PartState::Done(done) => done,
        PartState::Uploading(task) => match task.await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => return Err(from_client(e)),
            Err(e) => {
                return Err(FsError::internal(&format!(
                    "the upload task of part {} of {} ended without an answer: {e}",
                    part + 1,
                    upload.key
                )))
            }
        },
    };
    upload.parts.insert(part, PartState::Done(done.clone()));
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::{MockClient, Operation};

    /// Writes `total` bytes in 1 MiB writes, the link storing `rate(slots)` bytes per second;
    /// the number of slots at the end.
    fn slots_after(
        u: &mut UploadSlots,
        total: u64,
        waits: bool,
        rate: impl Fn(usize) -> f64,
    ) -> usize {
        let (mut now, mut size) = (u.growth.epoch.start, 0);
        while size < total {
            now += Duration::from_secs_f64((1 << 20) as f64 / rate(u.now()));
            size += 1 << 20;
            u.written_at(size, waits, 8 << 20, now);
        }
        u.now()
    }

    #[test]
    fn part_uploads_grow_only_while_growing_pays() {
        // A writer that never waits for uploads needs no more.
        let mut u = UploadSlots::new(2, 8);
        assert_eq!(slots_after(&mut u, 4 << 30, false, |_| 1e9), 2);
        // A link that stores as much faster as more go at once: up to --upload-concurrency.
        let mut u = UploadSlots::new(2, 8);
        assert_eq!(slots_after(&mut u, 8 << 30, true, |n| n as f64 * 50e6), 8);
        // A server at its limit already (loopback): one step is tried and undone.
        let mut u = UploadSlots::new(2, 8);
        assert_eq!(slots_after(&mut u, 4 << 30, true, |_| 140e6), 2);
        assert!(u.growth.settled);
        // Faster up to 4 at once, then flat: 3 and 5 paid (5 holds the 4th), 8 did not.
        let mut u = UploadSlots::new(2, 8);
        let rate = |n: usize| n.min(4) as f64 * 50e6;
        assert_eq!(slots_after(&mut u, 8 << 30, true, rate), 5);
        assert!(u.growth.settled);
    }

    #[test]
    fn multipart_etags_are_computed_as_s3_does() {
        // Two parts "a" and "b": MD5s 0cc175b9... and 92eb5ffe...
        let parts = [
            CompletedPart {
                part_number: 1,
                etag: "\"0cc175b9c0f1b6a831c399e269772661\"".into(),
                crc32c: None,
            },
            CompletedPart {
                part_number: 2,
                etag: "92eb5ffee6ae2fec3ad71c777531578f".into(),
                crc32c: None,
            },
        ];
        let mut md5s = hex::decode("0cc175b9c0f1b6a831c399e269772661").unwrap();
        md5s.extend(hex::decode("92eb5ffee6ae2fec3ad71c777531578f").unwrap());
        use md5::Digest;
        let want = format!("\"{}-2\"", hex::encode(md5::Md5::digest(&md5s)));
        assert_eq!(multipart_etag(&parts), Some(want));
        let kms = [CompletedPart {
            part_number: 1,
            etag: "\"not-an-md5\"".into(),
            crc32c: None,
        }];
        assert_eq!(multipart_etag(&kms), None);
    }

    #[test]
    fn part_layout_grows_and_covers_five_tib() {
        let mib = 1024 * 1024;
        assert_eq!(part_range(0, 8 * mib), 0..8 * mib);
        assert_eq!(part_range(999, 8 * mib).end, 8000 * mib);
        assert_eq!(part_range(1000, 8 * mib), 8000 * mib..8016 * mib);
        assert_eq!(part_index(8000 * mib, 8 * mib), 1000);
        assert_eq!(part_index(8000 * mib - 1, 8 * mib), 999);
        for off in [0, 5, 8 * mib, 123_456_789_012, 4 << 40] {
            let i = part_index(off, 8 * mib);
            assert!(part_range(i, 8 * mib).contains(&off), "{off}");
        }
        assert!(
            part_range(MAX_PARTS - 1, 8 * mib).end >= 5 << 40,
            "5 TiB fit in 10,000 parts"
        );
    }

    fn config(part: u64) -> WriteConfig {
        WriteConfig {
            part_size: part,
            upload_concurrency: 2,
            ..Default::default()
        }
    }

    fn context(
        mock: &Arc<MockClient>,
        part: u64,
        journal: Option<Arc<UploadJournal>>,
    ) -> WriteContext<MockClient> {
        WriteContext {
            client: mock.clone(),
            config: config(part),
            journal,
            budget: Arc::new(MemoryBudget::new(64 << 20)),
            gets: Arc::new(tokio::sync::Semaphore::new(4)),
            offline: Default::default(),
            spools: Default::default(),
        }
    }

    fn handle(mock: &Arc<MockClient>, part: u64) -> WriteHandle<MockClient> {
        WriteHandle::new(
            context(mock, part, None),
            "k".into(),
            ObjectAttributes::default(),
        )
        .unwrap()
    }

    /// A handle whose spool is /dev/full: every write to it fails with ENOSPC, as on a full
    /// disk (and it cannot reserve space, as some file systems cannot).
    fn handle_on_full_disk(mock: &Arc<MockClient>, part: u64) -> WriteHandle<MockClient> {
        let full = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        WriteHandle::with_spool(
            context(mock, part, None),
            "k".into(),
            ObjectAttributes::default(),
            full,
        )
    }

    fn with_journal(
        mock: &Arc<MockClient>,
        part: u64,
        dir: &std::path::Path,
    ) -> (WriteHandle<MockClient>, Arc<UploadJournal>) {
        let journal = Arc::new(UploadJournal::open(dir.to_path_buf()).unwrap());
        let h = WriteHandle::new(
            context(mock, part, Some(journal.clone())),
            "k".into(),
            ObjectAttributes::default(),
        )
        .unwrap();
        (h, journal)
    }

    /// Writes `data` through a new handle of `k` in parts of 1,000 bytes, in 100-byte
    /// writes as a copy makes them, and commits.
    async fn copy_in(mock: &Arc<MockClient>, dir: &std::path::Path, data: &[u8]) -> FsResult<()> {
        let (h, _) = with_journal(mock, 1000, dir);
        for (i, chunk) in data.chunks(100).enumerate() {
            h.write(i as u64 * 100, chunk).await?;
        }
        h.commit().await.map(|_| ())
    }

    #[tokio::test]
    async fn a_failed_close_keeps_its_upload_and_the_next_copy_sends_only_what_changed() {
        let mock = Arc::new(MockClient::new("b"));
        let dir = tempfile::tempdir().unwrap();
        let first: Vec<u8> = (0..5500u32).map(|i| (i % 251) as u8).collect();
        // The server goes away before the upload can be completed.
        mock.fail_next(Operation::CompleteMultipartUpload, ErrorKind::Connect, 1);
        assert!(copy_in(&mock, dir.path(), &first).await.is_err());
        assert_eq!(mock.open_uploads(), 1, "kept for a later write to resume");
        let journal = UploadJournal::open(dir.path().to_path_buf()).unwrap();
        let kept = journal.list_resumable();
        assert_eq!(
            (kept.len(), kept[0].parts, kept[0].bytes_stored),
            (1, 6, 5500)
        );
        assert_eq!(mock.count(Operation::UploadPart), 6);
        // The next copy has one part changed, and is shorter by 200 bytes: the changed part and
        // the new last part go up, the four others are S3's already.
        let mut second = first.clone();
        second[2100] ^= 0xff;
        second.truncate(5300);
        let (sent_before, _) = mock.bytes_moved();
        copy_in(&mock, dir.path(), &second).await.unwrap();
        let (sent_after, _) = mock.bytes_moved();
        assert_eq!(mock.count(Operation::UploadPart), 8);
        assert_eq!(sent_after - sent_before, 1000 + 300);
        assert_eq!(
            mock.count(Operation::CreateMultipartUpload),
            1,
            "the upload was adopted"
        );
        assert_eq!(&mock.object("k").unwrap().data[..], &second[..]);
        assert_eq!(mock.open_uploads(), 0);
        assert!(journal.is_empty());
    }

    #[tokio::test]
    async fn with_crc32c_every_part_carries_it_also_when_an_upload_is_resumed() {
        let mock = Arc::new(MockClient::new("b"));
        mock.crc32c
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let dir = tempfile::tempdir().unwrap();
        let first: Vec<u8> = (0..4500u32).map(|i| (i % 241) as u8).collect();
        mock.fail_next(Operation::CompleteMultipartUpload, ErrorKind::Connect, 1);
        assert!(copy_in(&mock, dir.path(), &first).await.is_err());
        let journal = UploadJournal::open(dir.path().to_path_buf()).unwrap();
        assert_eq!(journal.list_resumable()[0].parts, 5);
        // The mock completes an upload made with CRC32C only if each part's CRC32C is named,
        // and right: the reused parts' too, which were not sent again.
        let mut second = first.clone();
        second[1234] ^= 0x55;
        let (sent_before, _) = mock.bytes_moved();
        copy_in(&mock, dir.path(), &second).await.unwrap();
        let (sent_after, _) = mock.bytes_moved();
        assert_eq!(sent_after - sent_before, 1000, "only the changed part");
        assert_eq!(mock.count(Operation::CreateMultipartUpload), 1);
        assert_eq!(&mock.object("k").unwrap().data[..], &second[..]);
        assert!(journal.is_empty());
        // Over a base object, parts are copied server-side and carry no CRC32C of ours: the
        // upload is made without one, and its sent part carries the signed SHA-256.
        let h = handle(&mock, 1000);
        let etag = mock.object("k").unwrap().etag;
        h.start_from(etag, second.len() as u64).await.unwrap();
        h.write(10, b"Y").await.unwrap();
        h.commit().await.unwrap();
        second[10] = b'Y';
        assert_eq!(&mock.object("k").unwrap().data[..], &second[..]);
        assert_eq!(mock.count(Operation::UploadPartCopy), 1);
    }

    #[tokio::test]
    async fn an_upload_whose_parts_s3_lost_is_sent_whole_and_a_zero_window_keeps_nothing() {
        let mock = Arc::new(MockClient::new("b"));
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 7) as u8).collect();
        mock.fail_next(Operation::CompleteMultipartUpload, ErrorKind::Connect, 1);
        assert!(copy_in(&mock, dir.path(), &data).await.is_err());
        // Someone aborted it meanwhile: ListParts finds no upload, a new one is made.
        let id = mock.upload_ids()[0].clone();
        mock.abort_multipart_upload("k", &id).await.unwrap();
        copy_in(&mock, dir.path(), &data).await.unwrap();
        assert_eq!(mock.count(Operation::CreateMultipartUpload), 2);
        assert_eq!(mock.count(Operation::UploadPart), 6);
        assert_eq!(&mock.object("k").unwrap().data[..], &data[..]);
        // Without a resume window, a failed close aborts its upload as it always did.
        let journal = Arc::new(UploadJournal::open(dir.path().to_path_buf()).unwrap());
        let mut ctx = context(&mock, 1000, Some(journal.clone()));
        ctx.config.resume_window = Duration::ZERO;
        let h = WriteHandle::new(ctx, "k".into(), ObjectAttributes::default()).unwrap();
        h.write(0, &data).await.unwrap();
        mock.fail_next(Operation::CompleteMultipartUpload, ErrorKind::Connect, 1);
        assert!(h.commit().await.is_err());
        assert_eq!(mock.open_uploads_settled().await, 0);
        assert!(journal.list_resumable().is_empty());
    }

    #[tokio::test]
    async fn a_full_disk_fails_the_write_that_needs_space_and_stores_nothing() {
        let mock = Arc::new(MockClient::new("b"));
        mock.insert("k", "the previous version");
        let h = handle_on_full_disk(&mock, 1000);
        // Not in order: straight to the spool, which refuses it on this very call.
        let err = h.write(10, &[1u8; 100]).await.unwrap_err();
        assert_eq!(err.errno(), libc::ENOSPC);
        // The handle has failed for good: later writes and the commit say so too.
        assert_eq!(h.write(0, b"x").await.unwrap_err().errno(), libc::ENOSPC);
        assert_eq!(h.commit().await.unwrap_err().errno(), libc::ENOSPC);
        assert!(
            !h.commit_due_at_release().await,
            "nothing stored at release either"
        );
        assert_eq!(&mock.object("k").unwrap().data[..], b"the previous version");
        assert_eq!(mock.count(Operation::PutObject), 0);
    }

    #[tokio::test]
    async fn a_full_disk_under_a_sequential_writer_never_completes_the_object() {
        let mock = Arc::new(MockClient::new("b"));
        mock.insert("k", "the previous version");
        let h = handle_on_full_disk(&mock, 1000);
        // In order, into memory; each full part's copy into the spool fails, and the writer
        // hears of it (no later than the next call).
        let mut first_error = None;
        for (i, chunk) in [7u8; 5000].chunks(100).enumerate() {
            if let Err(e) = h.write(i as u64 * 100, chunk).await {
                first_error = Some(e.errno());
                break;
            }
            tokio::task::yield_now().await;
        }
        let err = h.commit().await.unwrap_err();
        assert_eq!(err.errno(), libc::ENOSPC);
        assert_eq!(first_error.unwrap_or(libc::ENOSPC), libc::ENOSPC);
        assert_eq!(mock.count(Operation::CompleteMultipartUpload), 0);
        assert_eq!(mock.count(Operation::PutObject), 0);
        assert_eq!(&mock.object("k").unwrap().data[..], b"the previous version");
        assert_eq!(mock.open_uploads_settled().await, 0);
    }

    #[tokio::test]
    async fn a_lost_complete_answer_is_a_stored_file() {
        let mock = Arc::new(MockClient::new("b"));
        let dir = tempfile::tempdir().unwrap();
        let (h, journal) = with_journal(&mock, 1000, dir.path());
        let data: Vec<u8> = (0..3500u32).map(|i| (i % 13) as u8).collect();
        h.write(0, &data).await.unwrap();
        // The first request completed the upload; its retry finds the upload gone.
        mock.lose_next_answer(
            Operation::CompleteMultipartUpload,
            ErrorKind::NoSuchUpload,
            1,
        );
        assert!(h.commit().await.unwrap().is_some());
        assert_eq!(&mock.object("k").unwrap().data[..], &data[..]);
        assert!(journal.is_empty(), "a completed upload leaves no entry");
    }

    #[tokio::test]
    async fn an_upload_someone_aborted_is_a_failed_close() {
        let mock = Arc::new(MockClient::new("b"));
        mock.insert("k", "the previous version");
        let h = handle(&mock, 1000);
        h.write(0, &[5u8; 3500]).await.unwrap();
        mock.fail_next(
            Operation::CompleteMultipartUpload,
            ErrorKind::NoSuchUpload,
            1,
        );
        assert_eq!(h.commit().await.unwrap_err().errno(), libc::EIO);
        assert_eq!(&mock.object("k").unwrap().data[..], b"the previous version");
    }

    #[tokio::test]
    async fn a_lost_create_answer_leaves_no_upload_behind() {
        let mock = Arc::new(MockClient::new("b"));
        let dir = tempfile::tempdir().unwrap();
        let (h, journal) = with_journal(&mock, 1000, dir.path());
        // The server made the upload; its answer never came.
        mock.lose_next_answer(Operation::CreateMultipartUpload, ErrorKind::Transport, 1);
        let data: Vec<u8> = (0..3500u32).map(|i| (i % 11) as u8).collect();
        h.write(0, &data).await.unwrap();
        h.commit().await.unwrap();
        assert_eq!(&mock.object("k").unwrap().data[..], &data[..]);
        assert_eq!(mock.count(Operation::CreateMultipartUpload), 2);
        assert_eq!(
            mock.open_uploads_settled().await,
            0,
            "the orphan was aborted"
        );
        for _ in 0..200 {
            if journal.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(journal.is_empty());
    }

    #[tokio::test]
    async fn small_file_is_one_put() {
        let mock = Arc::new(MockClient::new("b"));
        let h = handle(&mock, 1024);
        h.write(0, b"hello").await.unwrap();
        h.write(5, b" world").await.unwrap();
        assert!(h.commit().await.unwrap().is_some());
        assert_eq!(&mock.object("k").unwrap().data[..], b"hello world");
        assert_eq!(mock.count(Operation::PutObject), 1);
        assert_eq!(mock.count(Operation::CreateMultipartUpload), 0);
        assert!(h.commit().await.unwrap().is_none(), "nothing new to commit");
        // Committed again after one more write: the copy held in memory was kept in the spool.
        h.write(11, b"!").await.unwrap();
        h.commit().await.unwrap();
        assert_eq!(&mock.object("k").unwrap().data[..], b"hello world!");
    }

    #[tokio::test]
    async fn parts_upload_while_writing_even_out_of_order() {
        let mock = Arc::new(MockClient::new("b"));
        let h = handle(&mock, 1000);
        let data: Vec<u8> = (0..4500u32).map(|i| i as u8).collect();
        // Second half of part 0 before its first half, then the rest in order.
        h.write(500, &data[500..1000]).await.unwrap();
        h.write(0, &data[..500]).await.unwrap();
        h.write(1000, &data[1000..3000]).await.unwrap();
        tokio::task::yield_now().await;
        assert_eq!(
            mock.count(Operation::CreateMultipartUpload),
            1,
            "started before close"
        );
        h.write(3000, &data[3000..]).await.unwrap();
        h.commit().await.unwrap();
        assert_eq!(&mock.object("k").unwrap().data[..], &data[..]);
        assert_eq!(mock.count(Operation::UploadPart), 5);
        assert_eq!(mock.open_uploads(), 0);
    }

    #[tokio::test]
    async fn rewritten_part_goes_up_again_and_later_writes_recommit() {
        let mock = Arc::new(MockClient::new("b"));
        let h = handle(&mock, 1000);
        h.write(0, &[1u8; 2500]).await.unwrap();
        h.write(10, &[2u8; 5]).await.unwrap();
        h.commit().await.unwrap();
        let got = mock.object("k").unwrap().data;
        assert_eq!(got.len(), 2500);
        assert_eq!(&got[8..17], &[1, 1, 2, 2, 2, 2, 2, 1, 1]);
        // A write after the commit (a duplicated descriptor): the next commit has it too.
        h.write(2500, &[3u8; 100]).await.unwrap();
        h.commit().await.unwrap();
        let got = mock.object("k").unwrap().data;
        assert_eq!(got.len(), 2600);
        assert_eq!(got[2599], 3);
        assert_eq!(got[12], 2);
    }

    #[tokio::test]
    async fn a_part_failed_before_the_close_is_sent_once_more_and_then_reported() {
        for (failures, stored) in [(1, true), (100, false)] {
            let mock = Arc::new(MockClient::new("b"));
            let h = handle(&mock, 1000);
            let kind = crate::s3::ErrorKind::InternalError;
            mock.fail_next(Operation::UploadPart, kind, failures);
            h.write(0, &[1u8; 3000]).await.unwrap();
            // The parts sent while writing have their answers before the close.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let result = h.commit().await;
            if stored {
                result.unwrap();
                assert_eq!(&mock.object("k").unwrap().data[..], &[1u8; 3000][..]);
                assert_eq!(mock.count(Operation::UploadPart), 4, "one part sent twice");
            } else {
                assert_eq!(result.unwrap_err().errno(), libc::EIO);
                assert!(mock.object("k").is_none(), "nothing half-visible");
            }
            assert_eq!(mock.open_uploads_settled().await, 0, "no orphaned upload");
        }
    }

    #[tokio::test]
    async fn truncate_and_sparse_extend() {
        let mock = Arc::new(MockClient::new("b"));
        let h = handle(&mock, 1000);
        h.write(0, &[7u8; 2500]).await.unwrap();
        h.truncate(1200).await.unwrap();
        h.write(3000, b"end").await.unwrap();
        h.commit().await.unwrap();
        let got = mock.object("k").unwrap().data;
        assert_eq!(got.len(), 3003);
        assert!(got[..1200].iter().all(|b| *b == 7));
        assert!(
            got[1200..3000].iter().all(|b| *b == 0),
            "the hole reads as zeros"
        );
        assert_eq!(&got[3000..], b"end");
    }

    /// The handle of an existing object `k` of `len` pattern bytes, opened without O_TRUNC.
    async fn existing(
        mock: &Arc<MockClient>,
        part: u64,
        len: usize,
    ) -> (WriteHandle<MockClient>, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        mock.insert("k", data.clone());
        let h = handle(mock, part);
        let etag = mock.object("k").unwrap().etag;
        h.start_from(etag, len as u64).await.unwrap();
        (h, data)
    }

    #[tokio::test]
    async fn one_changed_byte_moves_one_part_and_copies_the_rest() {
        let mock = Arc::new(MockClient::new("b"));
        let (h, mut data) = existing(&mock, 1000, 10_500).await;
        assert!(
            h.commit().await.unwrap().is_none(),
            "opening changes nothing"
        );
        h.write(4321, b"X").await.unwrap();
        h.commit().await.unwrap();
        data[4321] = b'X';
        assert_eq!(&mock.object("k").unwrap().data[..], &data[..]);
        assert_eq!(
            mock.count(Operation::UploadPartCopy),
            2,
            "the unchanged parts before and after, one copy each"
        );
        assert_eq!(mock.count(Operation::UploadPart), 1, "the changed part");
        let (sent, received) = mock.bytes_moved();
        assert_eq!(
            (sent, received),
            (1000, 999),
            "only the changed part crossed the network"
        );
        assert_eq!(mock.open_uploads(), 0);
    }

    #[tokio::test]
    async fn reads_through_the_handle_see_base_and_writes() {
        let mock = Arc::new(MockClient::new("b"));
        let (h, data) = existing(&mock, 1000, 5000).await;
        h.write(1500, b"new").await.unwrap();
        let got = h.read(1490, 20).await.unwrap();
        assert_eq!(&got[..10], &data[1490..1500]);
        assert_eq!(&got[10..13], b"new");
        assert_eq!(&got[13..], &data[1503..1510]);
        assert_eq!(
            h.read(4990, 100).await.unwrap().len(),
            10,
            "ends at the size"
        );
    }

    #[tokio::test]
    async fn truncate_and_extend_an_existing_object() {
        let mock = Arc::new(MockClient::new("b"));
        let (h, data) = existing(&mock, 1000, 5000).await;
        h.truncate(2500).await.unwrap();
        h.truncate(3200).await.unwrap();
        h.write(3200, b"tail").await.unwrap();
        h.commit().await.unwrap();
        let got = mock.object("k").unwrap().data;
        assert_eq!(got.len(), 3204);
        assert_eq!(&got[..2500], &data[..2500]);
        assert!(
            got[2500..3200].iter().all(|b| *b == 0),
            "cut bytes do not come back"
        );
        assert_eq!(&got[3200..], b"tail");
        assert_eq!(
            mock.count(Operation::UploadPartCopy),
            1,
            "parts 1 and 2 in one copy"
        );
    }

    #[tokio::test]
    async fn object_replaced_underneath_fails_with_estale_and_leaves_it_alone() {
        let mock = Arc::new(MockClient::new("b"));
        let (h, _) = existing(&mock, 1000, 5000).await;
        h.write(10, b"mine").await.unwrap();
        mock.insert("k", "someone else's");
        let err = h.commit().await.unwrap_err();
        assert_eq!(err.errno(), libc::ESTALE);
        assert_eq!(&mock.object("k").unwrap().data[..], b"someone else's");
        assert_eq!(mock.open_uploads(), 0);
    }

    #[tokio::test]
    async fn after_a_commit_the_new_object_is_the_base() {
        let mock = Arc::new(MockClient::new("b"));
        let h = handle(&mock, 1000);
        let data: Vec<u8> = (0..4000u32).map(|i| (i % 7) as u8).collect();
        h.write(0, &data).await.unwrap();
        h.commit().await.unwrap();
        let copies = mock.count(Operation::UploadPartCopy);
        h.write(3999, b"Z").await.unwrap();
        h.commit().await.unwrap();
        let got = mock.object("k").unwrap().data;
        assert_eq!(&got[..3999], &data[..3999]);
        assert_eq!(got[3999], b'Z');
        assert_eq!(
            mock.count(Operation::UploadPartCopy) - copies,
            1,
            "the unchanged parts are copied, not sent again"
        );
    }

    #[tokio::test]
    async fn sequential_parts_go_up_from_memory_and_stay_readable() {
        let mock = Arc::new(MockClient::new("b"));
        // 8 KiB parts: aligned, so whole parts go to the spool with O_DIRECT where allowed.
        let h = handle(&mock, 8192);
        let data: Vec<u8> = (0..30_000u32).map(|i| (i % 253) as u8).collect();
        for chunk in data.chunks(1000) {
            let at = chunk.as_ptr() as usize - data.as_ptr() as usize;
            h.write(at as u64, chunk).await.unwrap();
        }
        tokio::task::yield_now().await;
        assert!(
            mock.count(Operation::UploadPart) >= 1,
            "parts went up while writing"
        );
        // Read back through the handle: the spool has every byte, held or sealed.
        assert_eq!(&h.read(8000, 500).await.unwrap()[..], &data[8000..8500]);
        assert_eq!(&h.read(29_000, 5000).await.unwrap()[..], &data[29_000..]);
        // A rewrite of a part already uploaded from memory.
        h.write(100, b"again").await.unwrap();
        h.commit().await.unwrap();
        let mut want = data.clone();
        want[100..105].copy_from_slice(b"again");
        assert_eq!(&mock.object("k").unwrap().data[..], &want[..]);
        assert_eq!(mock.open_uploads(), 0);
    }
}
