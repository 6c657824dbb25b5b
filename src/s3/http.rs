//! [`S3Client`]: the [`ObjectClient`] that speaks HTTP to a real S3 endpoint with reqwest.
//!
//! Each operation builds a [`Request`] (method, key, query, headers, body), and
//! [`S3Client::with_retries`] sends it: sign with the current time, send, turn any non-2xx answer
//! (and a 200 whose body is an `<Error>` document) into a typed [`ClientError`], and retry what
//! [`ClientError::is_transient`] allows, on the schedule of [`RetryPolicy`].
//!
//! Integrity: every body we send is covered by a digest the server recomputes, refusing a body
//! that changed on the way. Control bodies (CompleteMultipartUpload, DeleteObjects) carry their
//! SHA-256 in `x-amz-content-sha256`, part of the signature. Data (PutObject, UploadPart) carries
//! what [`Checksum`] says: the signed SHA-256 (about 1 CPU-second per 1.5-2 GiB with SHA
//! extensions), or a CRC32C in `x-amz-checksum-crc32c` with `UNSIGNED-PAYLOAD` (about a quarter of
//! that, hardware-accelerated) once [`S3Client::probe_crc32c`] has seen the server refuse a part
//! whose CRC32C is wrong: not every S3-compatible store checks it. Anonymous requests carry a
//! `Content-MD5`.
//!
//! Addressing: virtual-hosted (`bucket.host/key`) for AWS endpoints, path-style (`host/bucket/key`)
//! for every other endpoint, unless `--addressing-style` says otherwise: S3-compatible stores
//! rarely have per-bucket DNS. An endpoint URL may have a path (`https://gw.example.com/s3`, a
//! gateway behind a reverse proxy under a path): it comes before the bucket (path-style) or the
//! key (virtual-hosted), and is part of what is signed.
//!
//! Production options ([`WriteDefaults`], [`ClientConfig::request_payer`],
//! [`ClientConfig::expected_bucket_owner`]) become headers here: encryption, storage class and
//! ACL on the requests that create objects (PutObject, CreateMultipartUpload, CopyObject; an
//! object's own encryption and storage class, when the core passes them, win over the
//! defaults); requester-pays and the expected owner on every request. The KMS key id goes on
//! CreateMultipartUpload only, never on its parts, as S3 requires.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt;
use md5::{Digest as _, Md5};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use sha2::Sha256;
use time::OffsetDateTime;

use super::body::{upload_body, Progress, Waiting};
use super::client::*;
use super::credentials::refresh::Snapshot;
use super::credentials::{Auth, Credentials, SharedCredentials};
use super::error::{ClientError, ErrorKind, Operation, Result};
use super::retry::RetryPolicy;
use super::sigv4::{self, SigningContext};
use super::transport::{self, TransportConfig};
use super::xml;

/// How the bucket appears in request URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Addressing {
    /// Virtual-hosted for AWS endpoints, path-style for others.
    #[default]
    Auto,
    Path,
    VirtualHosted,
}

/// What new objects are stored with unless the object already has its own (a rename or an
/// attribute change keeps the object's): `--sse`, `--sse-kms-key-id`, `--storage-class`,
/// `--acl`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteDefaults {
    pub sse: Option<ServerSideEncryption>,
    pub storage_class: Option<String>,
    /// A canned ACL (`private`, `bucket-owner-full-control`, ...).
    pub acl: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub bucket: String,
    /// `scheme://host[:port][/path]`; `None` means AWS (`https://s3.<region>.amazonaws.com`).
    pub endpoint_url: Option<String>,
    pub region: String,
    pub addressing: Addressing,
    pub auth: Auth,
    pub retry: RetryPolicy,
    /// Longest wait for a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Longest wait for the answer once a request is sent: its status line and headers.
    /// Server-side copies and CompleteMultipartUpload, which a server may work on for long
    /// before it answers, get [`SLOW_ANSWER_FACTOR`] times as long.
    pub request_timeout: Duration,
    /// Longest time a body, sent or received, may make no progress before the connection
    /// counts as hung.
    pub stall_timeout: Duration,
    /// Idle connections kept per host; at least the number of concurrent requests wanted.
    pub max_idle_connections: usize,
    /// Idle connections kept for GetObject, which has a pool of its own: a connection that
    /// streamed a large body keeps a read buffer of about 408 KiB (hyper's), so the mount
    /// bounds how many of them there are, and counts them in its memory.
    pub max_read_connections: usize,
    /// Trust roots and proxies.
    pub transport: TransportConfig,
    pub write: WriteDefaults,
    /// `x-amz-request-payer: requester` on every request (`--requester-pays`).
    pub request_payer: bool,
    /// `x-amz-expected-bucket-owner` on every request (`--expected-bucket-owner`).
    pub expected_bucket_owner: Option<String>,
    /// What protects uploaded data (`--upload-checksums`).
    pub upload_checksums: ChecksumChoice,
}

impl ClientConfig {
    pub fn new(bucket: &str, region: &str, auth: Auth) -> Self {
        Self {
            bucket: bucket.to_string(),
            endpoint_url: None,
            region: region.to_string(),
            addressing: Addressing::Auto,
            auth,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(5),
            max_idle_connections: 64,
            max_read_connections: 64,
            transport: TransportConfig::default(),
            write: WriteDefaults::default(),
            request_payer: false,
            expected_bucket_owner: None,
            upload_checksums: ChecksumChoice::Auto,
        }
    }
}

/// Counters of the client's traffic, for stats and benchmarks.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Requests sent, by operation ([`Operation::ALL`] order).
    pub by_operation: [AtomicU64; Operation::ALL.len()],
    /// Requests that failed for good (after their retries), not counting the NoSuchKey
    /// answers lookups expect.
    pub errors: AtomicU64,
    /// Answers that asked us to slow down: SlowDown, 503, 429.
    pub throttles: AtomicU64,
}

impl ClientStats {
    /// Requests sent so far of `op`.
    pub fn requests_of(&self, op: Operation) -> u64 {
        let i = Operation::ALL.iter().position(|o| *o == op).unwrap_or(0);
        self.by_operation[i].load(Ordering::Relaxed)
    }

    fn count_request(&self, op: Operation) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = Operation::ALL.iter().position(|o| *o == op) {
            self.by_operation[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn count_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        super::retry::note_retry();
    }

    fn count_failure(&self, e: &ClientError) {
        if e.kind != ErrorKind::NoSuchKey {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn count_answer(&self, e: &ClientError) {
        if e.kind == ErrorKind::SlowDown || matches!(e.status, Some(503) | Some(429)) {
            self.throttles.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("endpoint URL {0:?} is not a valid http:// or https:// URL")]
    BadEndpoint(String),
    #[error("endpoint URL {0:?} has a query or fragment; give scheme://host[:port][/path]")]
    EndpointWithQuery(String),
    #[error(
        "bucket name {0:?} is not valid (3-63 characters: lowercase letters, digits, '.', '-')"
    )]
    BadBucket(String),
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
}

/// Where requests go: scheme, host (with port when not the default) and the path before the
/// key: the endpoint's own path, then the bucket in path-style addressing.
#[derive(Debug, Clone)]
struct Endpoint {
    scheme: String,
    authority: String,
    bucket_path: String,
    virtual_hosted: bool,
}

impl Endpoint {
    fn resolve(cfg: &ClientConfig) -> std::result::Result<Self, ConfigError> {
        let raw = cfg
            .endpoint_url
            .clone()
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", cfg.region));
        let url = Url::parse(&raw).map_err(|_| ConfigError::BadEndpoint(raw.clone()))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(ConfigError::BadEndpoint(raw));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(ConfigError::EndpointWithQuery(raw));
        }
        // Kept as written (already percent-encoded by the URL parser), without a final '/'.
        let base_path = url.path().trim_end_matches('/').to_string();
        if !valid_bucket_name(&cfg.bucket) {
            return Err(ConfigError::BadBucket(cfg.bucket.clone()));
        }
        let host = url.host_str().unwrap_or_default().to_string();
        let is_aws = host.ends_with(".amazonaws.com") || host.ends_with(".amazonaws.com.cn");
        let dns_safe = !cfg.bucket.contains('.') || url.scheme() == "http";
        let virtual_hosted = match cfg.addressing {
            Addressing::Path => false,
            Addressing::VirtualHosted => true,
            Addressing::Auto => is_aws && dns_safe,
        };
        let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
        let (authority, bucket_path) = if virtual_hosted {
            (format!("{}.{host}{port}", cfg.bucket), base_path)
        } else {
            (
                format!("{host}{port}"),
                format!("{base_path}/{}", cfg.bucket),
            )
        };
        Ok(Self {
            scheme: url.scheme().to_string(),
            authority,
            bucket_path,
            virtual_hosted,
        })
    }

    /// The wire path of `key` (or of the bucket when `None`).
    fn path(&self, key: Option<&str>) -> String {
        match key {
            Some(k) => format!("{}/{}", self.bucket_path, sigv4::uri_encode_path(k)),
            None if self.bucket_path.is_empty() => "/".to_string(),
            // Virtual-hosted under an endpoint path: the bucket's root is that path's directory.
            None if self.virtual_hosted => {
                format!("{}/", self.bucket_path)
            }
            None => self.bucket_path.clone(),
        }
    }
}

fn valid_bucket_name(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && b.as_bytes()[0].is_ascii_alphanumeric()
}

/// One request before signing.
struct Request<'a> {
    op: Operation,
    method: Method,
    key: Option<&'a str>,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Option<PreparedBody>,
}

impl<'a> Request<'a> {
    fn new(op: Operation, method: Method, key: Option<&'a str>) -> Self {
        Self {
            op,
            method,
            key,
            query: Vec::new(),
            headers: Vec::new(),
            body: None,
        }
    }

    fn query(mut self, k: &str, v: impl Into<String>) -> Self {
        self.query.push((k.to_string(), v.into()));
        self
    }

    fn header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.to_string(), v.into()));
        self
    }

    fn body(mut self, body: PreparedBody) -> Self {
        self.body = Some(body);
        self
    }
}

/// A body with its digests computed once, outside the retry loop.
#[derive(Clone)]
struct PreparedBody {
    data: PutBody,
    /// Its SHA-256 (hex), unless it is sent with `UNSIGNED-PAYLOAD`.
    sha256_hex: Option<String>,
    md5_base64: Option<String>,
    /// Sent in `x-amz-checksum-crc32c`.
    crc32c: Option<u32>,
}

/// What `--upload-checksums` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChecksumChoice {
    /// CRC32C where the server verifies it and nobody on the path can change a body together
    /// with its CRC (TLS, or a loopback endpoint); signed SHA-256 otherwise.
    #[default]
    Auto,
    /// CRC32C where the server verifies it, SHA-256 otherwise.
    Crc32c,
    Sha256,
    Off,
}

impl ChecksumChoice {
    pub fn parse(v: &str) -> Option<Self> {
        match v {
            "auto" => Some(Self::Auto),
            "crc32c" => Some(Self::Crc32c),
            "sha256" => Some(Self::Sha256),
            "off" => Some(Self::Off),
            _ => None,
        }
    }
}

/// How many request timeouts the answer to a server-side copy or a CompleteMultipartUpload
/// may take.
pub const SLOW_ANSWER_FACTOR: u32 = 12;

/// The HTTP client of one bucket.
#[derive(Clone)]
pub struct S3Client {
    http: reqwest::Client,
    /// GetObject's connections (see [`ClientConfig::max_read_connections`]).
    reads: reqwest::Client,
    cfg: Arc<ClientConfig>,
    /// What requests are signed with; `None` for anonymous requests.
    keys: Option<Arc<SharedCredentials>>,
    endpoint: Arc<Endpoint>,
    stats: Arc<ClientStats>,
    /// The [`Checksum`] uploads use now (as `u8`): SHA-256 until a probe finds CRC32C checked.
    checksum: Arc<std::sync::atomic::AtomicU8>,
    /// Sockets whose answers are acknowledged at once (the 40 ms stall of small GETs).
    quick_ack: Arc<super::quickack::QuickAck>,
}

impl std::fmt::Debug for S3Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Client")
            .field("bucket", &self.cfg.bucket)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl S3Client {
    pub fn new(cfg: ClientConfig) -> std::result::Result<Self, ConfigError> {
        let endpoint = Endpoint::resolve(&cfg)?;
        let build = |idle| {
            transport::builder(&cfg.transport)
                .map_err(|e| ConfigError::Http(e.to_string()))?
                .connect_timeout(cfg.connect_timeout)
                .pool_max_idle_per_host(idle)
                .pool_idle_timeout(Duration::from_secs(50))
                .tcp_nodelay(true)
                .http1_only()
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("s3mount/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| ConfigError::Http(e.to_string()))
        };
        let http = build(cfg.max_idle_connections)?;
        let reads = build(cfg.max_read_connections)?;
        let keys = match &cfg.auth {
            Auth::Signed(c) => Some(SharedCredentials::fixed(c.clone(), "the given keys")),
            Auth::Chain(shared) => Some(shared.clone()),
            Auth::Anonymous => None,
        };
        let checksum = match cfg.upload_checksums {
            ChecksumChoice::Off => Checksum::Off,
            _ => Checksum::Sha256,
        };
        Ok(Self {
            http,
            reads,
            keys,
            cfg: Arc::new(cfg),
            endpoint: Arc::new(endpoint),
            stats: Arc::new(ClientStats::default()),
            checksum: Arc::new(std::sync::atomic::AtomicU8::new(checksum as u8)),
            quick_ack: Arc::default(),
        })
    }

    /// Whether uploads should try CRC32C: what `--upload-checksums` asked for, and, for
    /// `auto`, whether a changed body could pass with its CRC changed to match (plain HTTP
    /// beyond this machine).
    pub fn wants_crc32c(&self) -> bool {
        match self.cfg.upload_checksums {
            ChecksumChoice::Crc32c => true,
            ChecksumChoice::Auto => {
                self.endpoint.scheme == "https" || loopback_authority(&self.endpoint.authority)
            }
            ChecksumChoice::Sha256 | ChecksumChoice::Off => false,
        }
    }

    /// Finds out whether the server checks `x-amz-checksum-crc32c`, with a multipart upload
    /// at `key` that it aborts again: a part sent with a wrong CRC32C must be refused, and
    /// the same part with the right one taken. If so, uploads use CRC32C from now on (see
    /// [`ObjectClient::upload_checksum`]); if not, they stay on SHA-256. Returns what it found,
    /// for the log.
    pub async fn probe_crc32c(&self, key: &str) -> std::result::Result<(), String> {
        let id = self
            .create_multipart_upload(key, &ObjectAttributes::default(), Checksum::Crc32c)
            .await
            .map_err(|e| format!("CreateMultipartUpload with a CRC32C algorithm failed: {e}"))?;
        let verdict = self.probe_parts(key, &id).await;
        if let Err(e) = self.abort_multipart_upload(key, &id).await {
            tracing::warn!(key, "could not abort the checksum probe's upload: {e}");
        }
        verdict?;
        self.checksum
            .store(Checksum::Crc32c as u8, Ordering::Relaxed);
        Ok(())
    }

    async fn probe_parts(&self, key: &str, id: &str) -> std::result::Result<(), String> {
        let data = Bytes::from_static(b"s3mount checks that the server checks CRC32C");
        let right = crc32c::crc32c(&data);
        let send = |crc: u32| {
            let body = PreparedBody {
                data: PutBody::Bytes(data.clone()),
                sha256_hex: None,
                md5_base64: None,
                crc32c: Some(crc),
            };
            let req = Request::new(Operation::UploadPart, Method::PUT, Some(key))
                .query("partNumber", "1")
                .query("uploadId", id)
                .body(body);
            async move { self.headers_of(&req).await }
        };
        match send(right ^ 0x5a5a_5a5a).await {
            Ok(_) => return Err("it took a part whose CRC32C was wrong".into()),
            Err(e) if refused_for_checksum(&e) => {}
            Err(e) => return Err(format!("a part with a wrong CRC32C got: {e}")),
        }
        send(right)
            .await
            .map(drop)
            .map_err(|e| format!("a part with the right CRC32C was refused: {e}"))
    }

    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// The base URL of the bucket, as requests address it.
    pub fn bucket_url(&self) -> String {
        format!(
            "{}://{}{}",
            self.endpoint.scheme,
            self.endpoint.authority,
            self.endpoint.path(None)
        )
    }

    /// One snapshot of the credentials for one request (`None`: anonymous), or why there is
    /// none: the chain's credentials expired and could not be renewed.
    fn signing_keys(&self) -> std::result::Result<Option<Arc<Snapshot>>, String> {
        match &self.keys {
            Some(shared) => shared.current().map(Some).map_err(|e| e.message),
            None => Ok(None),
        }
    }

    fn signing_context<'a>(
        &'a self,
        credentials: &'a Credentials,
        time: OffsetDateTime,
    ) -> SigningContext<'a> {
        SigningContext {
            credentials,
            region: &self.cfg.region,
            service: "s3",
            time,
        }
    }

    /// A presigned URL for `method` on `key`, valid for `expires` (at most 7 days) from `now`.
    /// Anyone holding it can make that one request without credentials.
    pub fn presigned_url(
        &self,
        method: &str,
        key: &str,
        expires: Duration,
        now: OffsetDateTime,
    ) -> std::result::Result<String, sigv4::PresignError> {
        let path = self.endpoint.path(Some(key));
        let keys = self.signing_keys().ok().flatten();
        let Some(keys) = keys.as_ref() else {
            return Ok(format!(
                "{}://{}{path}",
                self.endpoint.scheme, self.endpoint.authority
            ));
        };
        let ctx = self.signing_context(&keys.credentials, now);
        let headers = vec![("host".to_string(), self.endpoint.authority.clone())];
        let (query, _) = sigv4::presign(
            method,
            &path,
            &[],
            &headers,
            sigv4::UNSIGNED_PAYLOAD,
            expires,
            &ctx,
        )?;
        Ok(format!(
            "{}://{}{path}?{query}",
            self.endpoint.scheme, self.endpoint.authority
        ))
    }

    /// The URL and form fields of a browser upload form for this bucket. `None` for anonymous
    /// clients, which have nothing to sign with.
    pub fn post_policy_form(
        &self,
        policy: &sigv4::PostPolicy,
        now: OffsetDateTime,
    ) -> Option<(String, sigv4::PostPolicyFields)> {
        let keys = self.signing_keys().ok().flatten()?;
        let ctx = self.signing_context(&keys.credentials, now);
        Some((self.bucket_url(), policy.sign(&ctx)))
    }

    /// A control body (XML), signed with its SHA-256.
    async fn prepare(&self, data: PutBody) -> Result<PreparedBody> {
        self.prepare_data(data, Checksum::Sha256).await
    }

    /// An object's or a part's data, with the digest `checksum` asks for.
    async fn prepare_data(&self, data: PutBody, checksum: Checksum) -> Result<PreparedBody> {
        let anonymous = matches!(self.cfg.auth, Auth::Anonymous);
        // Hashing 8 MiB takes milliseconds: keep it off the async workers.
        let hashed = tokio::task::spawn_blocking(move || digest_body(data, checksum, anonymous))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r);
        hashed.map_err(|e| {
            ClientError::new(
                Operation::PutObject,
                &self.cfg.bucket,
                None,
                ErrorKind::InvalidRequest,
            )
            .with_message(format!("cannot read the data to upload: {e}"))
        })
    }

    /// Sends `req` until it succeeds, fails for good, or the retry budget is spent. `read`
    /// turns a successful response into the result; its errors are retried like the send's
    /// (a body cut short, a 200 carrying `<Error>`).
    async fn with_retries<T, F, Fut>(&self, req: &Request<'_>, read: F) -> Result<T>
    where
        F: Fn(reqwest::Response) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let start = Instant::now();
        let mut backoff = self.cfg.retry.backoff();
        loop {
            let outcome = match self.send_once(req).await {
                Ok(resp) => read(resp).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(v) => return Ok(v),
                Err(mut e) => {
                    self.stats.count_answer(&e);
                    if e.is_transient() {
                        if let Some(delay) = backoff.next_delay(start.elapsed()) {
                            self.stats.count_retry();
                            tracing::warn!(error = %e, retry_in = ?delay, "transient S3 error, retrying");
                            tokio::time::sleep(delay).await;
                            continue;
                        }
                    }
                    e.attempts = backoff.attempts();
                    self.stats.count_failure(&e);
                    return Err(e);
                }
            }
        }
    }

    /// Headers every request of this bucket carries: requester-pays and the expected owner
    /// (of the copy source too, which is this bucket).
    fn bucket_headers(&self, op: Operation, headers: &mut Vec<(String, String)>) {
        if self.cfg.request_payer {
            headers.push(("x-amz-request-payer".into(), "requester".into()));
        }
        if let Some(owner) = &self.cfg.expected_bucket_owner {
            headers.push(("x-amz-expected-bucket-owner".into(), owner.clone()));
            if matches!(op, Operation::CopyObject | Operation::UploadPartCopy) {
                headers.push(("x-amz-source-expected-bucket-owner".into(), owner.clone()));
            }
        }
    }

    fn error(&self, req: &Request<'_>, kind: ErrorKind) -> ClientError {
        ClientError::new(req.op, &self.cfg.bucket, req.key, kind)
    }

    fn transport_error(&self, req: &Request<'_>, e: &reqwest::Error) -> ClientError {
        let kind = if e.is_connect() {
            ErrorKind::Connect
        } else if e.is_timeout() {
            ErrorKind::Timeout
        } else {
            ErrorKind::Transport
        };
        self.error(req, kind).with_message(error_chain(e))
    }

    async fn send_once(&self, req: &Request<'_>) -> Result<reqwest::Response> {
        let path = self.endpoint.path(req.key);
        let query = sigv4::canonical_query(&req.query);
        let url_text = if query.is_empty() {
            format!(
                "{}://{}{path}",
                self.endpoint.scheme, self.endpoint.authority
            )
        } else {
            format!(
                "{}://{}{path}?{query}",
                self.endpoint.scheme, self.endpoint.authority
            )
        };
        let url = Url::parse(&url_text).map_err(|e| {
            self.error(req, ErrorKind::InvalidRequest)
                .with_message(format!("cannot form a URL: {e}"))
        })?;
        if url.path() != path {
            // The URL standard folds `.` and `..` segments, even encoded ones, so such a key
            // cannot be addressed exactly; refusing beats touching another object.
            return Err(self.error(req, ErrorKind::InvalidRequest).with_message(
                "the key has a '.' or '..' path segment, which HTTP clients rewrite",
            ));
        }

        let mut headers = req.headers.clone();
        self.bucket_headers(req.op, &mut headers);
        headers.push(("host".into(), self.endpoint.authority.clone()));
        let payload_hash = match &req.body {
            None => sigv4::EMPTY_SHA256.to_string(),
            Some(b) => b
                .sha256_hex
                .clone()
                .unwrap_or_else(|| sigv4::UNSIGNED_PAYLOAD.to_string()),
        };
        if let Some(crc) = req.body.as_ref().and_then(|b| b.crc32c) {
            let value = base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes());
            headers.push(("x-amz-checksum-crc32c".into(), value));
        }
        let keys = self
            .signing_keys()
            .map_err(|why| self.error(req, ErrorKind::AccessDenied).with_message(why))?;
        match keys
            .as_ref()
            .map(|k| self.signing_context(&k.credentials, OffsetDateTime::now_utc()))
        {
            Some(ctx) => {
                sigv4::sign_headers(
                    req.method.as_str(),
                    &path,
                    &req.query,
                    &mut headers,
                    &payload_hash,
                    &ctx,
                );
            }
            None => {
                if let Some(md5) = req.body.as_ref().and_then(|b| b.md5_base64.clone()) {
                    headers.push(("content-md5".into(), md5));
                }
            }
        }

        let mut map = HeaderMap::with_capacity(headers.len() + 1);
        for (k, v) in &headers {
            if k == "host" {
                continue; // reqwest writes the same value from the URL
            }
            let name = HeaderName::from_bytes(k.as_bytes());
            let value = HeaderValue::from_str(v);
            match (name, value) {
                (Ok(n), Ok(v)) => {
                    map.append(n, v);
                }
                _ => {
                    return Err(self
                        .error(req, ErrorKind::InvalidRequest)
                        .with_message(format!(
                        "header {k} has a value HTTP cannot carry (non-ASCII or control characters)"
                    )))
                }
            }
        }

        let http = match req.op {
            Operation::GetObject => &self.reads,
            _ => &self.http,
        };
        let mut builder = http.request(req.method.clone(), url);
        let body_len = req.body.as_ref().map_or(0, |b| b.data.len());
        map.insert(reqwest::header::CONTENT_LENGTH, HeaderValue::from(body_len));
        builder = builder.headers(map);
        let progress = Progress::start(req.body.is_some(), self.cfg.connect_timeout);
        if let Some(body) = &req.body {
            builder = builder.body(upload_body(&body.data, progress.clone()));
        }

        self.stats.count_request(req.op);
        let started = Instant::now();
        let resp = self.send_watched(req, builder.send(), &progress).await?;
        self.stats.bytes_sent.fetch_add(body_len, Ordering::Relaxed);
        if req.method != Method::HEAD && resp.content_length() != Some(0) {
            // The body may wait on the ACK of these headers (see quickack.rs).
            self.quick_ack.ack(&resp);
        }
        let status = resp.status();
        tracing::debug!(op = %req.op, key = req.key.unwrap_or(""), status = status.as_u16(),
            ms = started.elapsed().as_millis() as u64, "S3 request");
        if status.is_success() {
            return Ok(resp);
        }
        Err(self.error_from_response(req, resp).await)
    }

    /// How long the answer to `op` may take once the request is sent.
    fn answer_timeout(&self, op: Operation) -> Duration {
        match op {
            // Servers without keep-alive whitespace (Garage, MinIO) say nothing until a copy
            // or the assembly of a large upload is done.
            Operation::CopyObject
            | Operation::UploadPartCopy
            | Operation::CompleteMultipartUpload => self.cfg.request_timeout * SLOW_ANSWER_FACTOR,
            _ => self.cfg.request_timeout,
        }
    }

    /// Awaits `send` while watching `progress`: fails the request when its body stops moving
    /// for the stall timeout, or its answer does not come within the request timeout. Dropping
    /// the request closes its connection, so a late answer cannot be mistaken for another's.
    async fn send_watched(
        &self,
        req: &Request<'_>,
        send: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
        progress: &Progress,
    ) -> Result<reqwest::Response> {
        let (stall, answer) = (self.cfg.stall_timeout, self.answer_timeout(req.op));
        tokio::pin!(send);
        loop {
            let (deadline, _) = progress.deadline(stall, answer);
            tokio::select! {
                sent = &mut send => return sent.map_err(|e| self.transport_error(req, &e)),
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let (deadline, waiting) = progress.deadline(stall, answer);
                    if deadline > Instant::now() {
                        continue; // it moved meanwhile
                    }
                    let message = match waiting {
                        Waiting::Body => format!(
                            "the server took none of the request body for {} s (--stall-timeout)",
                            stall.as_secs_f64()
                        ),
                        Waiting::Answer => format!(
                            "no answer within {} s (--request-timeout)",
                            answer.as_secs_f64()
                        ),
                    };
                    return Err(self.error(req, ErrorKind::Timeout).with_message(message));
                }
            }
        }
    }

    /// The whole body of `resp`, failing if it stalls for the stall timeout (a body cut short
    /// is a transport error, retried like a failed send).
    async fn body_bytes(&self, req: &Request<'_>, resp: reqwest::Response) -> Result<Bytes> {
        let stall = match req.op {
            Operation::CopyObject
            | Operation::UploadPartCopy
            | Operation::CompleteMultipartUpload => self.answer_timeout(req.op),
            _ => self.cfg.stall_timeout,
        };
        let mut stream = resp.bytes_stream();
        let mut out = bytes::BytesMut::new();
        loop {
            match tokio::time::timeout(stall, stream.next()).await {
                Ok(Some(Ok(chunk))) => out.extend_from_slice(&chunk),
                Ok(Some(Err(e))) => return Err(self.transport_error(req, &e)),
                Ok(None) => break,
                Err(_) => {
                    return Err(self.error(req, ErrorKind::Timeout).with_message(format!(
                        "the answer's body stalled for {} s (--stall-timeout)",
                        stall.as_secs_f64()
                    )))
                }
            }
        }
        self.stats
            .bytes_received
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(out.freeze())
    }

    async fn error_from_response(&self, req: &Request<'_>, resp: reqwest::Response) -> ClientError {
        let status = resp.status();
        let bucket_region = resp
            .headers()
            .get("x-amz-bucket-region")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let header_request_id = header_string(resp.headers(), "x-amz-request-id");
        let content_type = header_string(resp.headers(), "content-type");
        let text = if req.method == Method::HEAD {
            String::new()
        } else {
            self.body_bytes(req, resp)
                .await
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        let doc = xml::error_document(&text);
        let mut err = match &doc {
            Some(d) => self
                .error(req, ErrorKind::from_code(&d.code))
                .with_message(d.message.clone()),
            // S3 explains every error with a document (HEAD has no body) or at least a
            // request id; a page without either is some other server's.
            None if !text.trim().is_empty() && header_request_id.is_none() => self
                .error(req, ErrorKind::NotS3)
                .with_message(not_s3_message(content_type.as_deref(), &text)),
            None => self.error(req, ErrorKind::from_status(status.as_u16(), req.op)),
        };
        err.status = Some(status.as_u16());
        // Some S3-compatible stores (Garage) report a bad signature as AccessDenied with an
        // "Invalid signature" message; name it for what it is, so a user is told the secret
        // is wrong rather than that a permission is missing.
        let lowercase = err.message.to_ascii_lowercase();
        if err.kind == ErrorKind::AccessDenied && lowercase.contains("signature") {
            err.kind = ErrorKind::SignatureDoesNotMatch;
        }
        // Garage again: an unknown access key id is "AccessDenied: No such key: GK...".
        if err.kind == ErrorKind::AccessDenied && lowercase.contains("no such key") {
            err.kind = ErrorKind::InvalidAccessKeyId;
        }
        err.request_id = doc.and_then(|d| d.request_id).or(header_request_id);
        if let Some(region) = bucket_region.filter(|r| *r != self.cfg.region) {
            err.kind = ErrorKind::WrongRegion;
            err.message = format!("the bucket is in region {region}; use --region {region}");
        }
        err
    }

    /// For operations whose answer is an XML document: reads it, and treats an `<Error>` root
    /// (S3 may send one with status 200 for Copy and CompleteMultipartUpload) as the error.
    async fn xml_text(&self, req: &Request<'_>) -> Result<String> {
        self.with_retries(req, |resp| async move {
            let content_type = header_string(resp.headers(), "content-type");
            let body = self.body_bytes(req, resp).await?;
            let text = String::from_utf8_lossy(&body).into_owned();
            if !text.trim_start().starts_with('<') || looks_like_html(&text) {
                return Err(self
                    .error(req, ErrorKind::NotS3)
                    .with_status(200)
                    .with_message(not_s3_message(content_type.as_deref(), &text)));
            }
            if let Some(doc) = xml::error_document(&text) {
                let mut e = self
                    .error(req, ErrorKind::from_code(&doc.code))
                    .with_message(doc.message)
                    .with_status(200);
                e.request_id = doc.request_id;
                return Err(e);
            }
            Ok(text)
        })
        .await
    }

    fn invalid_response(&self, req: &Request<'_>, what: impl std::fmt::Display) -> ClientError {
        self.error(req, ErrorKind::InvalidResponse)
            .with_message(what.to_string())
    }

    fn parse_xml<T>(
        &self,
        req: &Request<'_>,
        parsed: std::result::Result<T, xml::XmlError>,
    ) -> Result<T> {
        parsed.map_err(|e| self.invalid_response(req, e))
    }

    /// Sends a request with no interesting answer body, retrying as needed; returns the
    /// response headers.
    async fn headers_of(&self, req: &Request<'_>) -> Result<HeaderMap> {
        self.with_retries(req, |resp| async move {
            let headers = resp.headers().clone();
            // Drain so the connection can be reused.
            self.body_bytes(req, resp).await?;
            Ok(headers)
        })
        .await
    }

    fn etag_header(&self, req: &Request<'_>, headers: &HeaderMap) -> Result<String> {
        header_string(headers, "etag").ok_or_else(|| self.invalid_response(req, "no ETag header"))
    }
}

fn digest_body(data: PutBody, checksum: Checksum, with_md5: bool) -> std::io::Result<PreparedBody> {
    let mut sha = (checksum == Checksum::Sha256).then(Sha256::new);
    let mut crc = (checksum == Checksum::Crc32c).then_some(0u32);
    let mut md5 = with_md5.then(Md5::new);
    data.for_each_chunk(|bytes| {
        if let Some(h) = sha.as_mut() {
            sha2::Digest::update(h, bytes);
        }
        if let Some(c) = crc.as_mut() {
            *c = crc32c::crc32c_append(*c, bytes);
        }
        if let Some(m) = md5.as_mut() {
            m.update(bytes);
        }
    })?;
    Ok(PreparedBody {
        data,
        sha256_hex: sha.map(|h| hex::encode(sha2::Digest::finalize(h))),
        md5_base64: md5.map(|m| base64::engine::general_purpose::STANDARD.encode(m.finalize())),
        crc32c: crc,
    })
}

fn checksum_of(v: u8) -> Checksum {
    Checksum::ALL
        .into_iter()
        .find(|c| *c as u8 == v)
        .unwrap_or_default()
}

/// Whether `authority` (`host[:port]`) names this machine: nobody else is on that path.
fn loopback_authority(authority: &str) -> bool {
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether an UploadPart was refused because its checksum did not match: AWS says
/// BadDigest; other stores say InvalidDigest, XAmzContentChecksumMismatch or InvalidRequest
/// with a message about the checksum.
fn refused_for_checksum(e: &ClientError) -> bool {
    let code = match &e.kind {
        ErrorKind::Other(code) => code.as_str(),
        _ => "",
    };
    let message = e.message.to_ascii_lowercase();
    e.status.is_some_and(|s| s == 400 || s == 422)
        && (["BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch"].contains(&code)
            || message.contains("checksum")
            || message.contains("crc32c")
            || message.contains("digest"))
}

fn looks_like_html(text: &str) -> bool {
    let start: String = text.trim_start().chars().take(15).collect();
    let start = start.to_ascii_lowercase();
    start.starts_with("<!doctype html") || start.starts_with("<html")
}

/// Says what came back instead of S3's answer, with its first bytes (never a secret: it is
/// what the server sent).
fn not_s3_message(content_type: Option<&str>, body: &str) -> String {
    let snippet: String = body.chars().filter(|c| !c.is_control()).take(80).collect();
    format!(
        "the answer is not from S3 ({} body without an S3 error document or request id: {snippet:?}); check --endpoint-url",
        content_type.unwrap_or("untyped")
    )
}

fn header_string(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// `If-None-Match: *` or `If-Match` of a conditional write.
fn condition_headers<'a>(req: Request<'a>, condition: Condition<'_>) -> Request<'a> {
    match condition {
        Condition::None => req,
        Condition::Absent => req.header("if-none-match", "*"),
        Condition::Etag(etag) => req.header("if-match", etag),
    }
}

fn attribute_headers<'a>(
    mut req: Request<'a>,
    attrs: &ObjectAttributes,
    defaults: &WriteDefaults,
) -> Request<'a> {
    if let Some(ct) = &attrs.content_type {
        req = req.header("content-type", ct.clone());
    }
    for (name, v) in attrs.content.pairs() {
        req = req.header(name, v.clone());
    }
    for (k, v) in &attrs.metadata {
        req = req.header(&format!("x-amz-meta-{}", k.to_ascii_lowercase()), v.clone());
    }
    storage_headers(req, attrs, defaults)
}

/// Storage class, encryption and ACL of an object being created: the object's own (`attrs`,
/// when the core carries them over from a HEAD) or else the mount's defaults.
fn storage_headers<'a>(
    mut req: Request<'a>,
    attrs: &ObjectAttributes,
    defaults: &WriteDefaults,
) -> Request<'a> {
    if let Some(sc) = attrs
        .storage_class
        .as_ref()
        .or(defaults.storage_class.as_ref())
    {
        req = req.header("x-amz-storage-class", sc.clone());
    }
    match attrs.sse.as_ref().or(defaults.sse.as_ref()) {
        Some(ServerSideEncryption::S3Managed) => {
            req = req.header("x-amz-server-side-encryption", "AES256");
        }
        Some(ServerSideEncryption::Kms { key_id }) => {
            req = req.header("x-amz-server-side-encryption", "aws:kms");
            if let Some(id) = key_id {
                req = req.header("x-amz-server-side-encryption-aws-kms-key-id", id.clone());
            }
        }
        Some(ServerSideEncryption::KmsDsse { key_id }) => {
            req = req.header("x-amz-server-side-encryption", "aws:kms:dsse");
            if let Some(id) = key_id {
                req = req.header("x-amz-server-side-encryption-aws-kms-key-id", id.clone());
            }
        }
        None => {}
    }
    if let Some(acl) = &defaults.acl {
        req = req.header("x-amz-acl", acl.clone());
    }
    req
}

fn head_from_headers(headers: &HeaderMap, status: StatusCode) -> Option<(ObjectHead, Range<u64>)> {
    let content_length: u64 = header_string(headers, "content-length")?.parse().ok()?;
    let (range, size) = match header_string(headers, "content-range") {
        Some(cr) if status == StatusCode::PARTIAL_CONTENT => parse_content_range(&cr)?,
        _ => (0..content_length, content_length),
    };
    let metadata = headers
        .iter()
        .filter_map(|(k, v)| {
            let name = k.as_str().strip_prefix("x-amz-meta-")?;
            Some((
                name.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            ))
        })
        .collect();
    let sse = match header_string(headers, "x-amz-server-side-encryption").as_deref() {
        Some("AES256") => Some(ServerSideEncryption::S3Managed),
        Some("aws:kms") => Some(ServerSideEncryption::Kms {
            key_id: header_string(headers, "x-amz-server-side-encryption-aws-kms-key-id"),
        }),
        Some("aws:kms:dsse") => Some(ServerSideEncryption::KmsDsse {
            key_id: header_string(headers, "x-amz-server-side-encryption-aws-kms-key-id"),
        }),
        _ => None,
    };
    let head = ObjectHead {
        size,
        etag: header_string(headers, "etag").unwrap_or_default(),
        last_modified: header_string(headers, "last-modified")
            .and_then(|t| httpdate::parse_http_date(&t).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH),
        content_type: header_string(headers, "content-type"),
        content: ContentHeaders::from_lookup(|name| header_string(headers, name)),
        metadata,
        storage_class: header_string(headers, "x-amz-storage-class"),
        sse,
    };
    Some((head, range))
}

/// `bytes START-END/TOTAL` → (START..END+1, TOTAL).
fn parse_content_range(value: &str) -> Option<(Range<u64>, u64)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (start, end) = span.split_once('-')?;
    let start: u64 = start.parse().ok()?;
    let end: u64 = end.parse().ok()?;
    let total: u64 = total.parse().ok()?;
    (start <= end && end < total).then_some((start..end + 1, total))
}

/// The body of a GET as it arrives, resumed where it broke.
///
/// A connection that resets, closes early or stalls (no data for the stall timeout) in the
/// middle of a body does not fail the reader: a new ranged GET asks for the rest, from the byte
/// where the body broke, with `If-Match` on the ETag of the version being read, so the bytes
/// joined are always of one version (a replaced object ends the read with PreconditionFailed).
/// Resumptions follow the retry policy; the budget starts again whenever bytes arrive, so a
/// long body on a flaky link goes on as long as it makes progress.
struct GetBody {
    client: S3Client,
    key: String,
    /// The version being read; without one (a server that sends no ETag) a broken body
    /// cannot be resumed safely and fails.
    etag: Option<String>,
    start: u64,
    pos: u64,
    end: u64,
    chunks: futures_util::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    backoff: super::retry::Backoff,
    /// When the body broke, if it is broken now.
    broken_since: Option<Instant>,
}

impl GetBody {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        let stall = self.client.cfg.stall_timeout;
        loop {
            if self.pos >= self.end {
                return Ok(None);
            }
            let (kind, why) = match tokio::time::timeout(stall, self.chunks.next()).await {
                Ok(Some(Ok(bytes))) => {
                    // Anything past the range asked for is not ours to return.
                    let take = bytes.len().min((self.end - self.pos) as usize);
                    if take == 0 {
                        continue;
                    }
                    self.pos += take as u64;
                    self.client
                        .stats
                        .bytes_received
                        .fetch_add(take as u64, Ordering::Relaxed);
                    if self.broken_since.take().is_some() {
                        self.backoff = self.client.cfg.retry.backoff();
                    }
                    return Ok(Some(bytes.slice(..take)));
                }
                Ok(Some(Err(e))) => (
                    if e.is_timeout() {
                        ErrorKind::Timeout
                    } else {
                        ErrorKind::Transport
                    },
                    error_chain(&e),
                ),
                Ok(None) => (
                    ErrorKind::Transport,
                    "the connection closed early".to_string(),
                ),
                Err(_) => (
                    ErrorKind::Timeout,
                    format!("no data for {} s (--stall-timeout)", stall.as_secs_f64()),
                ),
            };
            self.resume(kind, why).await?;
        }
    }

    /// Replaces the broken stream with a GET of the rest, or says why it cannot.
    async fn resume(&mut self, kind: ErrorKind, why: String) -> Result<()> {
        let since = *self.broken_since.get_or_insert_with(Instant::now);
        let broken = |attempts: u32| {
            let mut e = ClientError::new(
                Operation::GetObject,
                &self.client.cfg.bucket,
                Some(&self.key),
                kind.clone(),
            )
            .with_message(format!(
                "the body broke after {} of {} bytes: {why}",
                self.pos - self.start,
                self.end - self.start
            ));
            e.attempts = attempts;
            e
        };
        let Some(etag) = self.etag.clone() else {
            return Err(broken(1));
        };
        let Some(delay) = self.backoff.next_delay(since.elapsed()) else {
            return Err(broken(self.backoff.attempts()));
        };
        self.client.stats.count_retry();
        tracing::warn!(
            key = self.key,
            at = self.pos,
            retry_in = ?delay,
            "a GET body broke ({why}); resuming from where it broke"
        );
        tokio::time::sleep(delay).await;
        let req = Request::new(Operation::GetObject, Method::GET, Some(&self.key))
            .header("range", format!("bytes={}-{}", self.pos, self.end - 1))
            .header("if-match", etag);
        let resp = self
            .client
            .with_retries(&req, |resp| async move { Ok(resp) })
            .await?;
        let resumed_at = head_from_headers(resp.headers(), resp.status())
            .filter(|_| resp.status() == StatusCode::PARTIAL_CONTENT)
            .map(|(_, range)| range.start);
        if resumed_at != Some(self.pos) {
            return Err(self.client.invalid_response(
                &req,
                format!(
                    "asked to resume at byte {}, the server answered {} from {resumed_at:?}",
                    self.pos,
                    resp.status()
                ),
            ));
        }
        self.chunks = resp.bytes_stream().boxed();
        Ok(())
    }
}

/// An error and its sources, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

impl ObjectClient for S3Client {
    fn bucket(&self) -> &str {
        &self.cfg.bucket
    }

    async fn list_objects(&self, list: &ListRequest<'_>) -> Result<ListPage> {
        let mut req = Request::new(Operation::ListObjectsV2, Method::GET, None)
            .query("list-type", "2")
            .query("encoding-type", "url")
            .query("prefix", list.prefix);
        if let Some(d) = list.delimiter {
            req = req.query("delimiter", d);
        }
        if let Some(t) = list.continuation_token {
            req = req.query("continuation-token", t);
        }
        if let Some(s) = list.start_after {
            req = req.query("start-after", s);
        }
        if let Some(m) = list.max_keys {
            req = req.query("max-keys", m.to_string());
        }
        let text = self.xml_text(&req).await?;
        self.parse_xml(&req, xml::list_objects(&text, true))
    }

    async fn head_object(&self, key: &str) -> Result<ObjectHead> {
        let req = Request::new(Operation::HeadObject, Method::HEAD, Some(key));
        let headers = self.headers_of(&req).await?;
        head_from_headers(&headers, StatusCode::OK)
            .map(|(head, _)| head)
            .ok_or_else(|| self.invalid_response(&req, "HEAD answer without Content-Length"))
    }

    async fn get_object(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        if_match: Option<&str>,
    ) -> Result<GetObjectOutput> {
        let mut req = Request::new(Operation::GetObject, Method::GET, Some(key));
        if let Some(r) = &range {
            if r.is_empty() {
                return Err(self
                    .error(&req, ErrorKind::InvalidRequest)
                    .with_message(format!("empty range {r:?}")));
            }
            req = req.header("range", format!("bytes={}-{}", r.start, r.end - 1));
        }
        if let Some(etag) = if_match {
            req = req.header("if-match", etag.to_string());
        }
        let resp = self
            .with_retries(&req, |resp| async move { Ok(resp) })
            .await?;
        let (head, body_range) = head_from_headers(resp.headers(), resp.status())
            .ok_or_else(|| self.invalid_response(&req, "GET answer without Content-Length"))?;
        // The version to resume from: the one asked for, else the one that answered.
        let etag = if_match
            .map(str::to_string)
            .or_else(|| (!head.etag.is_empty()).then(|| head.etag.clone()));
        let body = GetBody {
            client: self.clone(),
            key: key.to_string(),
            etag,
            start: body_range.start,
            pos: body_range.start,
            end: body_range.end,
            chunks: resp.bytes_stream().boxed(),
            backoff: self.cfg.retry.backoff(),
            broken_since: None,
        };
        let stream = futures_util::stream::unfold(Some(body), |body| async move {
            let mut body = body?;
            match body.next_chunk().await {
                Ok(Some(bytes)) => Some((Ok(bytes), Some(body))),
                Ok(None) => None,
                // After an error the stream ends: the caller has its answer.
                Err(e) => Some((Err(e), None)),
            }
        });
        Ok(GetObjectOutput {
            head,
            range: body_range,
            body: ObjectBody::from_stream(stream),
        })
    }

    async fn put_object_if(
        &self,
        key: &str,
        body: PutBody,
        attrs: &ObjectAttributes,
        condition: Condition<'_>,
    ) -> Result<String> {
        let body = self.prepare_data(body, self.upload_checksum()).await?;
        let req = condition_headers(
            attribute_headers(
                Request::new(Operation::PutObject, Method::PUT, Some(key)),
                attrs,
                &self.cfg.write,
            ),
            condition,
        )
        .body(body);
        let headers = self.headers_of(&req).await?;
        self.etag_header(&req, &headers)
    }

    async fn delete_object(&self, key: &str) -> Result<()> {
        let req = Request::new(Operation::DeleteObject, Method::DELETE, Some(key));
        self.headers_of(&req).await.map(drop)
    }

    async fn delete_objects(&self, keys: &[String]) -> Result<DeleteObjectsOutput> {
        let body = Bytes::from(xml::delete_objects_body(keys));
        let md5 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(&body));
        let body = self.prepare(PutBody::Bytes(body)).await?;
        let req = Request::new(Operation::DeleteObjects, Method::POST, None)
            .query("delete", "")
            .header("content-md5", md5)
            .header("content-type", "application/xml")
            .body(body);
        let text = self.xml_text(&req).await?;
        self.parse_xml(&req, xml::delete_objects_result(&text))
    }

    async fn copy_object(
        &self,
        source_key: &str,
        dest_key: &str,
        directive: &MetadataDirective,
    ) -> Result<String> {
        let source = format!(
            "/{}/{}",
            self.cfg.bucket,
            sigv4::uri_encode_path(source_key)
        );
        let mut req = Request::new(Operation::CopyObject, Method::PUT, Some(dest_key))
            .header("x-amz-copy-source", source);
        req = match directive {
            MetadataDirective::Copy => storage_headers(
                req.header("x-amz-metadata-directive", "COPY"),
                &ObjectAttributes::default(),
                &self.cfg.write,
            ),
            MetadataDirective::Keep(attrs) => storage_headers(
                req.header("x-amz-metadata-directive", "COPY"),
                attrs,
                &self.cfg.write,
            ),
            MetadataDirective::Replace(attrs) => attribute_headers(
                req.header("x-amz-metadata-directive", "REPLACE"),
                attrs,
                &self.cfg.write,
            ),
        };
        let text = self.xml_text(&req).await?;
        self.parse_xml(&req, xml::etag_of(&text))
    }

    fn upload_checksum(&self) -> Checksum {
        checksum_of(self.checksum.load(Ordering::Relaxed))
    }

    async fn create_multipart_upload(
        &self,
        key: &str,
        attrs: &ObjectAttributes,
        checksum: Checksum,
    ) -> Result<String> {
        let mut req = attribute_headers(
            Request::new(Operation::CreateMultipartUpload, Method::POST, Some(key))
                .query("uploads", ""),
            attrs,
            &self.cfg.write,
        );
        if checksum == Checksum::Crc32c {
            req = req.header("x-amz-checksum-algorithm", "CRC32C");
        }
        let text = self.xml_text(&req).await?;
        self.parse_xml(&req, xml::initiate_multipart_upload(&text))
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        body: PutBody,
        checksum: Checksum,
    ) -> Result<StoredPart> {
        let body = self.prepare_data(body, checksum).await?;
        let (sha256_hex, crc32c) = (body.sha256_hex.clone(), body.crc32c);
        let req = Request::new(Operation::UploadPart, Method::PUT, Some(key))
            .query("partNumber", part_number.to_string())
            .query("uploadId", upload_id)
            .body(body);
        let headers = self.headers_of(&req).await?;
        Ok(StoredPart {
            etag: self.etag_header(&req, &headers)?,
            sha256_hex,
            crc32c,
        })
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u32,
        source: CopySource<'_>,
    ) -> Result<String> {
        let path = format!(
            "/{}/{}",
            self.cfg.bucket,
            sigv4::uri_encode_path(source.key)
        );
        let mut req = Request::new(Operation::UploadPartCopy, Method::PUT, Some(key))
            .query("partNumber", part_number.to_string())
            .query("uploadId", upload_id)
            .header("x-amz-copy-source", path);
        if let Some((start, end)) = source.range {
            if start >= end {
                return Err(self
                    .error(&req, ErrorKind::InvalidRequest)
                    .with_message(format!("empty source range {start}..{end}")));
            }
            req = req.header(
                "x-amz-copy-source-range",
                format!("bytes={start}-{}", end - 1),
            );
        }
        if let Some(etag) = source.if_match {
            req = req.header("x-amz-copy-source-if-match", etag.to_string());
        }
        let text = self.xml_text(&req).await?;
        self.parse_xml(&req, xml::etag_of(&text))
    }

    async fn complete_multipart_upload_if(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        condition: Condition<'_>,
    ) -> Result<String> {
        let body = self
            .prepare(PutBody::Bytes(Bytes::from(
                xml::complete_multipart_upload_body(parts),
            )))
            .await?;
        let req = condition_headers(
            Request::new(Operation::CompleteMultipartUpload, Method::POST, Some(key))
                .query("uploadId", upload_id)
                .header("content-type", "application/xml"),
            condition,
        )
        .body(body);
        let text = self.xml_text(&req).await?;
        self.parse_xml(&req, xml::etag_of(&text))
    }

    async fn abort_multipart_upload(&self, key: &str, upload_id: &str) -> Result<()> {
        let req = Request::new(Operation::AbortMultipartUpload, Method::DELETE, Some(key))
            .query("uploadId", upload_id);
        self.headers_of(&req).await.map(drop)
    }

    async fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
        part_number_marker: Option<u32>,
    ) -> Result<ListPartsPage> {
        let mut req =
            Request::new(Operation::ListParts, Method::GET, Some(key)).query("uploadId", upload_id);
        if let Some(m) = part_number_marker {
            req = req.query("part-number-marker", m.to_string());
        }
        let text = self.xml_text(&req).await?;
        self.parse_xml(&req, xml::list_parts(&text))
    }

    async fn list_multipart_uploads(
        &self,
        prefix: &str,
        marker: Option<(&str, &str)>,
    ) -> Result<ListUploadsPage> {
        let mut req = Request::new(Operation::ListMultipartUploads, Method::GET, None)
            .query("uploads", "")
            .query("encoding-type", "url")
            .query("prefix", prefix);
        if let Some((key_marker, upload_marker)) = marker {
            req = req
                .query("key-marker", key_marker)
                .query("upload-id-marker", upload_marker);
        }
        let text = self.xml_text(&req).await?;
        self.parse_xml(&req, xml::list_multipart_uploads(&text, true))
    }

    async fn head_bucket(&self) -> Result<()> {
        let req = Request::new(Operation::HeadBucket, Method::HEAD, None);
        self.headers_of(&req).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(endpoint: Option<&str>, bucket: &str, addressing: Addressing) -> ClientConfig {
        let mut c = ClientConfig::new(bucket, "eu-west-1", Auth::Anonymous);
        c.endpoint_url = endpoint.map(str::to_string);
        c.addressing = addressing;
        c
    }

    #[test]
    fn addressing_choices() {
        let aws = Endpoint::resolve(&cfg(None, "my-bucket", Addressing::Auto)).unwrap();
        assert_eq!(aws.authority, "my-bucket.s3.eu-west-1.amazonaws.com");
        assert_eq!(aws.path(Some("a b/c")), "/a%20b/c");
        assert_eq!(aws.path(None), "/");

        let dotted = Endpoint::resolve(&cfg(None, "my.bucket", Addressing::Auto)).unwrap();
        assert_eq!(dotted.authority, "s3.eu-west-1.amazonaws.com");
        assert_eq!(dotted.path(Some("k")), "/my.bucket/k");

        let local = Endpoint::resolve(&cfg(Some("http://127.0.0.1:3900"), "b-1", Addressing::Auto))
            .unwrap();
        assert_eq!(local.authority, "127.0.0.1:3900");
        assert_eq!(local.path(None), "/b-1");
        assert_eq!(local.path(Some("x")), "/b-1/x");

        let forced = Endpoint::resolve(&cfg(
            Some("https://minio.example:9000/"),
            "bkt",
            Addressing::VirtualHosted,
        ))
        .unwrap();
        assert_eq!(forced.authority, "bkt.minio.example:9000");
        let default_port = Endpoint::resolve(&cfg(
            Some("https://minio.example:443"),
            "bkt",
            Addressing::Path,
        ))
        .unwrap();
        assert_eq!(default_port.authority, "minio.example");
    }

    #[test]
    fn bad_endpoints_and_buckets_are_refused() {
        assert!(matches!(
            Endpoint::resolve(&cfg(Some("ftp://x"), "bkt", Addressing::Auto)),
            Err(ConfigError::BadEndpoint(_))
        ));
        assert!(matches!(
            Endpoint::resolve(&cfg(Some("http://x/base?a=b"), "bkt", Addressing::Auto)),
            Err(ConfigError::EndpointWithQuery(_))
        ));
        assert!(matches!(
            Endpoint::resolve(&cfg(None, "Bad_Bucket", Addressing::Auto)),
            Err(ConfigError::BadBucket(_))
        ));
    }

    #[test]
    fn endpoint_with_a_path_prefix() {
        let path = Endpoint::resolve(&cfg(
            Some("https://gw.example.com/s3/"),
            "bkt",
            Addressing::Auto,
        ))
        .unwrap();
        assert_eq!(path.authority, "gw.example.com");
        assert_eq!(path.path(None), "/s3/bkt");
        assert_eq!(path.path(Some("a b/c")), "/s3/bkt/a%20b/c");
        let virt = Endpoint::resolve(&cfg(
            Some("https://s3.example.com/gw/v1"),
            "bkt",
            Addressing::VirtualHosted,
        ))
        .unwrap();
        assert_eq!(virt.authority, "bkt.s3.example.com");
        assert_eq!(virt.path(None), "/gw/v1/");
        assert_eq!(virt.path(Some("k")), "/gw/v1/k");
        // The prefix is part of what is signed: the URL a presigned request uses carries it.
        let mut c = cfg(Some("http://127.0.0.1:9000/s3"), "bkt", Addressing::Auto);
        c.auth = Auth::Signed(Credentials::new("AKID", "secret", None));
        let client = S3Client::new(c).unwrap();
        let url = client
            .presigned_url(
                "GET",
                "k",
                Duration::from_secs(60),
                OffsetDateTime::UNIX_EPOCH,
            )
            .unwrap();
        assert!(url.starts_with("http://127.0.0.1:9000/s3/bkt/k?"), "{url}");
        assert_eq!(client.bucket_url(), "http://127.0.0.1:9000/s3/bkt");
    }

    #[test]
    fn production_headers() {
        let defaults = WriteDefaults {
            sse: Some(ServerSideEncryption::Kms {
                key_id: Some("alias/k".into()),
            }),
            storage_class: Some("STANDARD_IA".into()),
            acl: Some("bucket-owner-full-control".into()),
        };
        let header = |r: &Request<'_>, name: &str| {
            r.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let put = attribute_headers(
            Request::new(Operation::PutObject, Method::PUT, Some("k")),
            &ObjectAttributes::default(),
            &defaults,
        );
        assert_eq!(
            header(&put, "x-amz-server-side-encryption").as_deref(),
            Some("aws:kms")
        );
        assert_eq!(
            header(&put, "x-amz-server-side-encryption-aws-kms-key-id").as_deref(),
            Some("alias/k")
        );
        assert_eq!(
            header(&put, "x-amz-storage-class").as_deref(),
            Some("STANDARD_IA")
        );
        assert_eq!(
            header(&put, "x-amz-acl").as_deref(),
            Some("bucket-owner-full-control")
        );
        // An object's own encryption and class win over the defaults.
        let own = ObjectAttributes {
            storage_class: Some("GLACIER_IR".into()),
            sse: Some(ServerSideEncryption::KmsDsse { key_id: None }),
            ..Default::default()
        };
        let copy = storage_headers(
            Request::new(Operation::CopyObject, Method::PUT, Some("k")),
            &own,
            &defaults,
        );
        assert_eq!(
            header(&copy, "x-amz-storage-class").as_deref(),
            Some("GLACIER_IR")
        );
        assert_eq!(
            header(&copy, "x-amz-server-side-encryption").as_deref(),
            Some("aws:kms:dsse")
        );
        assert_eq!(
            header(&copy, "x-amz-server-side-encryption-aws-kms-key-id"),
            None
        );
    }

    #[test]
    fn content_range_parsing() {
        assert_eq!(parse_content_range("bytes 0-9/100"), Some((0..10, 100)));
        assert_eq!(parse_content_range("bytes 5-4/100"), None);
        assert_eq!(parse_content_range("bytes 0-100/100"), None);
        assert_eq!(parse_content_range("bytes */100"), None);
    }
}
