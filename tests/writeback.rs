//! Durable write-back through a real FUSE mount of the real test server: a tree copied in and
//! the mount killed at once is in S3 after the next mount, with its modes and times; a copy
//! through an outage succeeds and is stored once the server is back; a queued write never
//! replaces an object another client changed meanwhile.
//!
//! Sizes are small by default so CI stays quick; `scripts/writeback-suite` runs them at full
//! size (1,000 files, a 30-second outage) through `S3MOUNT_WRITEBACK_FILES` and
//! `S3MOUNT_WRITEBACK_OUTAGE`.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::fault_proxy::proxied;
use common::mount::{mount, report, Mounted, QUICK};
use common::{object_sha256, pattern, sha256_hex, unique_prefix, ServerEnv};
use s3mount::s3::{ObjectAttributes, ObjectClient, PutBody};

fn files() -> usize {
    std::env::var("S3MOUNT_WRITEBACK_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

fn outage() -> Duration {
    let secs = std::env::var("S3MOUNT_WRITEBACK_OUTAGE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(secs)
}

/// The mount's write-back queue, from `s3mount status --json`.
fn queue(m: &Mounted) -> serde_json::Value {
    report(m, "status")["write_back"].clone()
}

/// Waits up to `limit` until the queue is empty; how long that took.
fn drained(m: &Mounted, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let q = queue(m);
        if q["files"].as_u64() == Some(0) {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "still queued: {q}\n{}", m.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `n` files of 4 KiB under `dir`, in two subdirectories, with varied modes and old mtimes.
fn tree(dir: &Path, n: usize) -> Vec<(String, Vec<u8>, u32, i64)> {
    let mut made = Vec::new();
    for sub in ["a", "b"] {
        std::fs::create_dir(dir.join(sub)).unwrap();
    }
    for i in 0..n {
        let rel = format!("{}/f{i:04}", if i % 2 == 0 { "a" } else { "b" });
        let data = pattern(4096, i as u64);
        let path = dir.join(&rel);
        std::fs::write(&path, &data).unwrap();
        let mode = [0o644, 0o600, 0o755][i % 3];
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let mtime = 1_600_000_000 + i as i64 * 61;
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime as u64))
            .unwrap();
        made.push((rel, data, mode, mtime));
    }
    made
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tree_copied_in_is_in_s3_after_the_mount_is_killed_and_mounted_again() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("wb-kill");
    let cache = tempfile::tempdir().unwrap();
    let cache_arg = cache.path().to_str().unwrap().to_string();
    let args = ["--write-back", "--cache-dir", &cache_arg];
    let src = tempfile::tempdir().unwrap();
    let n = files();
    let made = tree(src.path(), n);
    let spec = format!("{}:{prefix}", env.bucket);

    // Through a proxy that stops answering once the directories are made, so nothing of the
    // copy reaches S3 before the kill: the next mount (straight to the server) stores it all.
    let (proxy, through) = proxied(&env).await;
    let mut slow = args.to_vec();
    slow.extend(QUICK);
    let m = mount(&through, &spec, &slow);
    for sub in ["a", "b"] {
        std::fs::create_dir(m.path().join(sub)).unwrap();
    }
    proxy.black_hole(true);
    let started = Instant::now();
    for sub in ["a", "b"] {
        let mut cp = Command::new("cp");
        cp.arg("-p");
        for e in std::fs::read_dir(src.path().join(sub)).unwrap() {
            cp.arg(e.unwrap().path());
        }
        let out = cp.arg(m.path().join(sub)).output().unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            m.log()
        );
    }
    let copied_in = started.elapsed();
    // Killed right after the copy returned, as a crash or the OOM killer would.
    let log = m.kill();
    drop(proxy);
    assert!(!log.contains("panicked"), "{log}");
    let in_s3_at_kill = c
        .list_objects(&s3mount::s3::ListRequest {
            prefix: &prefix,
            ..Default::default()
        })
        .await
        .unwrap()
        .objects
        .iter()
        .filter(|o| !o.key.ends_with('/'))
        .count();

    assert_eq!(in_s3_at_kill, 0, "the proxy let nothing through");
    let again = mount(&env, &spec, &args);
    let waited = drained(&again, Duration::from_secs(60));
    eprintln!(
        "{n} files copied in {:.2} s with S3 out of reach; the mount killed; all in S3 {:.1} s \
         after the next mount",
        copied_in.as_secs_f64(),
        waited.as_secs_f64()
    );
    for (rel, data, mode, mtime) in &made {
        let key = format!("{prefix}{rel}");
        assert_eq!(object_sha256(&c, &key).await, sha256_hex(data), "{rel}");
        let head = c.head_object(&key).await.unwrap();
        assert_eq!(
            head.metadata.get("mode").map(String::as_str),
            Some((0o100000 | mode).to_string().as_str()),
            "{rel}"
        );
        let stored_mtime: f64 = head.metadata["mtime"].parse().unwrap();
        assert_eq!(stored_mtime as i64, *mtime, "{rel}");
        // And through the mount.
        let meta = std::fs::metadata(again.path().join(rel)).unwrap();
        assert_eq!(
            (meta.mode() & 0o7777, meta.mtime()),
            (*mode, *mtime),
            "{rel}"
        );
    }
    let (_, log) = again.terminate();
    assert!(log.contains("every file is stored in S3"), "{log}");
    let left: Vec<_> = walk(cache.path())
        .into_iter()
        .filter(|p| !p.ends_with("lock"))
        .collect();
    assert!(left.is_empty(), "the cache is empty: {left:?}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_through_an_outage_succeeds_and_is_stored_once_the_server_is_back() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("wb-outage");
    let cache = tempfile::tempdir().unwrap();
    let cache_arg = cache.path().to_str().unwrap().to_string();
    let (proxy, through) = proxied(&env).await;
    let mut args = vec!["--write-back", "--cache-dir", &cache_arg];
    args.extend(QUICK);
    let m = mount(&through, &format!("{}:{prefix}", env.bucket), &args);
    std::fs::create_dir(m.path().join("d")).unwrap();
    let src = tempfile::tempdir().unwrap();
    let mut sources = Vec::new();
    for i in 0..20 {
        let size = if i == 0 { 20 << 20 } else { 256 << 10 };
        let data = pattern(size, 100 + i as u64);
        let path = src.path().join(format!("f{i}"));
        std::fs::write(&path, &data).unwrap();
        sources.push((format!("f{i}"), sha256_hex(&data), path));
    }

    proxy.black_hole(true);
    let down = Instant::now();
    let paths: Vec<_> = sources.iter().map(|(_, _, p)| p.clone()).collect();
    let target = m.path().join("d");
    let copy = common::run(move || {
        Command::new("cp")
            .args(&paths)
            .arg(&target)
            .output()
            .unwrap()
    });
    let out = copy.wait(outage() + Duration::from_secs(120), &m);
    let copied = down.elapsed();
    assert!(
        out.status.success(),
        "the copy failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.log()
    );
    let during = copied < outage();
    if let Some(rest) = outage().checked_sub(down.elapsed()) {
        std::thread::sleep(rest);
    }
    assert_eq!(
        queue(&m)["files"].as_u64(),
        Some(20),
        "all wait: {}",
        m.log()
    );
    proxy.black_hole(false);
    let back = Instant::now();
    drained(&m, Duration::from_secs(120));
    eprintln!(
        "20 files (21 MiB) copied in {:.1} s, {} a {} s outage; all in S3 {:.1} s after the \
         server was back",
        copied.as_secs_f64(),
        if during { "within" } else { "outlasting" },
        outage().as_secs(),
        back.elapsed().as_secs_f64()
    );
    for (name, sha, _) in &sources {
        assert_eq!(
            &object_sha256(&c, &format!("{prefix}d/{name}")).await,
            sha,
            "{name}"
        );
    }
    let (_, log) = m.terminate();
    assert!(log.contains("S3 cannot be reached"), "{log}");
    assert!(common::uploads_left(&c, &prefix).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queued_rewrite_never_replaces_what_another_client_wrote_meanwhile() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("wb-conflict");
    let key = format!("{prefix}f.txt");
    let attrs = ObjectAttributes::default();
    c.put_object(&key, PutBody::Bytes("old".into()), &attrs)
        .await
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let cache_arg = cache.path().to_str().unwrap().to_string();
    let (proxy, through) = proxied(&env).await;
    let mut args = vec!["--write-back", "--cache-dir", &cache_arg];
    args.extend(QUICK);
    let m = mount(&through, &format!("{}:{prefix}", env.bucket), &args);
    let path = m.path().join("f.txt");
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
    // Opened (which asks S3) before the outage, written and closed during it.
    let mut f = std::fs::File::create(&path).unwrap();
    proxy.black_hole(true);
    std::io::Write::write_all(&mut f, b"mine").unwrap();
    drop(f);
    assert_eq!(queue(&m)["files"].as_u64(), Some(1), "{}", m.log());
    // Another client, not through the proxy, changes the object while ours waits.
    c.put_object(&key, PutBody::Bytes("theirs".into()), &attrs)
        .await
        .unwrap();
    proxy.black_hole(false);
    drained(&m, Duration::from_secs(60));
    assert_eq!(object_sha256(&c, &key).await, sha256_hex(b"theirs"));
    let page = c
        .list_objects(&s3mount::s3::ListRequest {
            prefix: &prefix,
            ..Default::default()
        })
        .await
        .unwrap();
    let copies: Vec<_> = page
        .objects
        .iter()
        .filter(|o| o.key.contains(".s3mount-conflict-"))
        .collect();
    assert_eq!(copies.len(), 1, "{:?}", page.objects);
    assert_eq!(object_sha256(&c, &copies[0].key).await, sha256_hex(b"mine"));
    assert_eq!(queue(&m)["conflicts"].as_u64(), Some(1));
    let (_, log) = m.terminate();
    assert!(log.contains("another client changed the object"), "{log}");
}
