//! The faults real networks and disks produce, through a real FUSE mount of the real test
//! server: a proxy that resets, cuts, stalls, loses answers and restarts (tests/common/
//! fault_proxy.rs), a spool on a small tmpfs, many readers and writers against one memory cap.
//!
//! Sizes and seeds are small by default, so CI stays quick; `scripts/fault-suite` runs them at
//! full size with random seeds through these variables:
//! - `S3MOUNT_FAULT_SIZE`: bytes copied in and out (default 40M);
//! - `S3MOUNT_FAULT_SEEDS`: `1,2,3` or `random:5` (default `7,11`);
//! - `S3MOUNT_FAULT_UPLOADS`: multipart uploads before the journal check (default 20);
//! - `S3MOUNT_FAULT_DEFAULT_TIMEOUTS=1`: the frozen-server test with the default timeouts;
//! - `S3MOUNT_FAULT_MEMORY_CAP` and `S3MOUNT_FAULT_MEMORY_FILE`: the memory test's
//!   `--max-memory` (64M) and the size of each file read and written (24M);
//! - `S3MOUNT_STOPPABLE_*` (a server of the test's own: endpoint, bucket, keys) and
//!   `S3MOUNT_STOPPABLE_PID`: the same as the frozen-server test against a real server stopped
//!   with SIGSTOP (skipped without them: the shared test server cannot be stopped).

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fault_proxy::{Fault, FaultProxy, Target};
use common::mount::{mount, mount_env};
use common::{
    cp, object_sha256, pattern, run, sha256_hex, sha256_of_file, unique_prefix, uploads_left,
    write_pattern_file, ServerEnv,
};
use s3mount::s3::*;

/// Timeouts short enough that stalls and hangs cost a test seconds, not minutes.
const QUICK_TIMEOUTS: &[&str] = &[
    "--connect-timeout",
    "2",
    "--request-timeout",
    "3",
    "--stall-timeout",
    "2",
];

fn size_from_env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| s3mount::cli::parse_size(&v).ok())
        .unwrap_or(default)
}

fn seeds() -> Vec<u64> {
    let spec = std::env::var("S3MOUNT_FAULT_SEEDS").unwrap_or_else(|_| "7,11".into());
    if let Some(n) = spec.strip_prefix("random:") {
        let n: usize = n.parse().expect("random:N");
        let seeds: Vec<u64> = (0..n).map(|_| fastrand::u64(..)).collect();
        eprintln!("random seeds: {seeds:?}");
        return seeds;
    }
    spec.split(',')
        .map(|s| s.trim().parse().expect("a seed"))
        .collect()
}

/// The server, reached through `proxy`.
fn through(proxy: &FaultProxy) -> ServerEnv {
    let mut env = ServerEnv::main();
    env.endpoint = proxy.endpoint();
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn copies_in_and_out_survive_ten_percent_faulty_requests() {
    let env = ServerEnv::main();
    let c = env.client();
    let size = size_from_env("S3MOUNT_FAULT_SIZE", 40 << 20);
    let work = tempfile::tempdir().unwrap();
    let mut faults = 0;
    for seed in seeds() {
        let prefix = unique_prefix("faults");
        let source = work.path().join("source.bin");
        let want = write_pattern_file(&source, size, seed);
        let proxy = FaultProxy::start(env.authority(), vec![]).await;
        // The mount comes up cleanly; then one request in ten fails, every kind of fault.
        let m = mount(
            &through(&proxy),
            &format!("{}:{prefix}", env.bucket),
            QUICK_TIMEOUTS,
        );
        proxy.random(seed, 0.10, Duration::from_secs(4));
        cp(&source, &m.path().join("big.bin"), &m);
        drop(m);
        assert_eq!(
            object_sha256(&c, &format!("{prefix}big.bin")).await,
            want,
            "seed {seed}: stored byte for byte"
        );
        // A fresh mount reads it back through the same faults (nothing in the page cache).
        let m = mount(
            &through(&proxy),
            &format!("{}:{prefix}", env.bucket),
            QUICK_TIMEOUTS,
        );
        let back = work.path().join("back.bin");
        cp(&m.path().join("big.bin"), &back, &m);
        let log = m.log();
        drop(m);
        assert_eq!(
            sha256_of_file(&back),
            want,
            "seed {seed}: read back byte for byte"
        );
        let injected = proxy.injected();
        eprintln!(
            "seed {seed}: {} requests, {} faults injected: {:?}",
            proxy.requests_seen(),
            injected.len(),
            count_by_name(&injected)
        );
        faults += injected.len();
        assert!(
            !log.contains(" ERROR "),
            "no error reached the application's operations:\n{log}"
        );
        assert!(uploads_left(&c, &prefix).await.is_empty(), "seed {seed}");
        std::fs::remove_file(&back).unwrap();
    }
    assert!(faults > 0, "the proxy injected faults");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_fault_is_ridden_out() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("everyfault");
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source.bin");
    let want = write_pattern_file(&source, 30 << 20, 5);
    let proxy = FaultProxy::start(env.authority(), vec![]).await;
    let m = mount(
        &through(&proxy),
        &format!("{}:{prefix}", env.bucket),
        QUICK_TIMEOUTS,
    );
    // Uploads: refused, reset before and after the server saw them, hung, a 200 with an error.
    let stall = Duration::from_secs(4);
    for fault in [
        Fault::Status(503, "SlowDown"),
        Fault::Reset,
        Fault::LoseAnswer,
        Fault::Hang(stall),
        Fault::Status(500, "InternalError"),
    ] {
        proxy.on(Target::Put, fault, 1);
    }
    proxy.on(
        Target::CompleteMultipartUpload,
        Fault::ErrorIn200("InternalError"),
        1,
    );
    cp(&source, &m.path().join("f.bin"), &m);
    drop(m);
    assert_eq!(proxy.faults_left(), 0, "every upload fault was met");
    assert_eq!(object_sha256(&c, &format!("{prefix}f.bin")).await, want);
    // Downloads: bodies cut and stalled partway, resets, lost answers, hangs.
    let m = mount(
        &through(&proxy),
        &format!("{}:{prefix}", env.bucket),
        QUICK_TIMEOUTS,
    );
    for fault in [
        Fault::CutBody,
        Fault::StallBody(stall),
        Fault::CutBody,
        Fault::Reset,
        Fault::LoseAnswer,
        Fault::Hang(stall),
        Fault::CutBody,
    ] {
        proxy.on(Target::Get, fault, 1);
    }
    let back = work.path().join("back.bin");
    cp(&m.path().join("f.bin"), &back, &m);
    let log = m.log();
    drop(m);
    assert_eq!(proxy.faults_left(), 0, "every download fault was met");
    assert_eq!(sha256_of_file(&back), want);
    assert!(
        log.contains("resuming from where it broke"),
        "a cut body was resumed, not fetched again:\n{log}"
    );
    eprintln!("injected: {:?}", count_by_name(&proxy.injected()));
}

fn count_by_name(names: &[&'static str]) -> Vec<(&'static str, usize)> {
    let mut counts: Vec<(&'static str, usize)> = Vec::new();
    for n in names {
        match counts.iter_mut().find(|(k, _)| k == n) {
            Some((_, c)) => *c += 1,
            None => counts.push((n, 1)),
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_survives_a_server_restart_in_the_middle() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("restart");
    let key = format!("{prefix}big.bin");
    let data = pattern(64 << 20, 3);
    c.put_object(
        &key,
        PutBody::from(data.clone()),
        &ObjectAttributes::default(),
    )
    .await
    .unwrap();
    let proxy = FaultProxy::start(env.authority(), vec![]).await;
    // Little memory, so little is read ahead: the restart lands in the middle of the transfer.
    let mut args = QUICK_TIMEOUTS.to_vec();
    args.extend(["--max-memory", "16M"]);
    let m = mount(&through(&proxy), &format!("{}:{prefix}", env.bucket), &args);
    let path = m.path().join("big.bin");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = run(move || {
        let mut f = std::fs::File::open(&path).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut told = false;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok::<_, std::io::Error>(got);
            }
            got.extend_from_slice(&buf[..n]);
            if !told && got.len() >= 16 << 20 {
                told = true;
                tx.send(()).unwrap();
                // Give the restart a moment to land in the middle of the transfer.
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the reader got going");
    // Every connection is dropped, and for two seconds none is accepted.
    proxy.restart(Duration::from_secs(2));
    let got = reader
        .wait(Duration::from_secs(120), &m)
        .unwrap_or_else(|e| panic!("read: {e}\n{}", m.log()));
    assert_eq!(got.len(), data.len());
    assert!(got == data, "byte for byte");
    let log = m.log();
    assert!(
        log.contains("resuming") || log.contains("retrying"),
        "the restart was ridden out, not missed:\n{log}"
    );
}

/// A tmpfs of `size` mounted for the test, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs (the test needs root)");
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_spool_disk_is_enospc_and_the_previous_object_stays() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("fullspool");
    let key = format!("{prefix}file.bin");
    let previous = pattern(3 << 20, 21);
    c.put_object(
        &key,
        PutBody::from(previous.clone()),
        &ObjectAttributes::default(),
    )
    .await
    .unwrap();
    let spool = Tmpfs::new("64m");
    let spool_dir = spool.0.path().to_string_lossy().to_string();
    let m = mount(
        &env,
        &format!("{}:{prefix}", env.bucket),
        &["--spool-dir", &spool_dir],
    );
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path().join("file.bin"))
        .unwrap();
    let chunk = pattern(1 << 20, 5);
    let mut written = 0u64;
    let error = loop {
        match f.write_all(&chunk) {
            Ok(()) => written += chunk.len() as u64,
            Err(e) => break e,
        }
        assert!(written < 256 << 20, "256 MiB written into a 64 MiB spool");
    };
    assert_eq!(
        error.raw_os_error(),
        Some(libc::ENOSPC),
        "the write that found the disk full says so, after {written} bytes: {error}"
    );
    // fsync and close report it too.
    assert!(f.sync_all().is_err());
    use std::os::fd::IntoRawFd;
    let fd = f.into_raw_fd();
    // SAFETY: closing a descriptor this test owns, once.
    let closed = unsafe { libc::close(fd) };
    assert_eq!(closed, -1, "close() fails");
    // The previous version is untouched.
    let head = c.head_object(&key).await.unwrap();
    assert_eq!(head.size, previous.len() as u64);
    assert_eq!(object_sha256(&c, &key).await, sha256_hex(&previous));
    // At most the upload of the parts stored before the disk filled, kept for a copy of the
    // same file to resume.
    let kept = c
        .list_multipart_uploads(&prefix, None)
        .await
        .unwrap()
        .uploads;
    assert!(kept.len() <= 1, "{kept:?}");
    // And the mount keeps working once there is room.
    std::fs::write(m.path().join("small.txt"), "still here").unwrap();
    assert_eq!(
        std::fs::read_to_string(m.path().join("small.txt")).unwrap(),
        "still here"
    );
    let log = m.log();
    assert!(log.contains("No space left"), "the log says why:\n{log}");
    drop(m);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_complete_answer_is_a_successful_close() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("lostcomplete");
    let proxy = FaultProxy::start(env.authority(), vec![]).await;
    let m = mount(
        &through(&proxy),
        &format!("{}:{prefix}", env.bucket),
        QUICK_TIMEOUTS,
    );
    // The server completes the upload; the answer never comes back.
    proxy.on(Target::CompleteMultipartUpload, Fault::LoseAnswer, 1);
    let data = pattern(20 << 20, 8);
    std::fs::write(m.path().join("f.bin"), &data)
        .unwrap_or_else(|e| panic!("close failed: {e}\n{}", m.log()));
    assert_eq!(proxy.faults_left(), 0, "the answer was lost");
    drop(m);
    assert_eq!(
        object_sha256(&c, &format!("{prefix}f.bin")).await,
        sha256_hex(&data)
    );
    assert!(uploads_left(&c, &prefix).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_create_answer_leaves_no_upload_after_a_remount() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("lostcreate");
    let state = tempfile::tempdir().unwrap();
    let vars = [("XDG_STATE_HOME", state.path().as_os_str())];
    let proxy = FaultProxy::start(env.authority(), vec![]).await;
    let m = mount_env(
        &through(&proxy),
        &format!("{}:{prefix}", env.bucket),
        QUICK_TIMEOUTS,
        &vars,
    );
    // The server makes the upload; its id never reaches the mount.
    proxy.on(Target::CreateMultipartUpload, Fault::LoseAnswer, 1);
    let data = pattern(20 << 20, 9);
    std::fs::write(m.path().join("f.bin"), &data)
        .unwrap_or_else(|e| panic!("close failed: {e}\n{}", m.log()));
    assert_eq!(proxy.faults_left(), 0, "the answer was lost");
    drop(m);
    let again = mount_env(&env, &format!("{}:{prefix}", env.bucket), &[], &vars);
    let left = uploads_left(&c, &prefix).await;
    drop(again);
    assert!(left.is_empty(), "no upload left behind: {left:?}");
    assert_eq!(
        object_sha256(&c, &format!("{prefix}f.bin")).await,
        sha256_hex(&data)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_server_fails_close_in_bounded_time_and_nothing_is_stored_later() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("frozen");
    let state = tempfile::tempdir().unwrap();
    let vars = [("XDG_STATE_HOME", state.path().as_os_str())];
    let defaults = std::env::var("S3MOUNT_FAULT_DEFAULT_TIMEOUTS").is_ok();
    // The bound: the retry budget (30 s by default), plus the request it lets start last.
    let (args, bound): (&[&str], Duration) = if defaults {
        (&[], Duration::from_secs(30 + 10 + 5))
    } else {
        (
            &[
                "--request-timeout",
                "2",
                "--stall-timeout",
                "2",
                "--retry-max-time",
                "6",
            ],
            Duration::from_secs(6 + 2 + 5),
        )
    };
    let proxy = FaultProxy::start(env.authority(), vec![]).await;
    let m = mount_env(
        &through(&proxy),
        &format!("{}:{prefix}", env.bucket),
        args,
        &vars,
    );
    let mut f = std::fs::File::create(m.path().join("f.bin")).unwrap();
    f.write_all(&pattern(12 << 20, 4)).unwrap();
    // The server freezes: connections are accepted, nothing is ever answered.
    proxy.black_hole(true);
    let started = Instant::now();
    let result = f.sync_all();
    let took = started.elapsed();
    eprintln!("fsync against a frozen server failed after {took:?}");
    assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(took < bound, "failed within {bound:?}: {took:?}");
    use std::os::fd::IntoRawFd;
    let fd = f.into_raw_fd();
    // SAFETY: closing a descriptor this test owns, once.
    let closed = unsafe { libc::close(fd) };
    assert_eq!(closed, -1, "close() fails too");
    // The server comes back: nothing may store the file behind the application's back.
    proxy.black_hole(false);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        c.head_object(&format!("{prefix}f.bin")).await.is_err(),
        "not stored"
    );
    drop(m);
    assert!(c.head_object(&format!("{prefix}f.bin")).await.is_err());
    // The upload the failed close kept for resuming goes with the next mount, told to keep
    // none.
    let again = mount_env(
        &env,
        &format!("{}:{prefix}", env.bucket),
        &["--resume-window", "0"],
        &vars,
    );
    let left = uploads_left(&c, &prefix).await;
    drop(again);
    assert!(left.is_empty(), "{left:?}");
}

/// SIGSTOP or SIGCONT to the stoppable server's process.
fn signal_server(pid: i32, signal: i32) {
    // SAFETY: kill(2) on the pid of a server the calling script started for this test.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal the server");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_stopped_with_sigstop_fails_close_in_bounded_time() {
    let (Some(env), Some(pid)) = (
        ServerEnv::from_prefix("S3MOUNT_STOPPABLE"),
        std::env::var("S3MOUNT_STOPPABLE_PID")
            .ok()
            .and_then(|p| p.parse::<i32>().ok()),
    ) else {
        eprintln!("skipped: no stoppable server (scripts/fault-suite starts one)");
        return;
    };
    let c = env.client();
    let prefix = unique_prefix("sigstop");
    let state = tempfile::tempdir().unwrap();
    let vars = [("XDG_STATE_HOME", state.path().as_os_str())];
    let m = mount_env(&env, &format!("{}:{prefix}", env.bucket), &[], &vars);
    let mut f = std::fs::File::create(m.path().join("f.bin")).unwrap();
    f.write_all(&pattern(40 << 20, 12)).unwrap();
    signal_server(pid, libc::SIGSTOP);
    let started = Instant::now();
    let result = f.sync_all();
    let took = started.elapsed();
    use std::os::fd::IntoRawFd;
    // SAFETY: closing a descriptor this test owns, once.
    let closed = unsafe { libc::close(f.into_raw_fd()) };
    signal_server(pid, libc::SIGCONT);
    eprintln!("fsync with the server stopped failed after {took:?}; close: {closed}");
    assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert_eq!(closed, -1);
    assert!(took < Duration::from_secs(45), "{took:?}");
    // Whatever the server held while stopped has run by now.
    tokio::time::sleep(Duration::from_secs(10)).await;
    drop(m);
    assert!(
        c.head_object(&format!("{prefix}f.bin")).await.is_err(),
        "not stored behind the application's back"
    );
    let again = mount_env(
        &env,
        &format!("{}:{prefix}", env.bucket),
        &["--resume-window", "0"],
        &vars,
    );
    let left = uploads_left(&c, &prefix).await;
    drop(again);
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_writers_and_sixteen_readers_stay_within_the_memory_cap() {
    let env = ServerEnv::main();
    let c = std::sync::Arc::new(env.client());
    let prefix = unique_prefix("memory");
    let size = size_from_env("S3MOUNT_FAULT_MEMORY_FILE", 24 << 20) as usize;
    let cap: u64 = size_from_env("S3MOUNT_FAULT_MEMORY_CAP", 64 << 20);
    let cap_arg = format!("{}M", cap >> 20);
    // Sixteen objects to read, put directly.
    let puts: Vec<_> = (0..16)
        .map(|i| {
            let (c, key) = (c.clone(), format!("{prefix}in/{i}.bin"));
            tokio::spawn(async move {
                c.put_object(
                    &key,
                    PutBody::from(pattern(size, 100 + i)),
                    &ObjectAttributes::default(),
                )
                .await
                .unwrap();
            })
        })
        .collect();
    for p in puts {
        p.await.unwrap();
    }
    let m = mount(
        &env,
        &format!("{}:{prefix}", env.bucket),
        &["--max-memory", &cap_arg],
    );
    let root = m.path().to_path_buf();
    std::fs::create_dir(root.join("out")).unwrap();
    let mut threads = Vec::new();
    for i in 0..16u64 {
        let path = root.join(format!("out/{i}.bin"));
        threads.push(run(move || {
            let data = pattern(size, 200 + i);
            let mut f = std::fs::File::create(&path)?;
            for chunk in data.chunks(1 << 20) {
                f.write_all(chunk)?;
            }
            f.sync_all()?;
            Ok::<_, std::io::Error>(sha256_hex(&data))
        }));
        let path = root.join(format!("in/{i}.bin"));
        threads.push(run(move || {
            let mut got = Vec::new();
            std::fs::File::open(&path)?.read_to_end(&mut got)?;
            Ok(sha256_hex(&got))
        }));
    }
    let mut sums = Vec::new();
    for t in threads {
        sums.push(
            t.wait(Duration::from_secs(300), &m)
                .unwrap_or_else(|e| panic!("{e}\n{}", m.log())),
        );
    }
    let peak = m.peak_rss();
    drop(m);
    for i in 0..16usize {
        assert_eq!(sums[2 * i + 1], sha256_hex(&pattern(size, 100 + i as u64)));
    }
    // docs/SEMANTICS.md: peak RSS stays within --max-memory plus this much.
    let constant: u64 = 32 << 20;
    eprintln!(
        "peak RSS {} MiB with --max-memory {} MiB",
        peak >> 20,
        cap >> 20
    );
    assert!(
        peak <= cap + constant,
        "peak RSS {} MiB > {} MiB cap + {} MiB",
        peak >> 20,
        cap >> 20,
        constant >> 20
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gets_in_flight_stay_within_the_connections_the_memory_cap_allows() {
    let env = ServerEnv::main();
    let c = std::sync::Arc::new(env.client());
    let prefix = unique_prefix("gets");
    let size = 8 << 20;
    for i in 0..8 {
        c.put_object(
            &format!("{prefix}{i}.bin"),
            PutBody::from(pattern(size, 300 + i)),
            &ObjectAttributes::default(),
        )
        .await
        .unwrap();
    }
    let proxy = FaultProxy::start(env.authority(), vec![]).await;
    // docs/SEMANTICS.md: at 16M, the connections' share (2 MiB) allows 4 GETs of file data
    // at once, whatever the readers want (without the cap, 15 were seen at once here).
    let m = mount(
        &through(&proxy),
        &format!("{}:{prefix}", env.bucket),
        &["--max-memory", "16M"],
    );
    let readers: Vec<_> = (0..8u64)
        .map(|i| {
            let path = m.path().join(format!("{i}.bin"));
            run(move || {
                let mut got = Vec::new();
                std::fs::File::open(&path)?.read_to_end(&mut got)?;
                Ok::<_, std::io::Error>(got)
            })
        })
        .collect();
    for (i, r) in readers.into_iter().enumerate() {
        let got = r
            .wait(Duration::from_secs(120), &m)
            .unwrap_or_else(|e| panic!("{e}\n{}", m.log()));
        assert!(
            got == pattern(size, 300 + i as u64),
            "{i}.bin byte for byte"
        );
    }
    let most = proxy.most_gets_at_once();
    assert!(
        (2..=4).contains(&most),
        "{most} GETs at once through a mount allowed 4 (at least 2 show readers overlapped)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn completed_uploads_leave_an_empty_journal_and_a_quick_next_mount() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("journal");
    let count = size_from_env("S3MOUNT_FAULT_UPLOADS", 20);
    let state = tempfile::tempdir().unwrap();
    let vars = [("XDG_STATE_HOME", state.path().as_os_str())];
    let m = mount_env(
        &env,
        &format!("{}:{prefix}", env.bucket),
        &["--part-size", "5M"],
        &vars,
    );
    // Just over one part each: every file is a multipart upload.
    let data = pattern((5 << 20) + 1000, 6);
    for i in 0..count {
        std::fs::write(m.path().join(format!("{i}.bin")), &data).unwrap();
    }
    drop(m);
    let journal = state.path().join("s3mount/uploads");
    let entries: Vec<_> = walk_files(&journal);
    assert!(entries.is_empty(), "journal entries left: {entries:?}");
    let started = Instant::now();
    let again = mount_env(&env, &format!("{}:{prefix}", env.bucket), &[], &vars);
    let took = started.elapsed();
    drop(again);
    eprintln!("{count} uploads; the next mount came up in {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk_files(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
