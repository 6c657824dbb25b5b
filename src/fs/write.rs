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
//! **Metadata.** Mode, owner and mtime go into the upload itself as `x-amz-meta-*`, in the
//! format s3fs-fuse uses.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::error::{FsError, FsResult};
use super::journal::UploadJournal;
use crate::s3::{ClientError, CompletedPart, ObjectAttributes, ObjectClient, PutBody};

/// S3 allows at most this many parts.
pub const MAX_PARTS: u64 = 10_000;
/// Parts of one size before the size doubles.
const PARTS_PER_SIZE: u64 = 1_000;

#[derive(Debug, Clone)]
pub struct WriteConfig {
    /// Size of the first 1,000 parts.
    pub part_size: u64,
    /// Part uploads in flight per file.
    pub upload_concurrency: usize,
}

impl Default for WriteConfig {
    fn default() -> Self {
        Self {
            part_size: 8 * 1024 * 1024,
            upload_concurrency: 8,
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

type PartTask = JoinHandle<Result<String, ClientError>>;

enum PartState {
    Uploading(PartTask),
    Done(String),
}

struct Upload {
    key: String,
    id: String,
    parts: BTreeMap<u64, PartState>,
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

pub struct WriteState {
    /// Where the object goes; a rename while open changes it.
    pub key: String,
    pub size: u64,
    pub attrs: ObjectAttributes,
    spool: Arc<std::fs::File>,
    coverage: Coverage,
    upload: Option<Upload>,
    dirty: bool,
}

impl WriteState {
    /// Something besides the data changed (metadata, the key): commit again.
    pub fn touch(&mut self) {
        self.dirty = true;
    }
}

pub struct WriteHandle<C> {
    client: Arc<C>,
    config: WriteConfig,
    journal: Option<Arc<UploadJournal>>,
    uploads: Arc<Semaphore>,
    pub state: tokio::sync::Mutex<WriteState>,
}

fn io_error(e: std::io::Error) -> FsError {
    tracing::error!("spool file: {e}");
    FsError::Io(e.to_string())
}

impl<C: ObjectClient> WriteHandle<C> {
    /// A handle for a new (or truncated) object at `key`.
    pub fn new(
        client: Arc<C>,
        config: WriteConfig,
        journal: Option<Arc<UploadJournal>>,
        key: String,
        attrs: ObjectAttributes,
    ) -> FsResult<Self> {
        let spool = tempfile::tempfile().map_err(io_error)?;
        Ok(Self {
            client,
            journal,
            uploads: Arc::new(Semaphore::new(config.upload_concurrency.max(1))),
            config,
            state: tokio::sync::Mutex::new(WriteState {
                key,
                size: 0,
                attrs,
                spool: Arc::new(spool),
                coverage: Coverage::default(),
                upload: None,
                // A new file exists once committed, even when nothing is written to it.
                dirty: true,
            }),
        })
    }

    pub async fn size(&self) -> u64 {
        self.state.lock().await.size
    }

    /// Puts existing content into the spool (opening a file without O_TRUNC): counted as
    /// written, but starts no upload.
    pub async fn load(&self, offset: u64, data: &[u8]) -> FsResult<()> {
        let mut s = self.state.lock().await;
        s.spool.write_all_at(data, offset).map_err(io_error)?;
        let end = offset + data.len() as u64;
        s.size = s.size.max(end);
        let base = self.config.part_size;
        if !data.is_empty() {
            for part in part_index(offset, base)..=part_index(end - 1, base) {
                let range = part_range(part, base);
                s.coverage
                    .add(part, offset.max(range.start)..end.min(range.end));
            }
        }
        Ok(())
    }

    /// Nothing to commit until the next change.
    pub async fn mark_clean(&self) {
        self.state.lock().await.dirty = false;
    }

    /// Reads back from the spool (a file open for reading and writing).
    pub async fn read(&self, offset: u64, len: u64) -> FsResult<bytes::Bytes> {
        let s = self.state.lock().await;
        let end = offset.saturating_add(len).min(s.size);
        if offset >= end {
            return Ok(bytes::Bytes::new());
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        s.spool.read_exact_at(&mut buf, offset).map_err(io_error)?;
        Ok(bytes::Bytes::from(buf))
    }

    /// Writes `data` at `offset`; starts uploads of parts it completes.
    pub async fn write(&self, offset: u64, data: &[u8]) -> FsResult<u32> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= part_range(MAX_PARTS - 1, self.config.part_size).end)
            .ok_or(FsError::FileTooLarge)?;
        let mut s = self.state.lock().await;
        s.spool.write_all_at(data, offset).map_err(io_error)?;
        s.size = s.size.max(end);
        s.dirty = true;
        if data.is_empty() {
            return Ok(0);
        }
        let base = self.config.part_size;
        let first = part_index(offset, base);
        let last = part_index(end - 1, base);
        for part in first..=last {
            let range = part_range(part, base);
            s.coverage
                .add(part, offset.max(range.start)..end.min(range.end));
            // Rewritten after upload: it goes up again.
            if let Some(upload) = s.upload.as_mut() {
                if let Some(PartState::Uploading(task)) = upload.parts.remove(&part) {
                    task.abort();
                }
            }
            if s.coverage.is_full(part, &range) && range.end <= s.size {
                // The data is safe in the spool: if the upload cannot start now, the commit
                // tries again and reports the failure to close/fsync.
                if let Err(e) = self.start_part(&mut s, part).await {
                    tracing::warn!("part {} of {} not uploaded yet: {e}", part + 1, s.key);
                }
            }
        }
        // Back-pressure: do not let finished-but-not-uploaded parts pile up.
        self.wait_for_room(&mut s).await?;
        Ok(data.len() as u32)
    }

    /// Changes the size (truncate or extend with zeros).
    pub async fn truncate(&self, size: u64) -> FsResult<()> {
        let mut s = self.state.lock().await;
        s.spool.set_len(size).map_err(io_error)?;
        s.size = size;
        s.coverage.truncate(size);
        s.dirty = true;
        let base = self.config.part_size;
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

    async fn start_part(&self, s: &mut WriteState, part: u64) -> FsResult<()> {
        if s.upload.is_none() {
            let id = self
                .client
                .create_multipart_upload(&s.key, &s.attrs)
                .await
                .map_err(FsError::from)?;
            if let Some(j) = &self.journal {
                j.record(&s.key, &id);
            }
            s.upload = Some(Upload {
                key: s.key.clone(),
                id,
                parts: BTreeMap::new(),
            });
        }
        let range = part_range(part, self.config.part_size);
        let len = range.end.min(s.size) - range.start;
        let upload = s.upload.as_mut().expect("created above");
        let (client, key, id, sem) = (
            self.client.clone(),
            upload.key.clone(),
            upload.id.clone(),
            self.uploads.clone(),
        );
        let body = PutBody::File {
            file: s.spool.clone(),
            offset: range.start,
            len,
        };
        let task = tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.expect("never closed");
            client.upload_part(&key, &id, part as u32 + 1, body).await
        });
        upload.parts.insert(part, PartState::Uploading(task));
        Ok(())
    }

    async fn wait_for_room(&self, s: &mut WriteState) -> FsResult<()> {
        let limit = 2 * self.config.upload_concurrency.max(1);
        let Some(upload) = s.upload.as_mut() else {
            return Ok(());
        };
        loop {
            let in_flight: Vec<u64> = upload
                .parts
                .iter()
                .filter(|(_, st)| matches!(st, PartState::Uploading(_)))
                .map(|(p, _)| *p)
                .collect();
            if in_flight.len() < limit {
                return Ok(());
            }
            let oldest = in_flight[0];
            settle(upload, oldest).await?;
        }
    }

    /// Uploads whatever is not uploaded yet and completes the object. Returns the new ETag, or
    /// `None` when there was nothing to commit.
    pub async fn commit(&self) -> FsResult<Option<String>> {
        let mut s = self.state.lock().await;
        if !s.dirty {
            return Ok(None);
        }
        let result = self.commit_locked(&mut s).await;
        if result.is_err() {
            if let Some(upload) = s.upload.take() {
                self.abort(upload).await;
            }
        }
        let etag = result?;
        s.dirty = false;
        Ok(Some(etag))
    }

    async fn commit_locked(&self, s: &mut WriteState) -> FsResult<String> {
        let base = self.config.part_size;
        // A rename since the upload began: it cannot move, so start over at the new key.
        if s.upload.as_ref().is_some_and(|u| u.key != s.key) {
            let stale = s.upload.take().expect("checked");
            self.abort(stale).await;
        }
        if s.size <= base && s.upload.as_ref().is_none_or(|u| u.parts.is_empty()) {
            if let Some(unused) = s.upload.take() {
                self.abort(unused).await;
            }
            let body = PutBody::File {
                file: s.spool.clone(),
                offset: 0,
                len: s.size,
            };
            return self
                .client
                .put_object(&s.key, body, &s.attrs)
                .await
                .map_err(FsError::from);
        }
        let last = part_index(s.size.max(1) - 1, base);
        for part in 0..=last {
            let missing = s
                .upload
                .as_ref()
                .is_none_or(|u| !u.parts.contains_key(&part));
            if missing {
                self.start_part(s, part).await?;
            }
        }
        let upload = s.upload.as_mut().expect("started above");
        let mut completed = Vec::with_capacity(last as usize + 1);
        for part in 0..=last {
            completed.push(CompletedPart {
                part_number: part as u32 + 1,
                etag: settle(upload, part).await?,
            });
        }
        let upload = s.upload.take().expect("present");
        match self
            .client
            .complete_multipart_upload(&upload.key, &upload.id, &completed)
            .await
        {
            Ok(etag) => Ok(etag),
            Err(e) => {
                s.upload = Some(upload);
                Err(e.into())
            }
        }
    }

    /// Gives up: aborts any multipart upload (on release of a handle whose commit failed).
    pub async fn discard(&self) {
        let mut s = self.state.lock().await;
        if let Some(upload) = s.upload.take() {
            self.abort(upload).await;
        }
        s.dirty = false;
    }

    /// Aborts `upload`; the journal forgets it only once S3 has, so a later mount can retry.
    async fn abort(&self, upload: Upload) {
        for state in upload.parts.into_values() {
            if let PartState::Uploading(task) = state {
                task.abort();
            }
        }
        match self
            .client
            .abort_multipart_upload(&upload.key, &upload.id)
            .await
        {
            Ok(()) => {
                if let Some(j) = &self.journal {
                    j.remove(&upload.id);
                }
            }
            Err(e) => tracing::warn!(
                "could not abort multipart upload of {} (the next mount retries): {e}",
                upload.key
            ),
        }
    }
}

/// Waits for part `part`'s upload and returns its ETag.
async fn settle(upload: &mut Upload, part: u64) -> FsResult<String> {
    let state = upload
        .parts
        .remove(&part)
        .ok_or(FsError::Invalid("part not started"))?;
    let etag = match state {
        PartState::Done(etag) => etag,
        PartState::Uploading(task) => match task.await {
            Ok(Ok(etag)) => etag,
            Ok(Err(e)) => {
                tracing::error!("uploading part {} failed: {e}", part + 1);
                return Err(e.into());
            }
            Err(_) => return Err(FsError::Invalid("part upload task ended unexpectedly")),
        },
    };
    upload.parts.insert(part, PartState::Done(etag.clone()));
    Ok(etag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::{MockClient, Operation};

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

    fn handle(mock: &Arc<MockClient>, part: u64) -> WriteHandle<MockClient> {
        let cfg = WriteConfig {
            part_size: part,
            upload_concurrency: 2,
        };
        WriteHandle::new(
            mock.clone(),
            cfg,
            None,
            "k".into(),
            ObjectAttributes::default(),
        )
        .unwrap()
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
    async fn failed_part_aborts_and_reports() {
        let mock = Arc::new(MockClient::new("b"));
        let h = handle(&mock, 1000);
        mock.fail_next(
            Operation::UploadPart,
            crate::s3::ErrorKind::InternalError,
            1,
        );
        h.write(0, &[1u8; 3000]).await.unwrap();
        let err = h.commit().await.unwrap_err();
        assert_eq!(err.errno(), libc::EIO);
        assert!(mock.object("k").is_none(), "nothing half-visible");
        assert_eq!(mock.open_uploads(), 0, "no orphaned multipart upload");
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
}
