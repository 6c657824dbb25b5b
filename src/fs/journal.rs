//! The journal of multipart uploads in progress: uploads left behind by a crashed (or cut-off)
//! s3mount, or by a close that failed, are resumed by the next write of the same file, or
//! aborted once their resume window passes; none is ever left unknown.
//!
//! One small text file per upload in a directory of its own per bucket and prefix, written
//! (and fsync'd) *before* CreateMultipartUpload is sent (the owning process id, the key, the
//! time and the part size), given the upload id once S3 answers, then one line per part S3
//! has stored (its number, size, ETag and the SHA-256 of its bytes), each fsync'd as S3
//! answers, and removed as soon as the upload is completed or aborted.
//!
//! **Resuming.** An upload whose owner is gone (the process died) or gave it up (its close
//! failed: the entry says `kept`) is *resumable* for the resume window, counted from the
//! entry's last change. A new upload of the same key, with the same part size, written from
//! its first byte, *adopts* it instead of creating one: the entry is renamed to the adopter
//! (a rename is atomic, so two writers never adopt the same upload), ListParts confirms what
//! S3 still has, and each part whose bytes come out identical to a stored part (same size and
//! SHA-256, or for a part whose answer was never recorded, the MD5 its ETag gives) is not sent
//! again. Nothing is completed that the new writer did not close. Resumable uploads past the
//! window are aborted, by the next mount or by the running one.
//!
//! **Lost creates.** A CreateMultipartUpload whose answer was lost (the request may have made
//! an upload whose id we never learnt) leaves a second kind of entry, a *lost create*: the key
//! and the time span the request was under way. Such uploads are found with
//! ListMultipartUploads, as uploads of exactly that key initiated within that span (with a
//! minute of slack for the server's clock), and aborted, unless the journal knows them as
//! someone's upload. Entries of processes that died while creating are searched for the same
//! way. Only uploads this journal recorded are touched; another client's upload of the same
//! key started in the same minute as a lost create is the one case that could be aborted too
//! (docs/SEMANTICS.md).
//!
//! Format: lines `name value`, the last of a name counting: `pid`, `key`, `started` (ms since
//! the epoch), `part_size`, `base` (the ETag of the object being changed, if any), `attrs` (a
//! digest of the attributes the upload was created with), `upload` and `kept` (ms; 0 when an
//! adopter took it) for an upload entry (file `up-*`), with `part N SIZE ETAG SHA256` lines;
//! `pid`, `key`, `from`, `to` for a lost create (`lost-*`).

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;

use super::local_io;
use crate::s3::{Checksum, ErrorKind, ObjectClient};

/// Slack for the server's clock when matching a lost create's uploads by time.
const CLOCK_SLACK: Duration = Duration::from_secs(60);
/// An entry of a process that died while creating its upload: how long the create may have
/// taken after it started.
const CREATE_SPAN: Duration = Duration::from_secs(600);
/// Clean-ups run at once at mount.
const CLEANUPS_AT_ONCE: usize = 16;

#[derive(Debug)]
pub struct UploadJournal {
    dir: PathBuf,
}

/// The entry of one upload of this process: written before its CreateMultipartUpload (or
/// taken over from an upload it adopted).
#[derive(Debug)]
pub struct JournalEntry {
    path: PathBuf,
    key: String,
    started: SystemTime,
    part_size: u64,
}

/// Where the parts of one upload are recorded as S3 stores them; cheap to clone into the
/// tasks that send them.
#[derive(Debug, Clone)]
pub struct PartLog {
    path: PathBuf,
}

/// A part S3 has stored, as the journal (or ListParts) knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedPart {
    pub size: u64,
    pub etag: String,
    /// The SHA-256 of its bytes, hex, when it was sent with it.
    pub sha256_hex: Option<String>,
    /// Its CRC32C, when it was sent with it (a 32-bit CRC is no identity of its bytes alone:
    /// a resume also wants the MD5 its ETag is, or the SHA-256).
    pub crc32c: Option<u32>,
}

/// An upload an adopter took over: what S3 may still have of it.
#[derive(Debug)]
pub struct Adopted {
    pub upload_id: String,
    /// By part number (1-based).
    pub parts: BTreeMap<u32, RecordedPart>,
    /// The digest of the attributes it was created with.
    pub attrs: Option<String>,
    /// What its parts are sent with (fixed when it was created).
    pub checksum: Checksum,
}

/// A resumable upload, as `s3mount status` and `s3mount uploads` show it.
#[derive(Debug, Clone)]
pub struct ResumableInfo {
    pub key: String,
    pub upload_id: String,
    pub parts: usize,
    pub bytes_stored: u64,
    /// Since the entry last changed (the upload was interrupted).
    pub idle: Duration,
    /// The ETag of the object it was changing, if it was.
    pub base: Option<String>,
}

/// A CreateMultipartUpload whose answer was lost, recorded.
#[derive(Debug)]
pub struct LostCreate {
    path: PathBuf,
    key: String,
    from: SystemTime,
    to: SystemTime,
}

/// What an entry file says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    pid: u32,
    key: String,
    kind: EntryKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum EntryKind {
    Upload(UploadRecord),
    LostCreate { from: SystemTime, to: SystemTime },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct UploadRecord {
    started: SystemTime,
    upload_id: Option<String>,
    part_size: Option<u64>,
    base: Option<String>,
    attrs: Option<String>,
    checksum: Checksum,
    /// Its owner gave it up (a failed close) at this time: resumable by anyone.
    kept: Option<SystemTime>,
    parts: BTreeMap<u32, RecordedPart>,
}

impl UploadRecord {
    fn new(started: SystemTime) -> Self {
        Self {
            started,
            upload_id: None,
            part_size: None,
            base: None,
            attrs: None,
            checksum: Checksum::Sha256,
            kept: None,
            parts: BTreeMap::new(),
        }
    }
}

pub(super) fn millis(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn from_millis(v: &str) -> Option<SystemTime> {
    v.parse::<u64>()
        .ok()
        .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

fn part_line(number: u32, part: &RecordedPart) -> String {
    let crc = part.crc32c.map(|c| format!(" {c:08x}")).unwrap_or_default();
    format!(
        "part {number} {} {} {}{crc}\n",
        part.size,
        part.etag,
        part.sha256_hex.as_deref().unwrap_or("-")
    )
}

impl Entry {
    fn render(&self) -> String {
        let mut text = format!("pid {}\nkey {}\n", self.pid, self.key);
        match &self.kind {
            EntryKind::Upload(u) => {
                text.push_str(&format!("started {}\n", millis(u.started)));
                let optional = [
                    ("part_size", u.part_size.map(|n| n.to_string())),
                    ("base", u.base.clone()),
                    ("attrs", u.attrs.clone()),
                    (
                        "checksum",
                        (u.checksum != Checksum::Sha256).then(|| u.checksum.name().to_string()),
                    ),
                    ("upload", u.upload_id.clone()),
                    ("kept", u.kept.map(|t| millis(t).to_string())),
                ];
                for (name, value) in optional {
                    if let Some(v) = value {
                        text.push_str(&format!("{name} {v}\n"));
                    }
                }
                for (n, p) in &u.parts {
                    text.push_str(&part_line(*n, p));
                }
            }
            EntryKind::LostCreate { from, to } => {
                text.push_str(&format!("from {}\nto {}\n", millis(*from), millis(*to)));
            }
        }
        text
    }

    fn parse(text: &str) -> Option<Self> {
        let mut fields = std::collections::HashMap::new();
        let mut parts = BTreeMap::new();
        for line in text.lines() {
            let (name, value) = line.split_once(' ')?;
            if name == "part" {
                let f: Vec<&str> = value.split(' ').collect();
                // Entries before CRC32C have no fifth field.
                let (number, size, etag, sha, crc) = match f.as_slice() {
                    [n, s, e, h] => (n, s, e, h, None),
                    [n, s, e, h, c] => (n, s, e, h, Some(u32::from_str_radix(c, 16).ok()?)),
                    _ => return None,
                };
                let part = RecordedPart {
                    size: size.parse().ok()?,
                    etag: etag.to_string(),
                    sha256_hex: (*sha != "-").then(|| sha.to_string()),
                    crc32c: crc,
                };
                parts.insert(number.parse().ok()?, part);
            } else {
                fields.insert(name, value);
            }
        }
        let pid = fields.get("pid")?.parse().ok()?;
        let key = fields.get("key")?.to_string();
        let text_of = |name: &str| fields.get(name).map(|s| s.to_string());
        let kind = match (fields.get("from"), fields.get("to")) {
            (Some(from), Some(to)) => EntryKind::LostCreate {
                from: from_millis(from)?,
                to: from_millis(to)?,
            },
            _ => EntryKind::Upload(UploadRecord {
                started: from_millis(fields.get("started")?)?,
                upload_id: text_of("upload"),
                part_size: fields.get("part_size").and_then(|v| v.parse().ok()),
                base: text_of("base"),
                attrs: text_of("attrs"),
                checksum: match fields.get("checksum") {
                    Some(name) => Checksum::from_name(name)?,
                    None => Checksum::Sha256,
                },
                kept: fields
                    .get("kept")
                    .and_then(|v| from_millis(v))
                    .filter(|t| *t != SystemTime::UNIX_EPOCH),
                parts,
            }),
        };
        Some(Self { pid, key, kind })
    }
}

/// Writes `text` to `path` through a temporary file, fsync'd, and a rename, so a crash never
/// leaves half an entry.
fn write_entry(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    local_io(|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_data()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path)
    })
}

/// Makes a rename or creation in `path`'s directory durable.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Adds `text` to the entry at `path` and fsyncs it; an entry already gone (completed or
/// aborted meanwhile) is not made again.
fn append(path: &Path, text: &str) -> std::io::Result<()> {
    local_io(|| {
        let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
        f.write_all(text.as_bytes())?;
        f.sync_data()
    })
}

/// Removes the entry at `path`; one already gone is no error.
fn remove_entry(path: &Path) {
    let _ = local_io(|| std::fs::remove_file(path));
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

impl JournalEntry {
    /// S3 answered CreateMultipartUpload with `upload_id`, for an upload created with the
    /// attributes of digest `attrs`, changing the object of ETag `base` (if any).
    pub fn created(&self, upload_id: &str, base: Option<&str>, attrs: &str, checksum: Checksum) {
        let mut text = format!("attrs {attrs}\nupload {upload_id}\n");
        if checksum != Checksum::Sha256 {
            text.push_str(&format!("checksum {}\n", checksum.name()));
        }
        if let Some(etag) = base {
            text.push_str(&format!("base {etag}\n"));
        }
        if let Err(e) = append(&self.path, &text) {
            tracing::warn!(
                key = self.key,
                "cannot record upload {upload_id} in the journal: {e}"
            );
        }
    }

    /// Where the upload's stored parts are recorded.
    pub fn part_log(&self) -> PartLog {
        PartLog {
            path: self.path.clone(),
        }
    }

    /// The upload is completed or aborted: nothing is left to clean up.
    pub fn remove(self) {
        remove_entry(&self.path);
    }

    /// The owner gives the upload up unfinished (its close failed): it stays resumable for the
    /// resume window, by this process or the next.
    pub fn keep(self) {
        let text = format!("kept {}\n", millis(SystemTime::now()));
        if let Err(e) = append(&self.path, &text) {
            tracing::warn!(
                key = self.key,
                "cannot record a resumable upload in the journal: {e}"
            );
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn started(&self) -> SystemTime {
        self.started
    }

    pub fn part_size(&self) -> u64 {
        self.part_size
    }
}

impl PartLog {
    /// S3 stored part `number` (1-based) as `part`: recorded and fsync'd, so a later writer
    /// can resume from it.
    pub fn stored(&self, number: u32, part: &RecordedPart) {
        if let Err(e) = append(&self.path, &part_line(number, part)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot record part {number} in the upload journal: {e}");
            }
        }
    }
}

impl UploadJournal {
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    fn new_path(&self, kind: &str) -> PathBuf {
        self.dir.join(format!(
            "{kind}-{:016x}{:08x}",
            fastrand::u64(..),
            std::process::id()
        ))
    }

    /// Records that an upload of `key` in parts of `part_size` is about to be created (before
    /// the request is sent).
    pub fn begin(&self, key: &str, part_size: u64) -> JournalEntry {
        let started = SystemTime::now();
        let mut record = UploadRecord::new(started);
        record.part_size = Some(part_size);
        let path = self.record(
            "up",
            key,
            EntryKind::Upload(record),
            "an upload in the journal",
        );
        JournalEntry {
            path,
            key: key.to_string(),
            started,
            part_size,
        }
    }

    /// Writes a new entry of this process for `key` to a file named from `prefix`; a failure
    /// to record `what` is logged (the upload goes on, unjournalled).
    fn record(&self, prefix: &str, key: &str, kind: EntryKind, what: &str) -> PathBuf {
        let path = self.new_path(prefix);
        let entry = Entry {
            pid: std::process::id(),
            key: key.to_string(),
            kind,
        };
        if let Err(e) = write_entry(&path, &entry.render()) {
            tracing::warn!(key, "cannot record {what}: {e}");
        }
        path
    }

    /// Takes over a resumable upload of `key` in parts of `part_size` interrupted less than
    /// `window` ago, the most recent first; `None` if there is none (or another writer took
    /// it first).
    pub fn adopt(
        &self,
        key: &str,
        part_size: u64,
        window: Duration,
    ) -> Option<(JournalEntry, Adopted)> {
        let mut candidates: Vec<(PathBuf, UploadRecord, Duration)> = self
            .resumable()
            .into_iter()
            .filter(|(_, e, r, idle)| {
                e.key == key && r.part_size == Some(part_size) && *idle < window
            })
            .map(|(p, _, r, idle)| (p, r, idle))
            .collect();
        candidates.sort_by_key(|(_, _, idle)| *idle);
        for (path, record, _) in candidates {
            let mine = self.new_path("up");
            // Whoever renames it first owns it.
            if local_io(|| std::fs::rename(&path, &mine)).is_err() {
                continue;
            }
            let text = format!("pid {}\nkept 0\n", std::process::id());
            if let Err(e) = append(&mine, &text) {
                tracing::warn!(key, "cannot take over a resumable upload: {e}");
                let _ = local_io(|| std::fs::rename(&mine, &path));
                continue;
            }
            let entry = JournalEntry {
                path: mine,
                key: key.to_string(),
                started: record.started,
                part_size,
            };
            let adopted = Adopted {
                upload_id: record.upload_id.clone()?,
                parts: record.parts,
                attrs: record.attrs,
                checksum: record.checksum,
            };
            return Some((entry, adopted));
        }
        None
    }

    /// Upload entries nobody is working on (their process is gone, or their close failed),
    /// with an upload id, and how long each has been idle.
    fn resumable(&self) -> Vec<(PathBuf, Entry, UploadRecord, Duration)> {
        let now = SystemTime::now();
        self.entries()
            .into_iter()
            .filter_map(|(path, entry)| {
                let EntryKind::Upload(record) = &entry.kind else {
                    return None;
                };
                record.upload_id.as_ref()?;
                if record.kept.is_none() && process_alive(entry.pid) {
                    return None;
                }
                let changed = local_io(|| std::fs::metadata(&path).and_then(|m| m.modified()))
                    .unwrap_or(record.started);
                let idle = now.duration_since(changed).unwrap_or_default();
                let record = record.clone();
                Some((path, entry, record, idle))
            })
            .collect()
    }

    /// The resumable uploads, for `s3mount status` and `s3mount uploads`.
    pub fn list_resumable(&self) -> Vec<ResumableInfo> {
        let mut list: Vec<ResumableInfo> = self
            .resumable()
            .into_iter()
            .map(|(_, entry, record, idle)| ResumableInfo {
                upload_id: record.upload_id.clone().unwrap_or_default(),
                parts: record.parts.len(),
                bytes_stored: record.parts.values().map(|p| p.size).sum(),
                base: record.base,
                key: entry.key,
                idle,
            })
            .collect();
        list.sort_by(|a, b| a.key.cmp(&b.key));
        list
    }

    /// Aborts the resumable uploads that `chosen` picks (by key and how long they have been
    /// idle); returns how many went. One that cannot be aborted now stays (and is logged).
    pub async fn abort_resumable<C: ObjectClient>(
        &self,
        client: &C,
        chosen: impl Fn(&str, Duration) -> bool,
    ) -> usize {
        let picked: Vec<(PathBuf, Entry)> = self
            .resumable()
            .into_iter()
            .filter(|(_, e, _, idle)| chosen(&e.key, *idle))
            .map(|(p, e, _, _)| (p, e))
            .collect();
        self.clean_all(client, picked).await
    }

    /// A CreateMultipartUpload of `key` sent at `from` got no answer by `to`: S3 may hold an
    /// upload nobody knows. Recorded at once (so a crash does not lose it); search for it with
    /// [`UploadJournal::find_lost`] once no upload of the same handle is in progress, or the
    /// search could take that one for the orphan.
    pub fn lost_create(&self, key: &str, from: SystemTime, to: SystemTime) -> LostCreate {
        let kind = EntryKind::LostCreate { from, to };
        let path = self.record("lost", key, kind, "a lost CreateMultipartUpload");
        LostCreate {
            path,
            key: key.to_string(),
            from,
            to,
        }
    }

    /// Looks for the upload `lost` may have made and aborts it; the entry stays for the next
    /// mount if the search cannot be made now.
    pub async fn find_lost<C: ObjectClient>(&self, client: &C, lost: LostCreate) {
        let known = self.known_uploads();
        if self
            .search(client, &lost.key, lost.from, lost.to, &known)
            .await
        {
            remove_entry(&lost.path);
        }
    }

    /// Every entry, with its file.
    fn entries(&self) -> Vec<(PathBuf, Entry)> {
        local_io(|| {
            let Ok(dir) = std::fs::read_dir(&self.dir) else {
                return Vec::new();
            };
            dir.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_none())
                .filter_map(|p| {
                    let entry = Entry::parse(&std::fs::read_to_string(&p).ok()?)?;
                    Some((p, entry))
                })
                .collect()
        })
    }

    /// Upload ids the journal knows, of any process: never aborted by a search.
    fn known_uploads(&self) -> HashSet<String> {
        self.entries()
            .into_iter()
            .filter_map(|(_, e)| match e.kind {
                EntryKind::Upload(r) => r.upload_id,
                EntryKind::LostCreate { .. } => None,
            })
            .collect()
    }

    /// Aborts the uploads of exactly `key` initiated between `from` and `to` (with slack) that
    /// are not in `known`. False when the listing could not be made (the entry stays).
    async fn search<C: ObjectClient>(
        &self,
        client: &C,
        key: &str,
        from: SystemTime,
        to: SystemTime,
        known: &HashSet<String>,
    ) -> bool {
        let earliest = from
            .checked_sub(CLOCK_SLACK)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let latest = to + CLOCK_SLACK;
        let mut marker: Option<(String, String)> = None;
        loop {
            let page = match client
                .list_multipart_uploads(key, marker.as_ref().map(|(k, u)| (k.as_str(), u.as_str())))
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(
                        key,
                        "cannot look for an upload whose creation went unanswered yet: {e}"
                    );
                    return false;
                }
            };
            for upload in page.uploads {
                let in_span = upload
                    .initiated
                    .is_some_and(|t| t >= earliest && t <= latest);
                if upload.key != key || !in_span || known.contains(&upload.upload_id) {
                    continue;
                }
                match client.abort_multipart_upload(key, &upload.upload_id).await {
                    Ok(()) => tracing::warn!(
                        key,
                        "aborted an upload whose CreateMultipartUpload answer was lost"
                    ),
                    Err(e) if e.kind == ErrorKind::NoSuchUpload => {}
                    Err(e) => {
                        tracing::warn!(
                            key,
                            "cannot abort an upload left by a lost answer yet: {e}"
                        );
                        return false;
                    }
                }
            }
            match page.next_marker {
                Some(m) => marker = Some(m),
                None => return true,
            }
        }
    }

    /// Cleans up after one entry of a process that is gone; true when nothing is left to do.
    async fn clean<C: ObjectClient>(
        &self,
        client: &C,
        entry: &Entry,
        known: &HashSet<String>,
    ) -> bool {
        match &entry.kind {
            EntryKind::Upload(UploadRecord {
                upload_id: Some(id),
                ..
            }) => match client.abort_multipart_upload(&entry.key, id).await {
                Ok(()) => {
                    tracing::warn!(
                        key = entry.key,
                        "aborted an interrupted upload (not resumed within its window, or asked to)"
                    );
                    true
                }
                Err(e) if e.kind == ErrorKind::NoSuchUpload => true,
                Err(e) => {
                    tracing::warn!(
                        key = entry.key,
                        "cannot abort an unfinished earlier upload yet: {e}"
                    );
                    false
                }
            },
            // It died while creating: the upload may exist, unknown.
            EntryKind::Upload(UploadRecord {
                started,
                upload_id: None,
                ..
            }) => {
                self.search(client, &entry.key, *started, *started + CREATE_SPAN, known)
                    .await
            }
            EntryKind::LostCreate { from, to } => {
                self.search(client, &entry.key, *from, *to, known).await
            }
        }
    }

    /// At mount, and from time to time after: aborts the resumable uploads idle for `window`
    /// or longer, and cleans up after entries of processes that are gone and never learnt
    /// their upload's id (they died while creating it) or lost a create's answer. Returns how
    /// many entries went (the rest stay for the next round).
    pub async fn recover<C: ObjectClient>(&self, client: &C, window: Duration) -> usize {
        let expired = self.abort_resumable(client, |_, idle| idle >= window).await;
        let stale: Vec<(PathBuf, Entry)> = self
            .entries()
            .into_iter()
            .filter(|(_, e)| {
                let unknown_upload = match &e.kind {
                    EntryKind::Upload(r) => r.upload_id.is_none(),
                    EntryKind::LostCreate { .. } => true,
                };
                unknown_upload && !process_alive(e.pid)
            })
            .collect();
        expired + self.clean_all(client, stale).await
    }

    /// Cleans up after `entries`, [`CLEANUPS_AT_ONCE`] at a time; returns how many were.
    async fn clean_all<C: ObjectClient>(
        &self,
        client: &C,
        entries: Vec<(PathBuf, Entry)>,
    ) -> usize {
        // Uploads the journal knows, a dead process's (aborted by their own entries) or a live
        // one's (not to be touched): neither is fair game for a search.
        let known = self.known_uploads();
        let known = &known;
        futures_util::stream::iter(entries)
            .map(|(path, entry)| async move {
                let done = self.clean(client, &entry, known).await;
                if done {
                    remove_entry(&path);
                }
                done
            })
            .buffer_unordered(CLEANUPS_AT_ONCE)
            .filter(|done| std::future::ready(*done))
            .count()
            .await
    }

    /// How many entries the journal holds (for tests and status).
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::{MockClient, ObjectAttributes};

    /// Rewrites every entry as if process 4,000,000,000 (never alive) had written it.
    fn as_dead_process(j: &UploadJournal) {
        for (path, mut entry) in j.entries() {
            entry.pid = 4_000_000_000;
            write_entry(&path, &entry.render()).unwrap();
        }
    }

    #[test]
    fn entries_render_and_parse_back() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_733_000_000_123);
        let mut full = UploadRecord::new(t);
        full.upload_id = Some("abc-DEF_1".into());
        full.part_size = Some(8 << 20);
        full.base = Some("\"e-2\"".into());
        full.attrs = Some("0123abcd".into());
        full.checksum = Checksum::Crc32c;
        full.kept = Some(t);
        full.parts.insert(
            1,
            RecordedPart {
                size: 8 << 20,
                etag: "\"aa\"".into(),
                sha256_hex: Some("ff".repeat(32)),
                crc32c: None,
            },
        );
        full.parts.insert(
            3,
            RecordedPart {
                size: 5,
                etag: "\"bb\"".into(),
                sha256_hex: None,
                crc32c: None,
            },
        );
        full.parts.insert(
            4,
            RecordedPart {
                size: 6,
                etag: "\"cc\"".into(),
                sha256_hex: None,
                crc32c: Some(0x0012_abcd),
            },
        );
        for kind in [
            EntryKind::Upload(UploadRecord::new(t)),
            EntryKind::Upload(full),
            EntryKind::LostCreate { from: t, to: t },
        ] {
            let e = Entry {
                pid: 42,
                key: "a dir/ключ".into(),
                kind,
            };
            assert_eq!(Entry::parse(&e.render()), Some(e));
        }
        assert_eq!(Entry::parse("garbage"), None);
    }

    #[test]
    fn appended_lines_override_and_add_parts() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(5_000);
        let text = "pid 1\nkey k\nstarted 5000\nupload u\npart 1 10 \"a\" -\nkept 7000\npid 2\nkept 0\npart 1 10 \"b\" 00\n";
        let e = Entry::parse(text).unwrap();
        assert_eq!(e.pid, 2);
        let EntryKind::Upload(r) = e.kind else {
            panic!("an upload entry")
        };
        assert_eq!(r.started, t);
        assert_eq!(r.kept, None, "kept 0: an adopter took it");
        assert_eq!(r.parts.len(), 1);
        assert_eq!(
            r.parts[&1].etag, "\"b\"",
            "the last record of a part counts"
        );
    }

    /// A journal in a new temporary directory (removed when the first value is dropped).
    fn journal() -> (tempfile::TempDir, UploadJournal) {
        let dir = tempfile::tempdir().unwrap();
        let j = UploadJournal::open(dir.path().join("j")).unwrap();
        (dir, j)
    }

    const DAY: Duration = Duration::from_secs(86_400);

    fn stored(size: u64, tag: &str) -> RecordedPart {
        RecordedPart {
            size,
            etag: format!("\"{tag}\""),
            sha256_hex: Some(tag.repeat(64 / tag.len())),
            crc32c: None,
        }
    }

    #[tokio::test]
    async fn uploads_of_dead_processes_stay_resumable_for_their_window_then_go() {
        let (_dir, j) = journal();
        let mock = MockClient::new("b");
        let entry = j.begin("k", 100);
        let id = mock
            .create_multipart_upload("k", &ObjectAttributes::default(), Checksum::Sha256)
            .await
            .unwrap();
        entry.created(&id, None, "d", Checksum::Sha256);
        entry.part_log().stored(1, &stored(100, "a"));
        assert_eq!(j.recover(&mock, DAY).await, 0, "this process is alive");
        assert!(j.list_resumable().is_empty(), "its own, in use");
        as_dead_process(&j);
        assert_eq!(j.recover(&mock, DAY).await, 0, "resumable for a day");
        let listed = j.list_resumable();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].parts, listed[0].bytes_stored), (1, 100));
        assert_eq!(mock.open_uploads(), 1);
        assert_eq!(j.recover(&mock, Duration::ZERO).await, 1, "past its window");
        assert_eq!(mock.open_uploads(), 0);
        assert!(j.is_empty());
    }

    #[tokio::test]
    async fn an_upload_is_adopted_once_with_its_parts_and_only_when_it_fits() {
        let (_dir, j) = journal();
        let entry = j.begin("k", 100);
        entry.created("id-1", Some("\"base\""), "d", Checksum::Crc32c);
        let log = entry.part_log();
        log.stored(1, &stored(100, "a"));
        log.stored(2, &stored(100, "b"));
        log.stored(2, &stored(100, "c"));
        assert!(j.adopt("k", 100, DAY).is_none(), "its owner is at work");
        entry.keep();
        assert!(j.adopt("k", 50, DAY).is_none(), "another part size");
        assert!(j.adopt("other", 100, DAY).is_none(), "another key");
        assert!(
            j.adopt("k", 100, Duration::ZERO).is_none(),
            "past the window"
        );
        let (mine, adopted) = j.adopt("k", 100, DAY).expect("resumable");
        assert_eq!(adopted.upload_id, "id-1");
        assert_eq!(adopted.attrs.as_deref(), Some("d"));
        assert_eq!(
            adopted.checksum,
            Checksum::Crc32c,
            "its parts go as it was made"
        );
        assert_eq!(
            adopted.parts.into_iter().collect::<Vec<_>>(),
            vec![(1, stored(100, "a")), (2, stored(100, "c"))]
        );
        assert!(j.adopt("k", 100, DAY).is_none(), "taken");
        assert_eq!(j.len(), 1);
        mine.remove();
        assert!(j.is_empty());
    }

    #[tokio::test]
    async fn a_completed_upload_leaves_no_entry() {
        let (_dir, j) = journal();
        let entry = j.begin("k", 100);
        entry.created("id-1", None, "d", Checksum::Sha256);
        assert_eq!(j.len(), 1);
        entry.remove();
        assert!(j.is_empty());
    }

    #[tokio::test]
    async fn lost_creates_are_found_by_key_and_time_and_others_are_kept() {
        let (_dir, j) = journal();
        let mock = MockClient::new("b");
        let attrs = ObjectAttributes::default();
        // Ours, answered and recorded: kept.
        let entry = j.begin("k", 100);
        let ours = mock
            .create_multipart_upload("k", &attrs, Checksum::Sha256)
            .await
            .unwrap();
        entry.created(&ours, None, "d", Checksum::Sha256);
        // Another key's upload: kept.
        mock.create_multipart_upload("k2", &attrs, Checksum::Sha256)
            .await
            .unwrap();
        // The orphan of a create whose answer was lost.
        let from = SystemTime::now();
        mock.create_multipart_upload("k", &attrs, Checksum::Sha256)
            .await
            .unwrap();
        let lost = j.lost_create("k", from, SystemTime::now());
        assert_eq!(j.len(), 2);
        j.find_lost(&mock, lost).await;
        assert_eq!(mock.open_uploads(), 2, "only the orphan went");
        let left: Vec<String> = mock.upload_keys();
        assert!(left.contains(&"k".to_string()) && left.contains(&"k2".to_string()));
        assert_eq!(j.len(), 1, "the lost create's entry is gone once searched");
    }

    #[tokio::test]
    async fn a_process_that_died_while_creating_leaves_no_upload() {
        let (_dir, j) = journal();
        let mock = MockClient::new("b");
        let _entry = j.begin("k", 100);
        mock.create_multipart_upload("k", &ObjectAttributes::default(), Checksum::Sha256)
            .await
            .unwrap();
        as_dead_process(&j);
        assert_eq!(j.recover(&mock, DAY).await, 1);
        assert_eq!(mock.open_uploads(), 0);
        assert!(j.is_empty());
    }
}
