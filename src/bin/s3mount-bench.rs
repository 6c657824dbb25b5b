//! `s3mount-bench`: our S3 client without FUSE, for benchmarks and test set-up.
//!
//! - `put KEY SIZE [SEED]`: uploads SIZE bytes of deterministic data (multipart, parts in
//!   parallel); prints `MiB/s`.
//! - `put-file KEY PATH`: uploads a local file the same way.
//! - `get KEY [--sha256]`: downloads the whole object with parallel ranged GETs, the way the
//!   mount's prefetcher does; prints `MiB/s` (and the SHA-256).
//! - `first-byte KEY`: time to the first byte of a GET, in milliseconds.
//! - `put-many PREFIX COUNT SIZE`: uploads COUNT objects of SIZE bytes, 64 at a time.
//! - `du PREFIX`: prints the number of objects under PREFIX and their total size.
//! - `list-time PREFIX [MAX_KEYS]`: times five one-page listings (delimiter `/`).
//! - `delete-prefix PREFIX`: deletes every key under PREFIX.
//! - `hash-speed`: single-core throughput of the digests an upload can carry (SHA-256, which
//!   the client signs, CRC32C, and MD5 for comparison); needs no server.
//!
//! Uploads are protected as the mount's would be: S3MOUNT_UPLOAD_CHECKSUMS (`auto`, `crc32c`,
//! `sha256`, `off`; default `auto`) as `--upload-checksums`, with the same probe.
//!
//! The server comes from S3MOUNT_TEST_ENDPOINT, S3MOUNT_TEST_BUCKET, S3MOUNT_TEST_REGION and
//! S3MOUNT_TEST_ACCESS_KEY_ID / S3MOUNT_TEST_SECRET_ACCESS_KEY (or AWS_ACCESS_KEY_ID /
//! AWS_SECRET_ACCESS_KEY).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use s3mount::s3::*;
use sha2::Digest;

const PART: u64 = 8 * 1024 * 1024;
const CONCURRENCY: usize = 8;

/// Every object under `prefix`, through all the listing's pages.
async fn list_all(c: &S3Client, prefix: &str) -> Result<Vec<ObjectInfo>, String> {
    let mut objects = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = c
            .list_objects(&ListRequest {
                prefix,
                continuation_token: token.as_deref(),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        objects.extend(page.objects);
        match page.next_continuation_token {
            Some(t) => token = Some(t),
            None => return Ok(objects),
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn client() -> Result<S3Client, String> {
    let need = |n: &str| env(n).ok_or_else(|| format!("{n} is not set"));
    let key_id = env("S3MOUNT_TEST_ACCESS_KEY_ID")
        .or_else(|| env("AWS_ACCESS_KEY_ID"))
        .ok_or("no access key id")?;
    let secret = env("S3MOUNT_TEST_SECRET_ACCESS_KEY")
        .or_else(|| env("AWS_SECRET_ACCESS_KEY"))
        .ok_or("no secret key")?;
    let region = env("S3MOUNT_TEST_REGION").unwrap_or_else(|| "us-east-1".into());
    let mut cfg = ClientConfig::new(
        &need("S3MOUNT_TEST_BUCKET")?,
        &region,
        Auth::Signed(Credentials::new(&key_id, &secret, None)),
    );
    cfg.endpoint_url = Some(need("S3MOUNT_TEST_ENDPOINT")?);
    if let Some(v) = env("S3MOUNT_UPLOAD_CHECKSUMS") {
        cfg.upload_checksums = ChecksumChoice::parse(&v)
            .ok_or_else(|| format!("S3MOUNT_UPLOAD_CHECKSUMS={v}: auto, crc32c, sha256 or off"))?;
    }
    S3Client::new(cfg).map_err(|e| e.to_string())
}

/// Settles what uploads carry, as a mount does.
async fn probe_checksums(c: &S3Client) {
    if c.wants_crc32c() {
        let key = format!(".s3mount-bench-probe-{:016x}", fastrand::u64(..));
        if let Err(why) = c.probe_crc32c(&key).await {
            eprintln!("uploads carry SHA-256: the server does not check CRC32C ({why})");
        }
    }
}

fn pattern_part(seed: u64, index: u64, len: usize) -> Bytes {
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(1_000_003).wrapping_add(index));
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    Bytes::from(v)
}

async fn upload(
    c: Arc<S3Client>,
    key: &str,
    size: u64,
    part: impl Fn(u64, usize) -> Result<Bytes, String> + Send + Sync + 'static,
) -> Result<(), String> {
    if size <= PART {
        let body = part(0, size as usize)?;
        c.put_object(key, PutBody::Bytes(body), &ObjectAttributes::default())
            .await
            .map_err(|e| e.to_string())?;
        return Ok(());
    }
    let checksum = c.upload_checksum();
    let id = c
        .create_multipart_upload(key, &ObjectAttributes::default(), checksum)
        .await
        .map_err(|e| e.to_string())?;
    let part = Arc::new(part);
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..size.div_ceil(PART) {
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (c, key, id, part) = (c.clone(), key.to_string(), id.clone(), part.clone());
        let len = (size - i * PART).min(PART) as usize;
        tasks.spawn(async move {
            let _permit = permit;
            let body = part(i, len)?;
            let stored = c
                .upload_part(&key, &id, i as u32 + 1, PutBody::Bytes(body), checksum)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(CompletedPart {
                part_number: i as u32 + 1,
                etag: stored.etag,
                crc32c: stored.crc32c,
            })
        });
    }
    let mut parts = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(p) => parts.push(p),
            Err(e) => {
                let _ = c.abort_multipart_upload(key, &id).await;
                return Err(e);
            }
        }
    }
    parts.sort_by_key(|p| p.part_number);
    c.complete_multipart_upload(key, &id, &parts)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

async fn download(
    c: Arc<S3Client>,
    key: &str,
    want_hash: bool,
) -> Result<(u64, Option<String>), String> {
    let head = c.head_object(key).await.map_err(|e| e.to_string())?;
    let size = head.size;
    let mut hasher = want_hash.then(sha2::Sha256::new);
    let mut pending = std::collections::VecDeque::new();
    let mut next = 0u64;
    let spawn = |start: u64| {
        let (c, key, etag) = (c.clone(), key.to_string(), head.etag.clone());
        let end = (start + PART).min(size);
        tokio::spawn(async move {
            let out = c.get_object(&key, Some(start..end), Some(&etag)).await?;
            out.body.collect((end - start) as usize).await
        })
    };
    while next < size && pending.len() < CONCURRENCY {
        pending.push_back(spawn(next));
        next += PART;
    }
    let mut total = 0u64;
    while let Some(task) = pending.pop_front() {
        let data = task
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        total += data.len() as u64;
        if let Some(h) = hasher.as_mut() {
            h.update(&data);
        }
        if next < size {
            pending.push_back(spawn(next));
            next += PART;
        }
    }
    Ok((total, hasher.map(|h| hex::encode(h.finalize()))))
}

fn hash_speed() {
    let data = pattern_part(3, 0, 256 << 20);
    let time = |name: &str, f: &dyn Fn(&[u8])| {
        let started = Instant::now();
        for _ in 0..4 {
            f(&data);
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{name}: {:.0} MiB/s per core ({:.2} CPU-s per GiB)",
            1024.0 / secs,
            secs
        );
    };
    time("SHA-256", &|d| {
        std::hint::black_box(sha2::Sha256::digest(d));
    });
    time("CRC32C", &|d| {
        std::hint::black_box(crc32c::crc32c(d));
    });
    time("MD5", &|d| {
        std::hint::black_box(md5::Md5::digest(d));
    });
}

async fn run(args: Vec<String>) -> Result<(), String> {
    if args.first().map(String::as_str) == Some("hash-speed") {
        hash_speed();
        return Ok(());
    }
    let c = Arc::new(client()?);
    let arg = |i: usize| {
        args.get(i)
            .cloned()
            .ok_or_else(|| "missing argument (see the source's header)".to_string())
    };
    if ["put", "put-file", "put-many"].contains(&arg(0)?.as_str()) {
        probe_checksums(&c).await;
    }
    let started = Instant::now();
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0) / started.elapsed().as_secs_f64();
    match arg(0)?.as_str() {
        "put" => {
            let size = s3mount::cli::parse_size(&arg(2)?)?;
            let seed: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
            upload(c, &arg(1)?, size, move |i, len| {
                Ok(pattern_part(seed, i, len))
            })
            .await?;
            println!("{:.1} MiB/s", mib(size));
        }
        "put-file" => {
            let path = arg(2)?;
            let file = Arc::new(std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?);
            let size = file.metadata().map_err(|e| e.to_string())?.len();
            upload(c, &arg(1)?, size, move |i, len| {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, i * PART)
                    .map_err(|e| e.to_string())?;
                Ok(Bytes::from(buf))
            })
            .await?;
            println!("{:.1} MiB/s", mib(size));
        }
        "get" => {
            let (bytes, hash) = download(c, &arg(1)?, args.iter().any(|a| a == "--sha256")).await?;
            println!("{:.1} MiB/s", mib(bytes));
            if let Some(h) = hash {
                println!("{h}");
            }
        }
        "first-byte" => {
            let mut out = c
                .get_object(&arg(1)?, None, None)
                .await
                .map_err(|e| e.to_string())?;
            out.body.next_chunk().await.map_err(|e| e.to_string())?;
            println!("{:.2} ms", started.elapsed().as_secs_f64() * 1000.0);
        }
        "put-many" => {
            let prefix = arg(1)?;
            let count: usize = arg(2)?.parse().map_err(|_| "COUNT is not a number")?;
            let size = s3mount::cli::parse_size(&arg(3)?)? as usize;
            let sem = Arc::new(tokio::sync::Semaphore::new(64));
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..count {
                let permit = sem
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| e.to_string())?;
                let (c, key) = (c.clone(), format!("{prefix}{i:06}"));
                tasks.spawn(async move {
                    let _permit = permit;
                    c.put_object(
                        &key,
                        PutBody::Bytes(pattern_part(7, i as u64, size)),
                        &ObjectAttributes::default(),
                    )
                    .await
                });
            }
            while let Some(r) = tasks.join_next().await {
                r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
            }
            println!(
                "{:.0} objects/s",
                count as f64 / started.elapsed().as_secs_f64()
            );
        }
        "du" => {
            // Counts the objects under PREFIX and their bytes: "COUNT BYTES".
            let objects = list_all(&c, &arg(1)?).await?;
            let bytes: u64 = objects.iter().map(|o| o.size).sum();
            println!("{} {bytes}", objects.len());
        }
        "list-time" => {
            // Times one ListObjectsV2 page under PREFIX with delimiter `/` and MAX keys, 5 times.
            let prefix = arg(1)?;
            let max_keys: Option<u32> = arg(2).ok().and_then(|m| m.parse().ok());
            for _ in 0..5 {
                let t = Instant::now();
                let page = c
                    .list_objects(&ListRequest {
                        prefix: &prefix,
                        delimiter: Some("/"),
                        max_keys,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                println!(
                    "{:.2} ms, {} keys, {} prefixes",
                    t.elapsed().as_secs_f64() * 1000.0,
                    page.objects.len(),
                    page.common_prefixes.len()
                );
            }
        }
        "delete-prefix" => {
            let keys: Vec<String> = list_all(&c, &arg(1)?)
                .await?
                .into_iter()
                .map(|o| o.key)
                .collect();
            for batch in keys.chunks(1000) {
                c.delete_objects(batch).await.map_err(|e| e.to_string())?;
            }
        }
        other => return Err(format!("unknown command {other:?}")),
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("s3mount-bench: {e}");
        std::process::exit(1);
    }
}
