//! Browsing and reading through a real FUSE mount of the real test server.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::mount::{command, mount, run_to_exit};
use common::{conformance, pattern, sha256_hex, unique_prefix, ServerEnv};
use s3mount::s3::*;

async fn put(c: &S3Client, key: &str, data: impl Into<bytes::Bytes>) {
    c.put_object(
        key,
        PutBody::Bytes(data.into()),
        &ObjectAttributes::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("put {key}: {e}"));
}

/// Every path under `root`, relative, directories with a trailing `/`.
fn walk(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        {
            let entry = entry.unwrap();
            let rel = entry
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if entry.file_type().unwrap().is_dir() {
                out.insert(format!("{rel}/"));
                stack.push(entry.path());
            } else {
                out.insert(rel);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn nested_trees_markers_and_implicit_directories() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("tree");
    for key in [
        "a.txt",
        "dir/b.txt",
        "dir/sub/c.txt",
        "implicit/only/deep.txt",
        "marker/",
        "empty-marker/",
        "both",
        "both/inner.txt",
    ] {
        put(
            &c,
            &format!("{prefix}{key}"),
            format!("data:{key}").into_bytes(),
        )
        .await;
    }
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    let want: BTreeSet<String> = [
        "a.txt",
        "both/",
        "both/inner.txt",
        "dir/",
        "dir/b.txt",
        "dir/sub/",
        "dir/sub/c.txt",
        "empty-marker/",
        "implicit/",
        "implicit/only/",
        "implicit/only/deep.txt",
        "marker/",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(walk(m.path()), want);
    assert_eq!(
        std::fs::read_to_string(m.path().join("dir/sub/c.txt")).unwrap(),
        "data:dir/sub/c.txt"
    );
    let meta = std::fs::metadata(m.path().join("dir/b.txt")).unwrap();
    assert_eq!(meta.len(), "data:dir/b.txt".len() as u64);
    assert!(
        std::fs::metadata(m.path().join("both")).unwrap().is_dir(),
        "a directory shadows a file"
    );
    let err = std::fs::metadata(m.path().join("missing")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    let err = std::fs::read_dir(m.path().join("a.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
}

#[tokio::test(flavor = "multi_thread")]
async fn directory_of_1000_keys_is_complete_and_exact() {
    let env = ServerEnv::main();
    let c = Arc::new(env.client());
    let prefix = unique_prefix("thousand");
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let (c, key, sem) = (c.clone(), format!("{prefix}f{i:04}"), sem.clone());
        tasks.spawn(async move {
            let _p = sem.acquire().await.unwrap();
            put(&c, &key, format!("{i}").into_bytes()).await;
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    let names: BTreeSet<String> = std::fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let want: BTreeSet<String> = (0..1000).map(|i| format!("f{i:04}")).collect();
    assert_eq!(names, want);
    for i in [0, 499, 999] {
        assert_eq!(
            std::fs::read_to_string(m.path().join(format!("f{i:04}"))).unwrap(),
            i.to_string()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn awkward_names_list_and_read() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("names");
    for name in conformance::AWKWARD_NAMES {
        put(
            &c,
            &format!("{prefix}{name}"),
            format!("content:{name}").into_bytes(),
        )
        .await;
    }
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    let listed: BTreeSet<String> = std::fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let want: BTreeSet<String> = conformance::AWKWARD_NAMES
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(listed, want);
    for name in conformance::AWKWARD_NAMES {
        assert_eq!(
            std::fs::read_to_string(m.path().join(name)).unwrap(),
            format!("content:{name}"),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_gib_object_reads_back_exactly() {
    const SIZE: usize = 1 << 30;
    let env = ServerEnv::main();
    let c = Arc::new(env.client());
    let prefix = unique_prefix("gib");
    let key = format!("{prefix}big.bin");
    let data = bytes::Bytes::from(pattern(SIZE, 42));
    let want = sha256_hex(&data);
    let id = c
        .create_multipart_upload(&key, &ObjectAttributes::default(), Checksum::Sha256)
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    const PART: usize = 16 << 20;
    for (i, start) in (0..SIZE).step_by(PART).enumerate() {
        let (c, key, id, body) = (
            c.clone(),
            key.clone(),
            id.clone(),
            data.slice(start..start + PART),
        );
        tasks.spawn(async move {
            let n = i as u32 + 1;
            CompletedPart {
                part_number: n,
                etag: c
                    .upload_part(&key, &id, n, PutBody::Bytes(body), Checksum::Sha256)
                    .await
                    .unwrap()
                    .etag,
                crc32c: None,
            }
        });
    }
    let mut parts = Vec::new();
    while let Some(p) = tasks.join_next().await {
        parts.push(p.unwrap());
    }
    parts.sort_by_key(|p| p.part_number);
    c.complete_multipart_upload(&key, &id, &parts)
        .await
        .unwrap();

    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &["--read-only"]);
    let path = m.path().join("big.bin");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("cat '{}' | sha256sum", path.display()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.split_whitespace().next(),
        Some(want.as_str()),
        "sha256 of cat through the mount"
    );

    // Random preads, with the page cache dropped so they reach s3mount.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    let file = std::fs::File::open(&path).unwrap();
    let mut rng = fastrand::Rng::with_seed(9);
    for _ in 0..300 {
        let len = rng.usize(1..300_000);
        let off = rng.usize(0..SIZE - len);
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, off as u64).unwrap();
        assert!(buf == data[off..off + len], "pread of {len} bytes at {off}");
    }
    // The very end, and past it.
    let mut tail = vec![0u8; 100];
    assert_eq!(file.read_at(&mut tail, SIZE as u64 - 10).unwrap(), 10);
    assert_eq!(&tail[..10], &data[SIZE - 10..]);
    assert_eq!(file.read_at(&mut tail, SIZE as u64 + 5).unwrap(), 0);
    drop(file);
    drop(m);
    c.delete_object(&key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_band_changes_are_seen_after_the_ttl() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("oob");
    put(&c, &format!("{prefix}changing"), b"version one".to_vec()).await;
    put(&c, &format!("{prefix}doomed"), b"soon gone".to_vec()).await;
    let m = mount(
        &env,
        &format!("{}:{prefix}", env.bucket),
        &["--metadata-ttl", "0.5"],
    );
    assert_eq!(
        std::fs::read_to_string(m.path().join("changing")).unwrap(),
        "version one"
    );
    assert!(std::fs::metadata(m.path().join("newcomer")).is_err());
    assert!(std::fs::metadata(m.path().join("doomed")).is_ok());

    put(
        &c,
        &format!("{prefix}changing"),
        b"version two, longer".to_vec(),
    )
    .await;
    put(&c, &format!("{prefix}newcomer"), b"hello".to_vec()).await;
    c.delete_object(&format!("{prefix}doomed")).await.unwrap();
    std::thread::sleep(Duration::from_millis(1200));

    assert_eq!(
        std::fs::read_to_string(m.path().join("changing")).unwrap(),
        "version two, longer"
    );
    assert_eq!(
        std::fs::read_to_string(m.path().join("newcomer")).unwrap(),
        "hello"
    );
    assert_eq!(
        std::fs::metadata(m.path().join("doomed"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENOENT)
    );
    let names: BTreeSet<String> = std::fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["changing".to_string(), "newcomer".to_string()])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn replaced_object_gives_estale_to_open_handles() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("stale");
    let key = format!("{prefix}f");
    let size = 96 << 20;
    put(&c, &key, pattern(size, 1)).await;
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &["--read-only"]);
    let mut file = std::fs::File::open(m.path().join("f")).unwrap();
    let mut head = [0u8; 4096];
    file.read_exact(&mut head).unwrap();
    assert_eq!(&head[..], &pattern(size, 1)[..4096]);
    put(&c, &key, pattern(size, 2)).await;
    let mut buf = vec![0u8; 4096];
    let err = file.read_exact_at(&mut buf, 80 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    drop(file);
    // A new open reads the new version.
    let fresh = std::fs::File::open(m.path().join("f")).unwrap();
    fresh.read_exact_at(&mut buf, 80 << 20).unwrap();
    assert_eq!(&buf[..], &pattern(size, 2)[80 << 20..(80 << 20) + 4096]);
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_mount_refuses_changes_with_erofs() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("ro");
    put(&c, &format!("{prefix}f"), b"x".to_vec()).await;
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &["--read-only"]);
    let errno = |r: std::io::Result<()>| r.unwrap_err().raw_os_error();
    assert_eq!(
        errno(std::fs::write(m.path().join("new"), "x")),
        Some(libc::EROFS)
    );
    assert_eq!(
        errno(std::fs::create_dir(m.path().join("d"))),
        Some(libc::EROFS)
    );
    assert_eq!(
        errno(std::fs::remove_file(m.path().join("f"))),
        Some(libc::EROFS)
    );
    assert_eq!(
        errno(std::fs::rename(m.path().join("f"), m.path().join("g"))),
        Some(libc::EROFS)
    );
    assert_eq!(std::fs::read_to_string(m.path().join("f")).unwrap(), "x");
    let (status, _) = m.terminate();
    assert!(status.success(), "SIGTERM ends s3mount cleanly: {status}");
}

fn start_error(mut cmd: std::process::Command) -> String {
    let out = run_to_exit(&mut cmd);
    assert_eq!(out.status.code(), Some(1), "exit status");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

#[test]
fn mount_time_errors_are_one_clear_line() {
    let env = ServerEnv::main();
    let dir = tempfile::tempdir().unwrap();

    let mut cmd = command(&env);
    cmd.env("AWS_SECRET_ACCESS_KEY", "definitely-wrong")
        .arg(&env.bucket)
        .arg(dir.path());
    let e = start_error(cmd);
    assert!(
        e.contains("secret access key") && e.contains("wrong"),
        "{e}"
    );
    assert!(
        !e.contains("definitely-wrong"),
        "no secret in messages: {e}"
    );

    let mut cmd = command(&env);
    cmd.arg(format!("no-such-bucket-{:08x}", fastrand::u32(..)))
        .arg(dir.path());
    let e = start_error(cmd);
    assert!(e.contains("does not exist") || e.contains("denied"), "{e}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = command(&env);
    cmd.arg(&env.bucket)
        .arg(dir.path())
        .arg("--endpoint-url")
        .arg(format!("http://127.0.0.1:{port}"));
    let e = start_error(cmd);
    assert!(
        e.contains("cannot reach") && e.contains(&port.to_string()),
        "{e}"
    );

    let mut cmd = command(&env);
    cmd.arg(&env.bucket).arg(dir.path().join("nope"));
    let e = start_error(cmd);
    assert!(e.contains("does not exist") && e.contains("mkdir"), "{e}");

    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    let mut cmd = command(&env);
    cmd.arg(&env.bucket).arg(&file);
    assert!(start_error(cmd).contains("not a directory"));

    let mut cmd = command(&env);
    cmd.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .arg(&env.bucket)
        .arg(dir.path());
    assert!(start_error(cmd).contains("no AWS credentials"));
}

#[test]
fn background_mode_returns_once_mounted() {
    let env = ServerEnv::main();
    let dir = tempfile::Builder::new()
        .prefix("s3mount-test-")
        .tempdir()
        .unwrap();
    let log = dir.path().with_extension("bg.log");
    let mut cmd = command(&env);
    cmd.arg(&env.bucket)
        .arg(dir.path())
        .arg("--log-file")
        .arg(&log);
    let out = run_to_exit(&mut cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mounted = common::mount::is_mounted(dir.path());
    let listed = std::fs::read_dir(dir.path()).map(|d| d.count());
    let unmount = std::process::Command::new("umount")
        .arg(dir.path())
        .status()
        .unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(mounted, "mounted when the command returned");
    assert!(listed.is_ok());
    assert!(unmount.success(), "umount works");
}

/// GETs this mount has sent, from its status report.
fn gets_sent(m: &common::mount::Mounted) -> u64 {
    let status = common::mount::report(m, "status");
    status["totals"]["requests_by_operation"]["GetObject"]
        .as_u64()
        .unwrap_or_else(|| panic!("GetObject in {status:#}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_read_cache_serves_a_second_read_and_the_next_mount_without_a_get() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("cache");
    let spec = format!("{}:{prefix}", env.bucket);
    let data = pattern((6 << 20) + 4321, 9);
    put(&c, &format!("{prefix}f.bin"), data.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_str().unwrap();
    let args = ["--cache", dir, "--max-cache-size", "64M"];
    {
        let m = mount(&env, &spec, &args);
        let file = m.path().join("f.bin");
        read_fills_the_cache(&m, &file, &data);
        let before = gets_sent(&m);
        // Another open (the kernel's page cache is dropped at open: the reads reach the mount).
        let f = std::fs::File::open(&file).unwrap();
        for offset in [5_000_000u64, 0, 3 << 20, (6 << 20) - 10] {
            let mut buf = vec![0u8; 100_000];
            let n = f.read_at(&mut buf, offset).unwrap();
            let end = (offset as usize + 100_000).min(data.len());
            assert_eq!(&buf[..n], &data[offset as usize..end], "at {offset}");
        }
        drop(f);
        assert_eq!(
            sha256_hex(&std::fs::read(&file).unwrap()),
            sha256_hex(&data)
        );
        assert_eq!(gets_sent(&m), before, "no GET once cached");
        // A second mount of the same bucket and prefix may not share the cache.
        let other = tempfile::tempdir().unwrap();
        let out = run_to_exit(command(&env).arg(&spec).arg(other.path()).args(args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("in use by another s3mount"),
            "{err}"
        );
    }
    // The next mount reads it from the cache.
    let m = mount(&env, &spec, &args);
    let file = m.path().join("f.bin");
    assert_eq!(
        sha256_hex(&std::fs::read(&file).unwrap()),
        sha256_hex(&data)
    );
    assert_eq!(gets_sent(&m), 0, "no GET after a remount");
    // Another client replaces the object: the mount reads the new version, not the cache.
    let newer = pattern(3 << 20, 11);
    put(&c, &format!("{prefix}f.bin"), newer.clone()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        sha256_hex(&std::fs::read(&file).unwrap()),
        sha256_hex(&newer)
    );
    assert!(gets_sent(&m) > 0);
}

/// Whether this kernel has FUSE passthrough (Linux 6.9 and later).
fn kernel_has_passthrough() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 9)
}

/// Reads `file` whole, which must hold `data`, and waits until the read cache has all of it.
fn read_fills_the_cache(m: &common::mount::Mounted, file: &Path, data: &[u8]) {
    assert_eq!(sha256_hex(&std::fs::read(file).unwrap()), sha256_hex(data));
    wait_cached(m, data.len() as u64);
}

/// Waits (bounded) until the mount's read cache holds `bytes` (blocks are written off the
/// reader's path).
fn wait_cached(m: &common::mount::Mounted, bytes: u64) {
    let start = std::time::Instant::now();
    while common::mount::report(m, "status")["read_cache"]["bytes"].as_u64() != Some(bytes) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the cache never filled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_passthrough_hands_whole_objects_to_the_kernel_and_keeps_writers_safe() {
    if !kernel_has_passthrough() {
        eprintln!("skipped: this kernel has no FUSE passthrough (Linux 6.9 and later)");
        return;
    }
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("passthrough");
    let spec = format!("{}:{prefix}", env.bucket);
    let key = format!("{prefix}f.bin");
    let data = pattern((5 << 20) + 999, 21);
    put(&c, &key, data.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_str().unwrap();
    let args = ["--cache", dir, "--cache-passthrough", "--metadata-ttl", "1"];
    let cache_report =
        |m: &common::mount::Mounted| common::mount::report(m, "status")["read_cache"].clone();
    {
        let m = mount(&env, &spec, &args);
        let file = m.path().join("f.bin");
        // The first read goes through the mount.
        read_fills_the_cache(&m, &file, &data);
        assert_eq!(cache_report(&m)["passthrough_opens"], 0);
        let (gets, hits) = (gets_sent(&m), cache_report(&m)["hits"].clone());
        // The next open is read by the kernel from the cache's file: no read reaches the mount.
        let reader = std::fs::File::open(&file).unwrap();
        let mut buf = vec![0u8; 300_000];
        let n = reader.read_at(&mut buf, 4 << 20).unwrap();
        assert_eq!(&buf[..n], &data[4 << 20..(4 << 20) + n]);
        assert_eq!(
            sha256_hex(&std::fs::read(&file).unwrap()),
            sha256_hex(&data)
        );
        assert_eq!(cache_report(&m)["passthrough_opens"], 2);
        assert_eq!(cache_report(&m)["hits"], hits, "no read reached the mount");
        assert_eq!(gets_sent(&m), gets);
        // While a passthrough reader has it open, it cannot be opened for writing, and the
        // refused open changes nothing (O_TRUNC included).
        let err = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&file)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ETXTBSY), "{err}");
        assert_eq!(std::fs::metadata(&file).unwrap().len(), data.len() as u64);
        assert_eq!(c.head_object(&key).await.unwrap().size, data.len() as u64);
        let n = reader.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], &data[..n]);
        // Once it is closed, writing works at once (its RELEASE is waited for).
        drop(reader);
        let newer = pattern(1 << 20, 22);
        std::fs::write(&file, &newer).unwrap();
        assert_eq!(c.head_object(&key).await.unwrap().size, newer.len() as u64);
        read_fills_the_cache(&m, &file, &newer);
        // A reader of one version holds it while another client replaces the object: a new
        // open of the newer version is refused (EBUSY) while that reader stays.
        let reader = std::fs::File::open(&file).unwrap();
        let opens = cache_report(&m)["passthrough_opens"].as_u64().unwrap();
        assert!(opens >= 3, "{opens}");
        put(&c, &key, data.clone()).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let err = std::fs::File::open(&file).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
        let n = reader.read_at(&mut buf, 0).unwrap();
        assert_eq!(
            &buf[..n],
            &newer[..n],
            "the reader keeps the version it opened"
        );
        drop(reader);
        read_fills_the_cache(&m, &file, &data);
    }
    // The unmount sealed the cache: the next mount trusts it and hands it to the kernel
    // without a GET.
    {
        let m = mount(&env, &spec, &args);
        let file = m.path().join("f.bin");
        assert_eq!(
            sha256_hex(&std::fs::read(&file).unwrap()),
            sha256_hex(&data)
        );
        assert_eq!(cache_report(&m)["passthrough_opens"], 1);
        assert_eq!(gets_sent(&m), 0);
    }
    // A byte of the cache's file changed after the seal (its mtime put back): the next mount
    // checks every block, reads the right bytes, and does not hand that file to the kernel.
    let data_file = walk(cache.path())
        .into_iter()
        .find(|p| p.ends_with(".data"))
        .map(|p| cache.path().join(p))
        .unwrap();
    let before = std::fs::metadata(&data_file).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&data_file)
        .unwrap();
    f.write_all_at(b"\xff", 3 << 20).unwrap();
    f.set_modified(before.modified().unwrap()).unwrap();
    drop(f);
    let m = mount(&env, &spec, &args);
    let file = m.path().join("f.bin");
    assert_eq!(
        sha256_hex(&std::fs::read(&file).unwrap()),
        sha256_hex(&data)
    );
    let report = cache_report(&m);
    assert_eq!(report["passthrough_opens"], 0, "{report:#}");
    assert_eq!(report["corrupt_blocks"], 1, "{report:#}");
}
