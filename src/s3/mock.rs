//! [`MockClient`]: an in-memory [`ObjectClient`] for fast core tests.
//!
//! Objects live in a `BTreeMap` (so listings come out in key order, as from S3), with their
//! ETags, times and metadata; multipart uploads keep their parts until completed or aborted.
//! Every call is counted per operation, and [`MockClient::fail_next`] makes chosen calls fail,
//! so tests can check both how much traffic a piece of the filesystem causes and how it behaves
//! when S3 fails.
//!
//! The mock follows S3 where the filesystem relies on it: delimiter listings with common
//! prefixes, continuation tokens, `If-Match` answered with PreconditionFailed, ranges clamped to
//! the object, multipart ETags of the form `"<md5 of part md5s>-<parts>"`, and checksums: an
//! upload created with CRC32C takes only parts sent with it, and completes only with each
//! part's right CRC32C named (AWS refuses both mistakes).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use md5::{Digest, Md5};

use super::client::*;
use super::error::{ClientError, ErrorKind, Operation, Result};

#[derive(Debug, Clone)]
pub struct MockObject {
    pub data: Bytes,
    pub etag: String,
    pub last_modified: SystemTime,
    pub attrs: ObjectAttributes,
}

#[derive(Debug)]
struct Upload {
    key: String,
    attrs: ObjectAttributes,
    parts: BTreeMap<u32, (String, Bytes)>,
    initiated: SystemTime,
    checksum: Checksum,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, MockObject>,
    uploads: BTreeMap<String, Upload>,
    failures: HashMap<Operation, VecDeque<Injected>>,
    /// What each multipart upload was created with, in order.
    created_with: Vec<Checksum>,
}

/// A failure planned for a call.
#[derive(Debug, Clone)]
enum Injected {
    /// The call fails without doing anything.
    Before(ErrorKind),
    /// The call does its work, then its answer is lost: the caller gets this error, as the
    /// real client does after a retry (a lost CompleteMultipartUpload answer, retried, is
    /// NoSuchUpload) or without one (a lost CreateMultipartUpload answer is a transport
    /// error).
    After(ErrorKind),
}

pub struct MockClient {
    bucket: String,
    state: Mutex<State>,
    counts: Mutex<HashMap<Operation, u64>>,
    next_id: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    /// Plays a server without conditional writes: their headers are ignored.
    pub ignore_conditions: AtomicBool,
    /// What [`ObjectClient::upload_checksum`] answers: `true` for CRC32C.
    pub crc32c: AtomicBool,
}

fn quoted_md5(data: &[u8]) -> String {
    format!("\"{}\"", hex::encode(Md5::digest(data)))
}

fn read_body(body: &PutBody) -> std::io::Result<Bytes> {
    match body {
        PutBody::Bytes(b) => Ok(b.clone()),
        PutBody::File { file, offset, len } => {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; *len as usize];
            file.read_exact_at(&mut buf, *offset)?;
            Ok(Bytes::from(buf))
        }
    }
}

impl MockClient {
    pub fn new(bucket: &str) -> Self {
        Self {
            bucket: bucket.to_string(),
            state: Mutex::new(State::default()),
            counts: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            ignore_conditions: AtomicBool::new(false),
            crc32c: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; keep going for the rest.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores an object directly, without counting a call.
    pub fn insert(&self, key: &str, data: impl Into<Bytes>) {
        let data = data.into();
        self.lock().objects.insert(
            key.to_string(),
            MockObject {
                etag: quoted_md5(&data),
                data,
                last_modified: SystemTime::now(),
                attrs: ObjectAttributes::default(),
            },
        );
    }

    /// Stores an object with attributes (another client's metadata), without counting a call.
    pub fn insert_with(&self, key: &str, data: impl Into<Bytes>, attrs: ObjectAttributes) {
        self.insert(key, data);
        if let Some(obj) = self.lock().objects.get_mut(key) {
            obj.attrs = attrs;
        }
    }

    /// Moves an object's Last-Modified, as a copy onto itself a while later would.
    pub fn set_last_modified(&self, key: &str, when: SystemTime) {
        if let Some(obj) = self.lock().objects.get_mut(key) {
            obj.last_modified = when;
        }
    }

    pub fn object(&self, key: &str) -> Option<MockObject> {
        self.lock().objects.get(key).cloned()
    }

    pub fn keys(&self) -> Vec<String> {
        self.lock().objects.keys().cloned().collect()
    }

    /// Uploads begun and neither completed nor aborted.
    pub fn open_uploads(&self) -> usize {
        self.lock().uploads.len()
    }

    /// The next `times` calls of `op` fail with `kind`.
    pub fn fail_next(&self, op: Operation, kind: ErrorKind, times: usize) {
        let mut state = self.lock();
        let queue = state.failures.entry(op).or_default();
        queue.extend(std::iter::repeat_n(Injected::Before(kind), times));
    }

    /// The next `times` calls of `op` do their work, then fail with `kind` as if the answer
    /// had been lost.
    pub fn lose_next_answer(&self, op: Operation, kind: ErrorKind, times: usize) {
        let mut state = self.lock();
        let queue = state.failures.entry(op).or_default();
        queue.extend(std::iter::repeat_n(Injected::After(kind), times));
    }

    /// Uploads in progress once background clean-up (the abort of a failed commit) had up
    /// to two seconds to run.
    pub async fn open_uploads_settled(&self) -> usize {
        for _ in 0..200 {
            if self.open_uploads() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        self.open_uploads()
    }

    /// Forgets every failure planned and not yet met.
    pub fn clear_failures(&self) {
        self.lock().failures.clear();
    }

    /// Removes an object directly, without counting a call (another client's delete).
    pub fn remove(&self, key: &str) {
        self.lock().objects.remove(key);
    }

    /// What each multipart upload made so far was created with, in order.
    pub fn upload_checksums(&self) -> Vec<Checksum> {
        self.lock().created_with.clone()
    }

    /// The ids of the uploads in progress.
    pub fn upload_ids(&self) -> Vec<String> {
        self.lock().uploads.keys().cloned().collect()
    }

    /// The keys of the uploads in progress.
    pub fn upload_keys(&self) -> Vec<String> {
        self.lock()
            .uploads
            .values()
            .map(|u| u.key.clone())
            .collect()
    }

    /// Body bytes uploaded to the mock (PutObject, UploadPart) and downloaded from it
    /// (GetObject): what would cross the network.
    pub fn bytes_moved(&self) -> (u64, u64) {
        (
            self.bytes_sent.load(Ordering::Relaxed),
            self.bytes_received.load(Ordering::Relaxed),
        )
    }

    /// How many times `op` was called.
    pub fn count(&self, op: Operation) -> u64 {
        self.counts
            .lock()
            .map(|c| c.get(&op).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn err(&self, op: Operation, key: Option<&str>, kind: ErrorKind) -> ClientError {
        let status = match kind {
            ErrorKind::NoSuchKey | ErrorKind::NoSuchBucket | ErrorKind::NoSuchUpload => Some(404),
            ErrorKind::PreconditionFailed => Some(412),
            ErrorKind::AccessDenied => Some(403),
            ErrorKind::InvalidRange => Some(416),
            ErrorKind::SlowDown | ErrorKind::ServiceUnavailable => Some(503),
            ErrorKind::InternalError => Some(500),
            _ => None,
        };
        let mut e = ClientError::new(op, &self.bucket, key, kind);
        e.status = status;
        e
    }

    /// Counts the call and consumes one injected failure, if any: an error now, or one to
    /// return after the work (see [`MockClient::after`]).
    fn enter(&self, op: Operation, key: Option<&str>) -> Result<Option<ErrorKind>> {
        if let Ok(mut c) = self.counts.lock() {
            *c.entry(op).or_default() += 1;
        }
        let injected = self
            .lock()
            .failures
            .get_mut(&op)
            .and_then(VecDeque::pop_front);
        match injected {
            Some(Injected::Before(kind)) => {
                Err(self.err(op, key, kind).with_message("injected failure"))
            }
            Some(Injected::After(kind)) => Ok(Some(kind)),
            None => Ok(None),
        }
    }

    /// The answer of a call that did its work: `result`, unless it is to be lost.
    fn after<T>(
        &self,
        op: Operation,
        key: Option<&str>,
        lost: Option<ErrorKind>,
        result: Result<T>,
    ) -> Result<T> {
        match lost {
            Some(kind) if result.is_ok() => {
                let mut e = self
                    .err(op, key, kind)
                    .with_message("injected: the answer was lost");
                e.attempts = 2;
                Err(e)
            }
            _ => result,
        }
    }

    fn new_id(&self) -> String {
        format!("upload-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Keeps `data` as part `part_number` of the upload; returns its ETag.
    fn store_part(
        &self,
        op: Operation,
        key: &str,
        upload_id: &str,
        part_number: u32,
        data: Bytes,
    ) -> Result<String> {
        let etag = quoted_md5(&data);
        let mut state = self.lock();
        let upload = state
            .uploads
            .get_mut(upload_id)
            .ok_or_else(|| self.err(op, Some(key), ErrorKind::NoSuchUpload))?;
        upload.parts.insert(part_number, (etag.clone(), data));
        Ok(etag)
    }

    fn head_of(obj: &MockObject) -> ObjectHead {
        ObjectHead {
            size: obj.data.len() as u64,
            etag: obj.etag.clone(),
            last_modified: obj.last_modified,
            content_type: obj.attrs.content_type.clone(),
            content: obj.attrs.content.clone(),
            metadata: obj.attrs.metadata.clone(),
            storage_class: obj.attrs.storage_class.clone(),
            sse: obj.attrs.sse.clone(),
        }
    }
}

impl ObjectClient for MockClient {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn list_objects(&self, req: &ListRequest<'_>) -> Result<ListPage> {
        let lost = self.enter(Operation::ListObjectsV2, None)?;
        let result = self.list_objects_now(req);
        self.after(Operation::ListObjectsV2, None, lost, result)
    }

    async fn head_object(&self, key: &str) -> Result<ObjectHead> {
        let lost = self.enter(Operation::HeadObject, Some(key))?;
        let result = self.head_object_now(key);
        self.after(Operation::HeadObject, Some(key), lost, result)
    }

    async fn get_object(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        if_match: Option<&str>,
    ) -> Result<GetObjectOutput> {
        let op = Operation::GetObject;
        let lost = self.enter(op, Some(key))?;
        let result = self.get_object_now(key, range, if_match);
        self.after(op, Some(key), lost, result)
    }

    async fn put_object_if(
        &self,
        key: &str,
        body: PutBody,
        attrs: &ObjectAttributes,
        condition: Condition<'_>,
    ) -> Result<String> {
        let op = Operation::PutObject;
        let lost = self.enter(op, Some(key))?;
        let result = self
            .check_condition(op, key, condition)
            .and_then(|()| self.put_object_now(key, body, attrs));
        self.after(op, Some(key), lost, result)
    }

    async fn delete_object(&self, key: &str) -> Result<()> {
        let lost = self.enter(Operation::DeleteObject, Some(key))?;
        let result = self.delete_object_now(key);
        self.after(Operation::DeleteObject, Some(key), lost, result)
    }

    async fn delete_objects(&self, keys: &[String]) -> Result<DeleteObjectsOutput> {
        let lost = self.enter(Operation::DeleteObjects, None)?;
        let result = self.delete_objects_now(keys);
        self.after(Operation::DeleteObjects, None, lost, result)
    }

    async fn copy_object(
        &self,
        source_key: &str,
        dest_key: &str,
        directive: &MetadataDirective,
    ) -> Result<String> {
        let op = Operation::CopyObject;
        let lost = self.enter(op, Some(dest_key))?;
        let result = self.copy_object_now(source_key, dest_key, directive);
        self.after(op, Some(dest_key), lost, result)
    }

    fn upload_checksum(&self) -> Checksum {
        if self.crc32c.load(Ordering::Relaxed) {
            Checksum::Crc32c
        } else {
            Checksum::Sha256
        }
    }

    async fn create_multipart_upload(
        &self,
        key: &str,
        attrs: &ObjectAttributes,
        checksum: Checksum,
    ) -> Result<String> {
        let lost = self.enter(Operation::CreateMultipartUpload, Some(key))?;
        let result = self.create_multipart_upload_now(key, attrs, checksum);
        self.after(Operation::CreateMultipartUpload, Some(key), lost, result)
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        body: PutBody,
        checksum: Checksum,
    ) -> Result<StoredPart> {
        let op = Operation::UploadPart;
        let lost = self.enter(op, Some(key))?;
        let result = self.upload_part_now(key, upload_id, part_number, body, checksum);
        self.after(op, Some(key), lost, result)
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        source: CopySource<'_>,
    ) -> Result<String> {
        let op = Operation::UploadPartCopy;
        let lost = self.enter(op, Some(key))?;
        let result = self.upload_part_copy_now(key, upload_id, part_number, source);
        self.after(op, Some(key), lost, result)
    }

    async fn complete_multipart_upload_if(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        condition: Condition<'_>,
    ) -> Result<String> {
        let op = Operation::CompleteMultipartUpload;
        let lost = self.enter(op, Some(key))?;
        let result = self
            .check_condition(op, key, condition)
            .and_then(|()| self.complete_multipart_upload_now(key, upload_id, parts));
        self.after(op, Some(key), lost, result)
    }

    async fn abort_multipart_upload(&self, key: &str, upload_id: &str) -> Result<()> {
        let op = Operation::AbortMultipartUpload;
        let lost = self.enter(op, Some(key))?;
        let result = self.abort_multipart_upload_now(key, upload_id);
        self.after(op, Some(key), lost, result)
    }

    async fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
        part_number_marker: Option<u32>,
    ) -> Result<ListPartsPage> {
        let op = Operation::ListParts;
        let lost = self.enter(op, Some(key))?;
        let result = self.list_parts_now(key, upload_id, part_number_marker);
        self.after(op, Some(key), lost, result)
    }

    async fn list_multipart_uploads(
        &self,
        prefix: &str,
        marker: Option<(&str, &str)>,
    ) -> Result<ListUploadsPage> {
        let lost = self.enter(Operation::ListMultipartUploads, None)?;
        let result = self.list_multipart_uploads_now(prefix, marker);
        self.after(Operation::ListMultipartUploads, None, lost, result)
    }

    async fn head_bucket(&self) -> Result<()> {
        let lost = self.enter(Operation::HeadBucket, None)?;
        self.after(Operation::HeadBucket, None, lost, Ok(()))
    }
}

/// The work of each call, without the counting and failure injection around it.
impl MockClient {
    fn list_objects_now(&self, req: &ListRequest<'_>) -> Result<ListPage> {
        let state = self.lock();
        let max = req.max_keys.unwrap_or(1000).clamp(1, 1000) as usize;
        let after = req.continuation_token.or(req.start_after).unwrap_or("");
        let mut page = ListPage::default();
        // The token is the last key or common prefix returned (S3's is opaque, ours readable):
        // resuming skips every key up to it and every key under it when it is a prefix.
        let mut last: Option<String> = None;
        for (key, obj) in state.objects.range(req.prefix.to_string()..) {
            if !key.starts_with(req.prefix) {
                break;
            }
            if key.as_str() <= after {
                continue;
            }
            let rest = &key[req.prefix.len()..];
            let common = req.delimiter.and_then(|d| {
                rest.find(d)
                    .map(|i| format!("{}{}", req.prefix, &rest[..i + d.len()]))
            });
            if let Some(p) = &common {
                if last.as_ref() == Some(p) || p == after {
                    continue;
                }
            }
            if page.objects.len() + page.common_prefixes.len() == max {
                page.next_continuation_token = last;
                break;
            }
            match common {
                Some(p) => {
                    last = Some(p.clone());
                    page.common_prefixes.push(p);
                }
                None => {
                    last = Some(key.clone());
                    page.objects.push(ObjectInfo {
                        key: key.clone(),
                        size: obj.data.len() as u64,
                        etag: obj.etag.clone(),
                        last_modified: obj.last_modified,
                        storage_class: obj.attrs.storage_class.clone(),
                    });
                }
            }
        }
        Ok(page)
    }

    fn head_object_now(&self, key: &str) -> Result<ObjectHead> {
        let state = self.lock();
        let obj = state
            .objects
            .get(key)
            .ok_or_else(|| self.err(Operation::HeadObject, Some(key), ErrorKind::NoSuchKey))?;
        Ok(Self::head_of(obj))
    }

    fn get_object_now(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        if_match: Option<&str>,
    ) -> Result<GetObjectOutput> {
        let op = Operation::GetObject;
        let state = self.lock();
        let obj = state
            .objects
            .get(key)
            .ok_or_else(|| self.err(op, Some(key), ErrorKind::NoSuchKey))?;
        if if_match.is_some_and(|etag| etag != obj.etag) {
            return Err(self.err(op, Some(key), ErrorKind::PreconditionFailed));
        }
        let size = obj.data.len() as u64;
        let range = match range {
            Some(r) if r.start >= size || r.is_empty() => {
                return Err(self.err(op, Some(key), ErrorKind::InvalidRange))
            }
            Some(r) => r.start..r.end.min(size),
            None => 0..size,
        };
        let body = obj.data.slice(range.start as usize..range.end as usize);
        self.bytes_received
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        Ok(GetObjectOutput {
            head: Self::head_of(obj),
            range,
            body: ObjectBody::from_bytes(body),
        })
    }

    /// PreconditionFailed when the object at `key` is not as `condition` says (unless the
    /// mock plays a server without conditional writes).
    fn check_condition(&self, op: Operation, key: &str, condition: Condition<'_>) -> Result<()> {
        if self.ignore_conditions.load(Ordering::Relaxed) {
            return Ok(());
        }
        let state = self.lock();
        let current = state.objects.get(key).map(|o| o.etag.as_str());
        let holds = match condition {
            Condition::None => true,
            Condition::Absent => current.is_none(),
            Condition::Etag(want) => current == Some(want),
        };
        if holds {
            Ok(())
        } else {
            Err(self.err(op, Some(key), ErrorKind::PreconditionFailed))
        }
    }

    fn put_object_now(&self, key: &str, body: PutBody, attrs: &ObjectAttributes) -> Result<String> {
        let op = Operation::PutObject;
        let data = read_body(&body).map_err(|e| {
            self.err(op, Some(key), ErrorKind::InvalidRequest)
                .with_message(e.to_string())
        })?;
        self.bytes_sent
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let etag = quoted_md5(&data);
        self.lock().objects.insert(
            key.to_string(),
            MockObject {
                data,
                etag: etag.clone(),
                last_modified: SystemTime::now(),
                attrs: attrs.clone(),
            },
        );
        Ok(etag)
    }

    fn delete_object_now(&self, key: &str) -> Result<()> {
        self.lock().objects.remove(key);
        Ok(())
    }

    fn delete_objects_now(&self, keys: &[String]) -> Result<DeleteObjectsOutput> {
        let mut state = self.lock();
        let mut out = DeleteObjectsOutput::default();
        for k in keys {
            state.objects.remove(k);
            out.deleted.push(k.clone());
        }
        Ok(out)
    }

    fn copy_object_now(
        &self,
        source_key: &str,
        dest_key: &str,
        directive: &MetadataDirective,
    ) -> Result<String> {
        let op = Operation::CopyObject;
        let mut state = self.lock();
        let src = state
            .objects
            .get(source_key)
            .cloned()
            .ok_or_else(|| self.err(op, Some(source_key), ErrorKind::NoSuchKey))?;
        let attrs = match directive {
            MetadataDirective::Copy => src.attrs.clone(),
            MetadataDirective::Keep(a) => ObjectAttributes {
                storage_class: a.storage_class.clone(),
                sse: a.sse.clone(),
                ..src.attrs.clone()
            },
            MetadataDirective::Replace(a) => a.clone(),
        };
        let obj = MockObject {
            last_modified: SystemTime::now(),
            attrs,
            ..src
        };
        let etag = obj.etag.clone();
        state.objects.insert(dest_key.to_string(), obj);
        Ok(etag)
    }

    fn create_multipart_upload_now(
        &self,
        key: &str,
        attrs: &ObjectAttributes,
        checksum: Checksum,
    ) -> Result<String> {
        let id = self.new_id();
        let mut state = self.lock();
        state.created_with.push(checksum);
        state.uploads.insert(
            id.clone(),
            Upload {
                key: key.to_string(),
                attrs: attrs.clone(),
                parts: BTreeMap::new(),
                initiated: SystemTime::now(),
                checksum,
            },
        );
        Ok(id)
    }

    fn upload_part_now(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        body: PutBody,
        checksum: Checksum,
    ) -> Result<StoredPart> {
        let op = Operation::UploadPart;
        let data = read_body(&body).map_err(|e| {
            self.err(op, Some(key), ErrorKind::InvalidRequest)
                .with_message(e.to_string())
        })?;
        let created_with = self.lock().uploads.get(upload_id).map(|u| u.checksum);
        if created_with.is_some_and(|c| (c == Checksum::Crc32c) != (checksum == Checksum::Crc32c)) {
            return Err(self
                .err(op, Some(key), ErrorKind::InvalidRequest)
                .with_message("checksum type mismatch"));
        }
        self.bytes_sent
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let sha256_hex = (checksum == Checksum::Sha256)
            .then(|| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data)));
        let crc32c = (checksum == Checksum::Crc32c).then(|| crc32c::crc32c(&data));
        let etag = self.store_part(op, key, upload_id, part_number, data)?;
        Ok(StoredPart {
            etag,
            sha256_hex,
            crc32c,
        })
    }

    fn upload_part_copy_now(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        source: CopySource<'_>,
    ) -> Result<String> {
        let op = Operation::UploadPartCopy;
        let state = self.lock();
        let src = state
            .objects
            .get(source.key)
            .ok_or_else(|| self.err(op, Some(source.key), ErrorKind::NoSuchKey))?;
        if source.if_match.is_some_and(|etag| etag != src.etag) {
            return Err(self.err(op, Some(source.key), ErrorKind::PreconditionFailed));
        }
        let size = src.data.len() as u64;
        let range = source.range.map_or(0..size, |(start, end)| start..end);
        if range.end > size || range.is_empty() {
            return Err(self.err(op, Some(source.key), ErrorKind::InvalidRange));
        }
        let data = src.data.slice(range.start as usize..range.end as usize);
        drop(state);
        self.store_part(op, key, upload_id, part_number, data)
    }

    fn complete_multipart_upload_now(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
    ) -> Result<String> {
        let op = Operation::CompleteMultipartUpload;
        let mut state = self.lock();
        let upload = state
            .uploads
            .remove(upload_id)
            .ok_or_else(|| self.err(op, Some(key), ErrorKind::NoSuchUpload))?;
        let mut data = BytesMut::new();
        let mut md5s = Vec::new();
        let mut previous = 0;
        for p in parts {
            let crc_ok = |bytes: &Bytes| match upload.checksum {
                Checksum::Crc32c => p.crc32c == Some(crc32c::crc32c(bytes)),
                _ => p.crc32c.is_none(),
            };
            match upload.parts.get(&p.part_number) {
                Some((etag, bytes))
                    if *etag == p.etag && p.part_number > previous && crc_ok(bytes) =>
                {
                    data.extend_from_slice(bytes);
                    md5s.extend(hex::decode(etag.trim_matches('"')).unwrap_or_default());
                    previous = p.part_number;
                }
                _ => {
                    state.uploads.insert(upload_id.to_string(), upload);
                    return Err(self.err(op, Some(key), ErrorKind::InvalidPart));
                }
            }
        }
        let etag = format!("\"{}-{}\"", hex::encode(Md5::digest(&md5s)), parts.len());
        state.objects.insert(
            upload.key.clone(),
            MockObject {
                data: data.freeze(),
                etag: etag.clone(),
                last_modified: SystemTime::now(),
                attrs: upload.attrs,
            },
        );
        Ok(etag)
    }

    fn abort_multipart_upload_now(&self, key: &str, upload_id: &str) -> Result<()> {
        let op = Operation::AbortMultipartUpload;
        self.lock()
            .uploads
            .remove(upload_id)
            .map(drop)
            .ok_or_else(|| self.err(op, Some(key), ErrorKind::NoSuchUpload))
    }

    fn list_parts_now(
        &self,
        key: &str,
        upload_id: &str,
        part_number_marker: Option<u32>,
    ) -> Result<ListPartsPage> {
        let op = Operation::ListParts;
        let state = self.lock();
        let upload = state
            .uploads
            .get(upload_id)
            .ok_or_else(|| self.err(op, Some(key), ErrorKind::NoSuchUpload))?;
        let parts = upload
            .parts
            .range(part_number_marker.unwrap_or(0) + 1..)
            .map(|(n, (etag, data))| PartInfo {
                part_number: *n,
                etag: etag.clone(),
                size: data.len() as u64,
            })
            .collect();
        Ok(ListPartsPage {
            parts,
            next_part_number_marker: None,
        })
    }

    fn list_multipart_uploads_now(
        &self,
        prefix: &str,
        marker: Option<(&str, &str)>,
    ) -> Result<ListUploadsPage> {
        let state = self.lock();
        let uploads = state
            .uploads
            .iter()
            .filter(|(id, u)| {
                u.key.starts_with(prefix)
                    && marker.is_none_or(|(k, i)| (u.key.as_str(), id.as_str()) > (k, i))
            })
            .map(|(id, u)| UploadInfo {
                key: u.key.clone(),
                upload_id: id.clone(),
                initiated: Some(u.initiated),
            })
            .collect();
        Ok(ListUploadsPage {
            uploads,
            next_marker: None,
        })
    }
}
