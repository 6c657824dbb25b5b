//! What the mount is doing right now: uploads and reads in flight, for `s3mount status`, the
//! metrics endpoint and the stats lines.
//!
//! The registry ([`Activity`]) learns almost everything from [`Observed`], an [`ObjectClient`]
//! that wraps the real one and sees every request the filesystem core makes: a multipart
//! upload begun, each part sent and stored, the upload completed or aborted, a PutObject, every
//! GET and the bytes of its body. So the core needs no hooks of its own, and the registry
//! cannot drift from what was really sent. The one thing S3 requests do not show, the bytes
//! an application has written into a file not uploaded yet, comes from the FUSE adapter
//! ([`Activity::written`]).
//!
//! Uploads are keyed by S3 key: an entry appears at the first write or request for a key and
//! goes when its object is completed (CompleteMultipartUpload or PutObject answered, either
//! way) or its upload aborted. Reads are keyed by key too and last while a GET of the key is
//! in flight, plus a few seconds so a sequential reader between two GETs stays listed.
//!
//! Retries are counted per entry through [`crate::s3::retry::counting_retries`]: the client
//! counts each retry of a request into the counter of the task that made it.
//!
//! Rates are over the last five seconds, from per-second buckets.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::s3::retry::counting_retries;
use crate::s3::{
    Checksum, CompletedPart, Condition, CopySource, DeleteObjectsOutput, GetObjectOutput, ListPage,
    ListPartsPage, ListRequest, ListUploadsPage, MetadataDirective, ObjectAttributes, ObjectBody,
    ObjectClient, ObjectHead, PutBody, StoredPart,
};

/// How long a read stays listed after its last GET ended.
const READ_LINGER: Duration = Duration::from_secs(3);
/// Seconds a rate is measured over.
const RATE_WINDOW: u64 = 5;
const BUCKETS: usize = 8;

/// Bytes per second over the last [`RATE_WINDOW`] seconds.
#[derive(Debug, Clone)]
struct Rate {
    start: Instant,
    /// (second since `start`, bytes counted in it)
    buckets: [(u64, u64); BUCKETS],
}

impl Rate {
    fn new(now: Instant) -> Self {
        Self {
            start: now,
            buckets: [(u64::MAX, 0); BUCKETS],
        }
    }

    fn add(&mut self, now: Instant, bytes: u64) {
        let sec = now.saturating_duration_since(self.start).as_secs();
        let slot = &mut self.buckets[(sec % BUCKETS as u64) as usize];
        if slot.0 != sec {
            *slot = (sec, 0);
        }
        slot.1 += bytes;
    }

    fn per_second(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.start);
        let sec = elapsed.as_secs();
        let oldest = sec.saturating_sub(RATE_WINDOW - 1);
        let bytes: u64 = self
            .buckets
            .iter()
            .filter(|(s, _)| *s != u64::MAX && *s >= oldest && *s <= sec)
            .map(|(_, b)| b)
            .sum();
        // The window: the full seconds before this one, and the part of this one gone by.
        let span = (elapsed.as_secs_f64() - oldest as f64).max(0.001);
        bytes as f64 / span
    }
}

#[derive(Debug)]
struct UploadEntry {
    started: Instant,
    written: u64,
    stored: u64,
    parts_done: u32,
    parts_in_flight: u32,
    retries: Arc<AtomicU64>,
    store_rate: Rate,
    write_rate: Rate,
}

impl UploadEntry {
    fn new(now: Instant) -> Self {
        Self {
            started: now,
            written: 0,
            stored: 0,
            parts_done: 0,
            parts_in_flight: 0,
            retries: Arc::new(AtomicU64::new(0)),
            store_rate: Rate::new(now),
            write_rate: Rate::new(now),
        }
    }
}

#[derive(Debug)]
struct ReadEntry {
    started: Instant,
    bytes: u64,
    gets_in_flight: u32,
    idle_since: Option<Instant>,
    retries: Arc<AtomicU64>,
    rate: Rate,
}

#[derive(Debug, Default)]
struct Registry {
    uploads: HashMap<String, UploadEntry>,
    reads: HashMap<String, ReadEntry>,
}

/// An upload in flight, as `s3mount status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadView {
    pub key: String,
    /// Bytes the application wrote into the file since its last commit.
    pub written: u64,
    /// Bytes of this upload S3 has stored (parts answered, copies included).
    pub stored: u64,
    pub parts_done: u32,
    pub parts_in_flight: u32,
    pub retries: u64,
    pub age: Duration,
    /// Bytes stored per second, over the last few seconds.
    pub store_rate: f64,
    /// Bytes written per second, over the last few seconds.
    pub write_rate: f64,
}

/// A read in flight: GETs of one key.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadView {
    pub key: String,
    pub bytes: u64,
    pub gets_in_flight: u32,
    pub retries: u64,
    pub age: Duration,
    pub rate: f64,
}

/// Counts since the mount began.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActivityTotals {
    pub uploads_completed: u64,
    pub uploads_failed: u64,
    /// Bytes stored by part uploads, copies and PutObjects that S3 answered.
    pub bytes_stored: u64,
    /// Bytes applications wrote through the mount.
    pub bytes_written: u64,
}

/// The registry of what is in flight. Cheap to call from any thread: one short mutex.
#[derive(Debug, Default)]
pub struct Activity {
    registry: Mutex<Registry>,
    uploads_completed: AtomicU64,
    uploads_failed: AtomicU64,
    bytes_stored: AtomicU64,
    bytes_written: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn with<T>(&self, f: impl FnOnce(&mut Registry) -> T) -> T {
        let mut g = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// The application wrote `bytes` into the file stored at `key`.
    pub fn written(&self, key: &str, bytes: u64) {
        let now = Instant::now();
        self.bytes_written.fetch_add(bytes, Ordering::Relaxed);
        self.with(|r| {
            let e = upload_entry(r, key, now);
            e.written += bytes;
            e.write_rate.add(now, bytes);
        });
    }

    /// A part (or a whole PutObject) of `key` is on its way; returns where its retries count.
    fn part_sent(&self, key: &str) -> Arc<AtomicU64> {
        let now = Instant::now();
        self.with(|r| {
            let e = upload_entry(r, key, now);
            e.parts_in_flight += 1;
            e.retries.clone()
        })
    }

    /// The part of `key` sent with [`Activity::part_sent`] was answered: `stored` bytes on
    /// success, `None` on failure.
    fn part_answered(&self, key: &str, stored: Option<u64>) {
        let now = Instant::now();
        if let Some(bytes) = stored {
            self.bytes_stored.fetch_add(bytes, Ordering::Relaxed);
        }
        self.with(|r| {
            if let Some(e) = r.uploads.get_mut(key) {
                e.parts_in_flight = e.parts_in_flight.saturating_sub(1);
                if let Some(bytes) = stored {
                    e.parts_done += 1;
                    e.stored += bytes;
                    e.store_rate.add(now, bytes);
                }
            }
        });
    }

    /// A multipart upload of `key` begins (or goes on); returns where its retries count.
    fn upload_begun(&self, key: &str) -> Arc<AtomicU64> {
        let now = Instant::now();
        self.with(|r| upload_entry(r, key, now).retries.clone())
    }

    /// The upload of `key` is over: its object completed (`Some(true)`), failed
    /// (`Some(false)`) or was given up (`None`: aborted).
    fn upload_over(&self, key: &str, outcome: Option<bool>) {
        let existed = self.with(|r| r.uploads.remove(key).is_some());
        match outcome {
            Some(true) => self.uploads_completed.fetch_add(1, Ordering::Relaxed),
            Some(false) if existed => self.uploads_failed.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    /// Where the retries of an upload's completion count (no entry is made).
    fn upload_retries(&self, key: &str) -> Arc<AtomicU64> {
        self.with(|r| {
            r.uploads
                .get(key)
                .map(|e| e.retries.clone())
                .unwrap_or_default()
        })
    }

    /// A GET of `key` starts; returns where its retries count.
    fn get_started(&self, key: &str) -> Arc<AtomicU64> {
        let now = Instant::now();
        self.with(|r| {
            prune_reads(r, now);
            let e = r.reads.entry(key.to_string()).or_insert_with(|| ReadEntry {
                started: now,
                bytes: 0,
                gets_in_flight: 0,
                idle_since: None,
                retries: Arc::new(AtomicU64::new(0)),
                rate: Rate::new(now),
            });
            e.gets_in_flight += 1;
            e.idle_since = None;
            e.retries.clone()
        })
    }

    fn get_bytes(&self, key: &str, bytes: u64) {
        let now = Instant::now();
        self.with(|r| {
            if let Some(e) = r.reads.get_mut(key) {
                e.bytes += bytes;
                e.rate.add(now, bytes);
            }
        });
    }

    fn get_ended(&self, key: &str) {
        let now = Instant::now();
        self.with(|r| {
            if let Some(e) = r.reads.get_mut(key) {
                e.gets_in_flight = e.gets_in_flight.saturating_sub(1);
                if e.gets_in_flight == 0 {
                    e.idle_since = Some(now);
                }
            }
        });
    }

    /// Uploads in flight, oldest first.
    pub fn uploads(&self) -> Vec<UploadView> {
        let now = Instant::now();
        let mut v: Vec<UploadView> = self.with(|r| {
            r.uploads
                .iter()
                .map(|(key, e)| UploadView {
                    key: key.clone(),
                    written: e.written,
                    stored: e.stored,
                    parts_done: e.parts_done,
                    parts_in_flight: e.parts_in_flight,
                    retries: e.retries.load(Ordering::Relaxed),
                    age: now.saturating_duration_since(e.started),
                    store_rate: e.store_rate.per_second(now),
                    write_rate: e.write_rate.per_second(now),
                })
                .collect()
        });
        v.sort_by(|a, b| b.age.cmp(&a.age).then_with(|| a.key.cmp(&b.key)));
        v
    }

    /// Reads in flight (or that ended in the last few seconds), oldest first.
    pub fn reads(&self) -> Vec<ReadView> {
        let now = Instant::now();
        let mut v: Vec<ReadView> = self.with(|r| {
            prune_reads(r, now);
            r.reads
                .iter()
                .map(|(key, e)| ReadView {
                    key: key.clone(),
                    bytes: e.bytes,
                    gets_in_flight: e.gets_in_flight,
                    retries: e.retries.load(Ordering::Relaxed),
                    age: now.saturating_duration_since(e.started),
                    rate: e.rate.per_second(now),
                })
                .collect()
        });
        v.sort_by(|a, b| b.age.cmp(&a.age).then_with(|| a.key.cmp(&b.key)));
        v
    }

    pub fn totals(&self) -> ActivityTotals {
        ActivityTotals {
            uploads_completed: self.uploads_completed.load(Ordering::Relaxed),
            uploads_failed: self.uploads_failed.load(Ordering::Relaxed),
            bytes_stored: self.bytes_stored.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
        }
    }
}

fn upload_entry<'a>(r: &'a mut Registry, key: &str, now: Instant) -> &'a mut UploadEntry {
    r.uploads
        .entry(key.to_string())
        .or_insert_with(|| UploadEntry::new(now))
}

fn prune_reads(r: &mut Registry, now: Instant) {
    r.reads.retain(|_, e| {
        e.idle_since
            .is_none_or(|t| now.saturating_duration_since(t) < READ_LINGER)
    });
}

/// Ends a GET's entry when its body is dropped, read to the end or not.
struct GetGuard {
    activity: Arc<Activity>,
    key: String,
}

impl Drop for GetGuard {
    fn drop(&mut self) {
        self.activity.get_ended(&self.key);
    }
}

/// An [`ObjectClient`] that tells an [`Activity`] about every upload and read it carries out
/// for the wrapped client.
pub struct Observed<C> {
    inner: C,
    activity: Arc<Activity>,
}

impl<C> Observed<C> {
    pub fn new(inner: C, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }

    pub fn inner(&self) -> &C {
        &self.inner
    }

    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }
}

fn copied_len(range: Option<(u64, u64)>) -> u64 {
    range.map_or(0, |(start, end)| end.saturating_sub(start))
}

impl<C: ObjectClient> ObjectClient for Observed<C> {
    fn bucket(&self) -> &str {
        self.inner.bucket()
    }

    async fn list_objects(&self, req: &ListRequest<'_>) -> crate::s3::error::Result<ListPage> {
        self.inner.list_objects(req).await
    }

    async fn head_object(&self, key: &str) -> crate::s3::error::Result<ObjectHead> {
        self.inner.head_object(key).await
    }

    async fn get_object(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        if_match: Option<&str>,
    ) -> crate::s3::error::Result<GetObjectOutput> {
        let retries = self.activity.get_started(key);
        let guard = GetGuard {
            activity: self.activity.clone(),
            key: key.to_string(),
        };
        let mut out =
            counting_retries(retries.clone(), self.inner.get_object(key, range, if_match)).await?;
        let body = std::mem::replace(&mut out.body, ObjectBody::from_bytes(Default::default()));
        out.body = ObjectBody::from_stream(futures_util::stream::unfold(
            (body, guard, retries),
            |(mut body, guard, retries)| async move {
                let next = counting_retries(retries.clone(), body.next_chunk()).await;
                match next {
                    Ok(Some(chunk)) => {
                        guard.activity.get_bytes(&guard.key, chunk.len() as u64);
                        Some((Ok(chunk), (body, guard, retries)))
                    }
                    Ok(None) => None,
                    Err(e) => Some((Err(e), (body, guard, retries))),
                }
            },
        ));
        Ok(out)
    }

    async fn put_object_if(
        &self,
        key: &str,
        body: PutBody,
        attrs: &ObjectAttributes,
        condition: Condition<'_>,
    ) -> crate::s3::error::Result<String> {
        let len = body.len();
        let retries = self.activity.part_sent(key);
        let result = counting_retries(
            retries,
            self.inner.put_object_if(key, body, attrs, condition),
        )
        .await;
        self.activity
            .part_answered(key, result.as_ref().ok().map(|_| len));
        self.activity.upload_over(key, Some(result.is_ok()));
        result
    }

    async fn delete_object(&self, key: &str) -> crate::s3::error::Result<()> {
        self.inner.delete_object(key).await
    }

    async fn delete_objects(
        &self,
        keys: &[String],
    ) -> crate::s3::error::Result<DeleteObjectsOutput> {
        self.inner.delete_objects(keys).await
    }

    async fn copy_object(
        &self,
        source_key: &str,
        dest_key: &str,
        directive: &MetadataDirective,
    ) -> crate::s3::error::Result<String> {
        self.inner
            .copy_object(source_key, dest_key, directive)
            .await
    }

    fn upload_checksum(&self) -> Checksum {
        self.inner.upload_checksum()
    }

    async fn create_multipart_upload(
        &self,
        key: &str,
        attrs: &ObjectAttributes,
        checksum: Checksum,
    ) -> crate::s3::error::Result<String> {
        let retries = self.activity.upload_begun(key);
        counting_retries(
            retries,
            self.inner.create_multipart_upload(key, attrs, checksum),
        )
        .await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        body: PutBody,
        checksum: Checksum,
    ) -> crate::s3::error::Result<StoredPart> {
        let len = body.len();
        let retries = self.activity.part_sent(key);
        let result = counting_retries(
            retries,
            self.inner
                .upload_part(key, upload_id, part_number, body, checksum),
        )
        .await;
        self.activity
            .part_answered(key, result.as_ref().ok().map(|_| len));
        result
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        source: CopySource<'_>,
    ) -> crate::s3::error::Result<String> {
        let len = copied_len(source.range);
        let retries = self.activity.part_sent(key);
        let result = counting_retries(
            retries,
            self.inner
                .upload_part_copy(key, upload_id, part_number, source),
        )
        .await;
        self.activity
            .part_answered(key, result.as_ref().ok().map(|_| len));
        result
    }

    async fn complete_multipart_upload_if(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        condition: Condition<'_>,
    ) -> crate::s3::error::Result<String> {
        let retries = self.activity.upload_retries(key);
        let result = counting_retries(
            retries,
            self.inner
                .complete_multipart_upload_if(key, upload_id, parts, condition),
        )
        .await;
        self.activity.upload_over(key, Some(result.is_ok()));
        result
    }

    async fn abort_multipart_upload(
        &self,
        key: &str,
        upload_id: &str,
    ) -> crate::s3::error::Result<()> {
        let result = self.inner.abort_multipart_upload(key, upload_id).await;
        self.activity.upload_over(key, None);
        result
    }

    async fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
        part_number_marker: Option<u32>,
    ) -> crate::s3::error::Result<ListPartsPage> {
        self.inner
            .list_parts(key, upload_id, part_number_marker)
            .await
    }

    async fn list_multipart_uploads(
        &self,
        prefix: &str,
        marker: Option<(&str, &str)>,
    ) -> crate::s3::error::Result<ListUploadsPage> {
        self.inner.list_multipart_uploads(prefix, marker).await
    }

    async fn head_bucket(&self) -> crate::s3::error::Result<()> {
        self.inner.head_bucket().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::MockClient;

    #[test]
    fn rates_cover_the_last_seconds_only() {
        let t0 = Instant::now();
        let mut r = Rate::new(t0);
        r.add(t0, 1000);
        r.add(t0 + Duration::from_millis(1500), 1000);
        let at2 = t0 + Duration::from_secs(2);
        let rate = r.per_second(at2);
        assert!((rate - 1000.0).abs() < 1.0, "{rate}");
        // Long after, nothing is left in the window.
        assert_eq!(r.per_second(t0 + Duration::from_secs(30)), 0.0);
    }

    #[tokio::test]
    async fn a_multipart_upload_is_tracked_until_completed() {
        let activity = Activity::new();
        let client = Observed::new(MockClient::new("b"), activity.clone());
        activity.written("k", 10 << 20);
        let id = client
            .create_multipart_upload("k", &ObjectAttributes::default(), Checksum::Crc32c)
            .await
            .unwrap();
        let part = vec![7u8; 5 << 20];
        let e1 = client
            .upload_part("k", &id, 1, PutBody::from(part.clone()), Checksum::Crc32c)
            .await
            .unwrap();
        let up = activity.uploads();
        assert_eq!(up.len(), 1);
        assert_eq!(
            (
                up[0].written,
                up[0].stored,
                up[0].parts_done,
                up[0].parts_in_flight
            ),
            (10 << 20, 5 << 20, 1, 0)
        );
        let e2 = client
            .upload_part("k", &id, 2, PutBody::from(part), Checksum::Crc32c)
            .await
            .unwrap();
        client
            .complete_multipart_upload(
                "k",
                &id,
                &[
                    CompletedPart {
                        part_number: 1,
                        etag: e1.etag,
                        crc32c: e1.crc32c,
                    },
                    CompletedPart {
                        part_number: 2,
                        etag: e2.etag,
                        crc32c: e2.crc32c,
                    },
                ],
            )
            .await
            .unwrap();
        assert!(activity.uploads().is_empty());
        let t = activity.totals();
        assert_eq!((t.uploads_completed, t.bytes_stored), (1, 10 << 20));
    }

    #[tokio::test]
    async fn reads_count_body_bytes_and_end_with_the_body() {
        let activity = Activity::new();
        let mock = MockClient::new("b");
        mock.put_object("r", PutBody::from(vec![1u8; 3000]), &Default::default())
            .await
            .unwrap();
        let client = Observed::new(mock, activity.clone());
        let out = client.get_object("r", None, None).await.unwrap();
        assert_eq!(activity.reads()[0].gets_in_flight, 1);
        let body = out.body.collect(3000).await.unwrap();
        assert_eq!(body.len(), 3000);
        let reads = activity.reads();
        assert_eq!((reads[0].bytes, reads[0].gets_in_flight), (3000, 0));
    }
}
