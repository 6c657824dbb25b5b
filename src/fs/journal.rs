//! The journal of multipart uploads in progress, so that uploads left behind by a crashed (or
//! cut-off) s3mount are found and aborted, and none is ever left unknown.
//!
//! One small text file per upload in a directory of its own per bucket and prefix, written
//! *before* CreateMultipartUpload is sent (the owning process id, the key and the time), given
//! the upload id once S3 answers, and removed as soon as the upload is completed or aborted.
//! A CreateMultipartUpload whose answer was lost (the request may have made an upload whose id
//! we never learnt) leaves a second kind of entry, a *lost create*: the key and the time span
//! the request was under way. Such uploads are found with ListMultipartUploads, as uploads of
//! exactly that key initiated within that span (with a minute of slack for the server's
//! clock), and aborted, unless the journal knows them as someone's upload in progress.
//!
//! At mount, the entries of processes that are gone are dealt with in the background, many at
//! a time: known uploads are aborted, lost creates (and entries of processes that died while
//! creating) are searched for. They cannot be resumed: the data lived in the upload's spool,
//! an unlinked temporary file that ends with the process. Only uploads this journal recorded
//! are touched; another client's upload of the same key started in the same minute as a lost
//! create is the one case that could be aborted too (docs/SEMANTICS.md).
//!
//! Format: lines `name value`: `pid`, `key`, `started` (ms since the epoch) and `upload` for
//! an upload entry (file `up-*`); `pid`, `key`, `from`, `to` for a lost create (`lost-*`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;

use super::local_io;
use crate::s3::{ErrorKind, ObjectClient};

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

/// The entry of one upload of this process: written before its CreateMultipartUpload.
#[derive(Debug)]
pub struct JournalEntry {
    path: PathBuf,
    key: String,
    started: SystemTime,
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
    Upload {
        started: SystemTime,
        upload_id: Option<String>,
    },
    LostCreate {
        from: SystemTime,
        to: SystemTime,
    },
}

fn millis(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn from_millis(v: &str) -> Option<SystemTime> {
    v.parse::<u64>()
        .ok()
        .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

impl Entry {
    fn render(&self) -> String {
        let mut text = format!("pid {}\nkey {}\n", self.pid, self.key);
        match &self.kind {
            EntryKind::Upload { started, upload_id } => {
                text.push_str(&format!("started {}\n", millis(*started)));
                if let Some(id) = upload_id {
                    text.push_str(&format!("upload {id}\n"));
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
        for line in text.lines() {
            let (name, value) = line.split_once(' ')?;
            fields.insert(name, value);
        }
        let pid = fields.get("pid")?.parse().ok()?;
        let key = fields.get("key")?.to_string();
        let kind = match (fields.get("from"), fields.get("to")) {
            (Some(from), Some(to)) => EntryKind::LostCreate {
                from: from_millis(from)?,
                to: from_millis(to)?,
            },
            _ => EntryKind::Upload {
                started: from_millis(fields.get("started")?)?,
                upload_id: fields.get("upload").map(|s| s.to_string()),
            },
        };
        Some(Self { pid, key, kind })
    }
}

/// Writes `text` to `path` through a temporary file and a rename, so a crash never leaves half
/// an entry.
fn write_entry(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    local_io(|| {
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
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
    /// S3 answered CreateMultipartUpload with `upload_id`.
    pub fn created(&self, upload_id: &str) {
        let entry = Entry {
            pid: std::process::id(),
            key: self.key.clone(),
            kind: EntryKind::Upload {
                started: self.started,
                upload_id: Some(upload_id.to_string()),
            },
        };
        if let Err(e) = write_entry(&self.path, &entry.render()) {
            tracing::warn!(
                key = self.key,
                "cannot record upload {upload_id} in the journal: {e}"
            );
        }
    }

    /// The upload is completed or aborted: nothing is left to clean up.
    pub fn remove(self) {
        remove_entry(&self.path);
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

    /// Records that an upload of `key` is about to be created (before the request is sent).
    pub fn begin(&self, key: &str) -> JournalEntry {
        let started = SystemTime::now();
        let kind = EntryKind::Upload {
            started,
            upload_id: None,
        };
        let path = self.record("up", key, kind, "an upload in the journal");
        JournalEntry {
            path,
            key: key.to_string(),
            started,
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
                EntryKind::Upload { upload_id, .. } => upload_id,
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
            EntryKind::Upload {
                upload_id: Some(id),
                ..
            } => match client.abort_multipart_upload(&entry.key, id).await {
                Ok(()) => {
                    tracing::warn!(
                        key = entry.key,
                        "aborted an upload left unfinished by an earlier s3mount"
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
            EntryKind::Upload {
                started,
                upload_id: None,
            } => {
                self.search(client, &entry.key, *started, *started + CREATE_SPAN, known)
                    .await
            }
            EntryKind::LostCreate { from, to } => {
                self.search(client, &entry.key, *from, *to, known).await
            }
        }
    }

    /// Deals with every entry whose process is gone, [`CLEANUPS_AT_ONCE`] at a time; returns
    /// how many were cleaned up (the rest stay for the next mount).
    pub async fn recover<C: ObjectClient>(&self, client: &C) -> usize {
        let entries = self.entries();
        let known: HashSet<String> = entries
            .iter()
            .filter_map(|(_, e)| match &e.kind {
                // A dead process's known uploads are aborted by their own entries, and a
                // live one's must not be touched: neither is fair game for a search.
                EntryKind::Upload { upload_id, .. } => upload_id.clone(),
                EntryKind::LostCreate { .. } => None,
            })
            .collect();
        let stale: Vec<(PathBuf, Entry)> = entries
            .into_iter()
            .filter(|(_, e)| !process_alive(e.pid))
            .collect();
        let known = &known;
        futures_util::stream::iter(stale)
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
        for kind in [
            EntryKind::Upload {
                started: t,
                upload_id: None,
            },
            EntryKind::Upload {
                started: t,
                upload_id: Some("abc-DEF_1".into()),
            },
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

    /// A journal in a new temporary directory (removed when the first value is dropped).
    fn journal() -> (tempfile::TempDir, UploadJournal) {
        let dir = tempfile::tempdir().unwrap();
        let j = UploadJournal::open(dir.path().join("j")).unwrap();
        (dir, j)
    }

    #[tokio::test]
    async fn uploads_of_dead_processes_are_aborted_and_entries_removed() {
        let (_dir, j) = journal();
        let mock = MockClient::new("b");
        let entry = j.begin("k");
        let id = mock
            .create_multipart_upload("k", &ObjectAttributes::default())
            .await
            .unwrap();
        entry.created(&id);
        assert_eq!(j.recover(&mock).await, 0, "this process is alive");
        as_dead_process(&j);
        assert_eq!(j.recover(&mock).await, 1);
        assert_eq!(mock.open_uploads(), 0);
        assert!(j.is_empty());
    }

    #[tokio::test]
    async fn a_completed_upload_leaves_no_entry() {
        let (_dir, j) = journal();
        let entry = j.begin("k");
        entry.created("id-1");
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
        let entry = j.begin("k");
        let ours = mock.create_multipart_upload("k", &attrs).await.unwrap();
        entry.created(&ours);
        // Another key's upload: kept.
        mock.create_multipart_upload("k2", &attrs).await.unwrap();
        // The orphan of a create whose answer was lost.
        let from = SystemTime::now();
        mock.create_multipart_upload("k", &attrs).await.unwrap();
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
        let _entry = j.begin("k");
        mock.create_multipart_upload("k", &ObjectAttributes::default())
            .await
            .unwrap();
        as_dead_process(&j);
        assert_eq!(j.recover(&mock).await, 1);
        assert_eq!(mock.open_uploads(), 0);
        assert!(j.is_empty());
    }
}
