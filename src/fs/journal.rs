//! The journal of multipart uploads in progress, so that uploads left behind by a crashed (or
//! cut-off) s3mount are found and aborted at the next mount.
//!
//! One small file per upload in a directory of its own per bucket and prefix: the owning
//! process id, the key and the upload id. It is written when an upload starts and removed when
//! the upload is completed or aborted. At mount, entries whose process is gone are aborted.
//! They cannot be resumed: the data lived in the upload's spool, an unlinked temporary file
//! that ends with the process. Only uploads this journal recorded are touched, never another
//! client's.

use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::s3::{ErrorKind, ObjectClient};

#[derive(Debug)]
pub struct UploadJournal {
    dir: PathBuf,
}

/// An upload recorded by a process that no longer runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleUpload {
    pub key: String,
    pub upload_id: String,
    file: PathBuf,
}

impl UploadJournal {
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    fn entry(&self, upload_id: &str) -> PathBuf {
        self.dir
            .join(hex::encode(&Sha256::digest(upload_id.as_bytes())[..16]))
    }

    pub fn record(&self, key: &str, upload_id: &str) {
        let text = format!("{}\n{key}\n{upload_id}\n", std::process::id());
        if let Err(e) = std::fs::write(self.entry(upload_id), text) {
            tracing::warn!("cannot record upload {upload_id} of {key} in the journal: {e}");
        }
    }

    pub fn remove(&self, upload_id: &str) {
        let _ = std::fs::remove_file(self.entry(upload_id));
    }

    /// Entries of processes that are gone.
    pub fn stale(&self) -> Vec<StaleUpload> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok())
            .filter_map(|e| {
                let text = std::fs::read_to_string(e.path()).ok()?;
                let mut lines = text.lines();
                let pid: u32 = lines.next()?.parse().ok()?;
                let key = lines.next()?.to_string();
                let upload_id = lines.next()?.to_string();
                let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
                (!alive).then_some(StaleUpload {
                    key,
                    upload_id,
                    file: e.path(),
                })
            })
            .collect()
    }

    /// Aborts every stale upload; returns how many were cleaned up.
    pub async fn recover<C: ObjectClient>(&self, client: &C) -> usize {
        let mut cleaned = 0;
        for s in self.stale() {
            match client.abort_multipart_upload(&s.key, &s.upload_id).await {
                Ok(()) => {
                    tracing::warn!(
                        key = s.key,
                        "aborted an upload left unfinished by an earlier s3mount"
                    );
                    cleaned += 1;
                }
                Err(e) if e.kind == ErrorKind::NoSuchUpload => {}
                Err(e) => {
                    tracing::warn!(
                        key = s.key,
                        "cannot abort an unfinished earlier upload yet: {e}"
                    );
                    continue;
                }
            }
            let _ = std::fs::remove_file(&s.file);
        }
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::{MockClient, ObjectAttributes};

    #[tokio::test]
    async fn stale_entries_of_dead_processes_are_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let j = UploadJournal::open(dir.path().join("j")).unwrap();
        let mock = MockClient::new("b");
        let id = mock
            .create_multipart_upload("k", &ObjectAttributes::default())
            .await
            .unwrap();
        j.record("k", &id);
        assert!(j.stale().is_empty(), "this process is alive");
        // Pretend a dead process wrote it.
        let entry = j.entry(&id);
        std::fs::write(&entry, format!("4000000000\nk\n{id}\n")).unwrap();
        assert_eq!(j.stale().len(), 1);
        assert_eq!(j.recover(&mock).await, 1);
        assert_eq!(mock.open_uploads(), 0);
        assert!(j.stale().is_empty());
    }
}
