//! Helpers shared by the tests that talk to a real S3 server.
//!
//! The server is named by the environment: `S3MOUNT_TEST_ENDPOINT`, `S3MOUNT_TEST_BUCKET`,
//! `S3MOUNT_TEST_ACCESS_KEY_ID`, `S3MOUNT_TEST_SECRET_ACCESS_KEY`, `S3MOUNT_TEST_REGION`
//! (`scripts/test` starts a local Garage and sets them; point them at MinIO or AWS to run the
//! same tests there). Without them these tests fail with that instruction rather than pass
//! without testing anything.
//!
//! Every test works under a prefix of its own, so tests run in parallel and can be re-run on the
//! same bucket.

#![allow(dead_code)]

pub mod conformance;
pub mod fault_proxy;
pub mod mount;
pub mod standin;

use s3mount::s3::{Addressing, Auth, ClientConfig, Credentials, S3Client};

#[derive(Clone)]
pub struct ServerEnv {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl ServerEnv {
    /// The default test server (Garage, or the user's own endpoint).
    pub fn main() -> Self {
        Self::from_prefix("S3MOUNT_TEST").unwrap_or_else(|| {
            panic!(
                "no test S3 server: run the tests with scripts/test, or set S3MOUNT_TEST_ENDPOINT, \
                 S3MOUNT_TEST_BUCKET, S3MOUNT_TEST_ACCESS_KEY_ID and S3MOUNT_TEST_SECRET_ACCESS_KEY"
            )
        })
    }

    /// The strict-signature server (s3s-fs), when one was started.
    pub fn strict() -> Option<Self> {
        let env = Self::from_prefix("S3MOUNT_STRICT");
        if env.is_none() && var("S3MOUNT_REQUIRE_STRICT").is_some() {
            panic!("S3MOUNT_REQUIRE_STRICT is set but S3MOUNT_STRICT_ENDPOINT is not");
        }
        env
    }

    /// A server named by `<prefix>_ENDPOINT`, `_BUCKET`, `_ACCESS_KEY_ID`, ... if set.
    pub fn from_prefix(prefix: &str) -> Option<Self> {
        let get = |suffix: &str| var(&format!("{prefix}_{suffix}"));
        Some(Self {
            endpoint: get("ENDPOINT")?,
            bucket: get("BUCKET")?,
            region: get("REGION").unwrap_or_else(|| "us-east-1".into()),
            access_key_id: get("ACCESS_KEY_ID").or_else(|| var("AWS_ACCESS_KEY_ID"))?,
            secret_access_key: get("SECRET_ACCESS_KEY").or_else(|| var("AWS_SECRET_ACCESS_KEY"))?,
        })
    }

    pub fn credentials(&self) -> Credentials {
        Credentials::new(&self.access_key_id, &self.secret_access_key, None)
    }

    pub fn config(&self) -> ClientConfig {
        let mut cfg =
            ClientConfig::new(&self.bucket, &self.region, Auth::Signed(self.credentials()));
        cfg.endpoint_url = Some(self.endpoint.clone());
        cfg.addressing = if var("S3MOUNT_TEST_VIRTUAL_HOSTED").is_some() {
            Addressing::VirtualHosted
        } else {
            Addressing::Auto
        };
        cfg
    }

    pub fn client(&self) -> S3Client {
        S3Client::new(self.config()).expect("client config")
    }

    /// `host:port` of the endpoint.
    pub fn authority(&self) -> String {
        let rest = self.endpoint.split("://").nth(1).unwrap_or(&self.endpoint);
        rest.trim_end_matches('/').to_string()
    }
}

/// A prefix no other test (or earlier run) uses: `s3mount-tests/<name>-<random>/`.
pub fn unique_prefix(name: &str) -> String {
    format!("s3mount-tests/{name}-{:016x}/", fastrand::u64(..))
}

/// Deterministic pseudo-random bytes, so a failure can be reproduced.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// The whole object (or `range` of it), read with the client.
pub async fn read_object<C: s3mount::s3::ObjectClient>(
    c: &C,
    key: &str,
    range: Option<std::ops::Range<u64>>,
) -> bytes::Bytes {
    let out = c
        .get_object(key, range, None)
        .await
        .unwrap_or_else(|e| panic!("GET {key}: {e}"));
    let len = (out.range.end - out.range.start) as usize;
    out.body
        .collect(len)
        .await
        .unwrap_or_else(|e| panic!("body of {key}: {e}"))
}

pub fn sha256_hex(data: &[u8]) -> String {
    s3mount::s3::sigv4::sha256_hex(data)
}

/// Writes `len` bytes of [`pattern`]s (seeded from `seed`) to `path`; returns their SHA-256.
pub fn write_pattern_file(path: &std::path::Path, len: u64, seed: u64) -> String {
    use sha2::Digest;
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let mut hasher = sha2::Sha256::new();
    let mut left = len;
    let mut i = 0;
    while left > 0 {
        let n = left.min(8 << 20) as usize;
        let chunk = pattern(n, seed * 1000 + i);
        f.write_all(&chunk).unwrap();
        hasher.update(&chunk);
        left -= n as u64;
        i += 1;
    }
    hex::encode(hasher.finalize())
}

pub fn sha256_of_file(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

pub async fn object_sha256(c: &S3Client, key: &str) -> String {
    sha256_hex(&read_object(c, key, None).await)
}

/// Uploads in progress under `prefix`, once background aborts had a few seconds.
pub async fn uploads_left(c: &S3Client, prefix: &str) -> Vec<s3mount::s3::UploadInfo> {
    use s3mount::s3::ObjectClient;
    let mut left = Vec::new();
    for _ in 0..100 {
        left = c
            .list_multipart_uploads(prefix, None)
            .await
            .unwrap()
            .uploads;
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    left
}

/// `cp FROM TO`, which must succeed (the mount's log tells why not).
pub fn cp(from: &std::path::Path, to: &std::path::Path, m: &mount::Mounted) {
    let out = std::process::Command::new("cp")
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cp {} {}: {}\n--- mount log ---\n{}",
        from.display(),
        to.display(),
        String::from_utf8_lossy(&out.stderr),
        m.log()
    );
}

/// Work running on a thread of its own (a program using the mount), to be waited for within
/// a limit: a hang fails the test with the mount's log instead of holding up the whole suite.
/// When it does, dropping the mount ends the FUSE connection and with it the blocked call.
pub struct Running<T>(std::sync::mpsc::Receiver<std::thread::Result<T>>);

pub fn run<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Running<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)));
    });
    Running(rx)
}

impl<T> Running<T> {
    pub fn wait(self, limit: std::time::Duration, m: &mount::Mounted) -> T {
        match self.0.recv_timeout(limit) {
            Ok(Ok(answer)) => answer,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => panic!(
                "no answer through the mount within {limit:?}\n--- mount log ---\n{}",
                m.log()
            ),
        }
    }
}
