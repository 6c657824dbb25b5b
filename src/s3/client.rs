//! The `ObjectClient` trait: one method per S3 operation, and the plain structs they take and
//! return. The filesystem core depends on this trait only; [`super::http::S3Client`] speaks HTTP
//! to a real server and [`super::mock::MockClient`] keeps objects in memory for fast tests.

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use super::error::Result;

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub etag: String,
    pub last_modified: SystemTime,
    pub storage_class: Option<String>,
}

/// One page of ListObjectsV2. Keys and prefixes are decoded (the client asks for
/// `encoding-type=url`, so any key survives the XML).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    pub objects: Vec<ObjectInfo>,
    pub common_prefixes: Vec<String>,
    /// Set when the listing goes on: pass it back as `continuation_token`.
    pub next_continuation_token: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ListRequest<'a> {
    pub prefix: &'a str,
    pub delimiter: Option<&'a str>,
    pub continuation_token: Option<&'a str>,
    pub start_after: Option<&'a str>,
    /// At most this many keys and prefixes (S3 caps it at 1,000).
    pub max_keys: Option<u32>,
}

/// Server-side encryption asked for on writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerSideEncryption {
    /// `AES256`: keys managed by S3.
    S3Managed,
    /// `aws:kms`, with the given key id or the bucket's default key.
    Kms { key_id: Option<String> },
    /// `aws:kms:dsse`: dual-layer encryption with a KMS key.
    KmsDsse { key_id: Option<String> },
}

/// The headers besides `Content-Type` that an object is stored with and served back with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContentHeaders {
    pub cache_control: Option<String>,
    pub content_disposition: Option<String>,
    pub content_encoding: Option<String>,
    pub content_language: Option<String>,
    pub expires: Option<String>,
}

impl ContentHeaders {
    /// Header names and values, for a request or a comparison.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, &String)> {
        [
            ("cache-control", &self.cache_control),
            ("content-disposition", &self.content_disposition),
            ("content-encoding", &self.content_encoding),
            ("content-language", &self.content_language),
            ("expires", &self.expires),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.as_ref().map(|v| (name, v)))
    }

    /// The headers of an answer, by the names of [`ContentHeaders::pairs`].
    pub fn from_lookup(mut get: impl FnMut(&str) -> Option<String>) -> Self {
        Self {
            cache_control: get("cache-control"),
            content_disposition: get("content-disposition"),
            content_encoding: get("content-encoding"),
            content_language: get("content-language"),
            expires: get("expires"),
        }
    }
}

/// What a write stores besides the data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectAttributes {
    pub content_type: Option<String>,
    pub content: ContentHeaders,
    /// User metadata, names without the `x-amz-meta-` prefix, lowercase.
    pub metadata: BTreeMap<String, String>,
    pub storage_class: Option<String>,
    pub sse: Option<ServerSideEncryption>,
}

impl ObjectAttributes {
    /// Everything `head`'s object is stored with, to store again with a copy or a rewrite.
    pub fn of_head(head: &ObjectHead) -> Self {
        Self {
            content_type: head.content_type.clone(),
            content: head.content.clone(),
            metadata: head.metadata.clone(),
            storage_class: head.storage_class.clone(),
            sse: head.sse.clone(),
        }
    }
}

/// HeadObject's answer, and the header part of GetObject's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectHead {
    /// The whole object's size (not the range's).
    pub size: u64,
    pub etag: String,
    pub last_modified: SystemTime,
    pub content_type: Option<String>,
    pub content: ContentHeaders,
    pub metadata: BTreeMap<String, String>,
    pub storage_class: Option<String>,
    pub sse: Option<ServerSideEncryption>,
}

/// The bytes of a GET, delivered as they arrive: a reader never holds more than the range it
/// asked for, and can start on the first chunk before the last one is in.
pub struct ObjectBody {
    inner: BodySource,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

enum BodySource {
    Whole(Option<Bytes>),
    Stream(ChunkStream),
}

impl ObjectBody {
    pub fn from_bytes(bytes: Bytes) -> Self {
        Self {
            inner: BodySource::Whole(Some(bytes)),
        }
    }

    pub fn from_stream(stream: impl Stream<Item = Result<Bytes>> + Send + 'static) -> Self {
        Self {
            inner: BodySource::Stream(Box::pin(stream)),
        }
    }

    /// The next chunk, or `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        match &mut self.inner {
            BodySource::Whole(bytes) => Ok(bytes.take()),
            BodySource::Stream(stream) => stream.next().await.transpose(),
        }
    }

    /// All remaining bytes. `expected_len` sizes the buffer once.
    pub async fn collect(mut self, expected_len: usize) -> Result<Bytes> {
        if let BodySource::Whole(bytes) = &mut self.inner {
            return Ok(bytes.take().unwrap_or_default());
        }
        let mut out = Vec::with_capacity(expected_len);
        while let Some(chunk) = self.next_chunk().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(out))
    }
}

impl std::fmt::Debug for ObjectBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObjectBody")
    }
}

#[derive(Debug)]
pub struct GetObjectOutput {
    pub head: ObjectHead,
    /// The byte range this body holds.
    pub range: Range<u64>,
    pub body: ObjectBody,
}

/// The data of a PUT or an UploadPart. Neither form copies the data: `Bytes` is shared, and a
/// file region is read as it is sent (and read again if the request is retried).
#[derive(Debug, Clone)]
pub enum PutBody {
    Bytes(Bytes),
    File {
        file: Arc<File>,
        offset: u64,
        len: u64,
    },
}

impl PutBody {
    pub fn len(&self) -> u64 {
        match self {
            PutBody::Bytes(b) => b.len() as u64,
            PutBody::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Passes the body's bytes to `f` in order: whole when in memory, else read from the file
    /// in 1 MiB pieces (blocking I/O: call it off the async workers). For hashing.
    pub fn for_each_chunk(&self, mut f: impl FnMut(&[u8])) -> std::io::Result<()> {
        match self {
            PutBody::Bytes(b) => f(b),
            PutBody::File { file, offset, len } => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; (*len).min(1 << 20) as usize];
                let (mut pos, end) = (*offset, offset + len);
                while pos < end {
                    let n = ((end - pos) as usize).min(buf.len());
                    file.read_exact_at(&mut buf[..n], pos)?;
                    f(&buf[..n]);
                    pos += n as u64;
                }
            }
        }
        Ok(())
    }
}

impl From<Bytes> for PutBody {
    fn from(b: Bytes) -> Self {
        PutBody::Bytes(b)
    }
}

impl From<Vec<u8>> for PutBody {
    fn from(v: Vec<u8>) -> Self {
        PutBody::Bytes(Bytes::from(v))
    }
}

impl From<&'static str> for PutBody {
    fn from(s: &'static str) -> Self {
        PutBody::Bytes(Bytes::from_static(s.as_bytes()))
    }
}

/// What CopyObject does with the metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataDirective {
    /// Keep the source's metadata; the copy gets the client's default storage class and
    /// encryption (S3 does not carry the source's over).
    Copy,
    /// Keep the source's metadata, and store the copy with these attributes' storage class
    /// and encryption (those of the source, read with a HEAD), so a rename keeps them.
    Keep(ObjectAttributes),
    /// Replace it with these attributes.
    Replace(ObjectAttributes),
}

/// What UploadPartCopy copies: `range` of `key` (all of it when `None`), only while its ETag
/// is still `if_match` when that is given.
#[derive(Debug, Clone, Copy)]
pub struct CopySource<'a> {
    pub key: &'a str,
    pub range: Option<(u64, u64)>,
    pub if_match: Option<&'a str>,
}

impl<'a> CopySource<'a> {
    /// Bytes `range` of `key`, whatever its version.
    pub fn range(key: &'a str, range: Range<u64>) -> Self {
        Self {
            key,
            range: Some((range.start, range.end)),
            if_match: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedPart {
    pub part_number: u32,
    pub etag: String,
    /// The part's CRC32C, which CompleteMultipartUpload must name for each part of an upload
    /// created with [`Checksum::Crc32c`] (and must not name for the others).
    pub crc32c: Option<u32>,
}

/// What protects the data of an upload (PutObject, UploadPart) on its way to S3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Checksum {
    /// Its SHA-256 in `x-amz-content-sha256`, part of the signature.
    #[default]
    Sha256,
    /// Its CRC32C in `x-amz-checksum-crc32c` (signed), with `UNSIGNED-PAYLOAD`: the server
    /// recomputes it and refuses a body that does not match. About a quarter of the CPU.
    Crc32c,
    /// `UNSIGNED-PAYLOAD` and nothing else: only TLS, where used, protects the body.
    Off,
}

impl Checksum {
    pub const ALL: [Checksum; 3] = [Checksum::Sha256, Checksum::Crc32c, Checksum::Off];

    pub fn name(self) -> &'static str {
        match self {
            Checksum::Sha256 => "sha256",
            Checksum::Crc32c => "crc32c",
            Checksum::Off => "off",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// What S3 answered for a part sent with UploadPart: its ETag, and the digests of the bytes
/// sent that protected them on the way (the write path records them to resume uploads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPart {
    pub etag: String,
    /// With [`Checksum::Sha256`].
    pub sha256_hex: Option<String>,
    /// With [`Checksum::Crc32c`].
    pub crc32c: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartInfo {
    pub part_number: u32,
    pub etag: String,
    pub size: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPartsPage {
    pub parts: Vec<PartInfo>,
    /// Set when there are more parts: pass it back as `part_number_marker`.
    pub next_part_number_marker: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadInfo {
    pub key: String,
    pub upload_id: String,
    pub initiated: Option<SystemTime>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListUploadsPage {
    pub uploads: Vec<UploadInfo>,
    /// Set when the listing goes on: `(key_marker, upload_id_marker)`.
    pub next_marker: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteFailure {
    pub key: String,
    pub code: String,
    pub message: String,
}

/// DeleteObjects' answer: what was deleted and what was not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteObjectsOutput {
    pub deleted: Vec<String>,
    pub failed: Vec<DeleteFailure>,
}

/// What a conditional write requires of the object it replaces (S3's `If-None-Match: *` and
/// `If-Match`). Servers that do not implement conditional writes ignore the headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Condition<'a> {
    /// Write whatever is there.
    #[default]
    None,
    /// Only if there is no object at the key.
    Absent,
    /// Only if the object at the key has this ETag.
    Etag(&'a str),
}

/// S3 caps DeleteObjects at this many keys per request.
pub const MAX_DELETE_KEYS: usize = 1000;

/// One method per S3 operation on one bucket. Keys are plain (unencoded) strings.
///
/// Methods return `impl Future + Send` so the filesystem core can run them on any tokio
/// worker; implementations write them as `async fn`.
pub trait ObjectClient: Send + Sync + 'static {
    fn bucket(&self) -> &str;

    fn list_objects(&self, req: &ListRequest<'_>) -> impl Future<Output = Result<ListPage>> + Send;

    fn head_object(&self, key: &str) -> impl Future<Output = Result<ObjectHead>> + Send;

    /// A GET of `range` (the whole object when `None`). With `if_match`, S3 answers
    /// PreconditionFailed if the object's ETag is no longer that one.
    fn get_object(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        if_match: Option<&str>,
    ) -> impl Future<Output = Result<GetObjectOutput>> + Send;

    /// Stores an object; returns its ETag.
    fn put_object(
        &self,
        key: &str,
        body: PutBody,
        attrs: &ObjectAttributes,
    ) -> impl Future<Output = Result<String>> + Send {
        self.put_object_if(key, body, attrs, Condition::None)
    }

    /// [`ObjectClient::put_object`] only if the object at `key` is as `condition` says
    /// (PreconditionFailed otherwise, where the server checks; see [`Condition`]).
    fn put_object_if(
        &self,
        key: &str,
        body: PutBody,
        attrs: &ObjectAttributes,
        condition: Condition<'_>,
    ) -> impl Future<Output = Result<String>> + Send;

    fn delete_object(&self, key: &str) -> impl Future<Output = Result<()>> + Send;

    /// Deletes up to [`MAX_DELETE_KEYS`] keys in one request.
    fn delete_objects(
        &self,
        keys: &[String],
    ) -> impl Future<Output = Result<DeleteObjectsOutput>> + Send;

    /// Server-side copy within the bucket; returns the new ETag.
    fn copy_object(
        &self,
        source_key: &str,
        dest_key: &str,
        directive: &MetadataDirective,
    ) -> impl Future<Output = Result<String>> + Send;

    /// What the data of uploads is sent with now: PutObject always uses it; a multipart
    /// upload uses what it was created with (see `create_multipart_upload`).
    fn upload_checksum(&self) -> Checksum {
        Checksum::Sha256
    }

    /// Returns the upload id. Every part of an upload created with [`Checksum::Crc32c`] must
    /// be sent with it, and the complete request must name their CRC32Cs; an upload created
    /// otherwise takes parts with [`Checksum::Sha256`] or [`Checksum::Off`], and copied parts.
    fn create_multipart_upload(
        &self,
        key: &str,
        attrs: &ObjectAttributes,
        checksum: Checksum,
    ) -> impl Future<Output = Result<String>> + Send;

    /// Returns the part's ETag and the digest (per `checksum`) of what was sent.
    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        body: PutBody,
        checksum: Checksum,
    ) -> impl Future<Output = Result<StoredPart>> + Send;

    /// Copies `source` into a part; returns the part's ETag. PreconditionFailed when the source
    /// no longer has the ETag it must have.
    fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        source: CopySource<'_>,
    ) -> impl Future<Output = Result<String>> + Send;

    /// Returns the object's ETag.
    fn complete_multipart_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
    ) -> impl Future<Output = Result<String>> + Send {
        self.complete_multipart_upload_if(key, upload_id, parts, Condition::None)
    }

    /// [`ObjectClient::complete_multipart_upload`] only if the object at `key` is as
    /// `condition` says.
    fn complete_multipart_upload_if(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        condition: Condition<'_>,
    ) -> impl Future<Output = Result<String>> + Send;

    fn abort_multipart_upload(
        &self,
        key: &str,
        upload_id: &str,
    ) -> impl Future<Output = Result<()>> + Send;

    fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
        part_number_marker: Option<u32>,
    ) -> impl Future<Output = Result<ListPartsPage>> + Send;

    fn list_multipart_uploads(
        &self,
        prefix: &str,
        marker: Option<(&str, &str)>,
    ) -> impl Future<Output = Result<ListUploadsPage>> + Send;

    fn head_bucket(&self) -> impl Future<Output = Result<()>> + Send;
}
