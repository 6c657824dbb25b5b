//! Interrupted uploads resume: through a real FUSE mount of the real test server, a copy cut
//! short (the mount killed, or its close failing with the server out of reach) is copied again
//! and sends only what S3 does not have; an upload nobody resumes goes when its window passes.
//!
//! Sizes are small by default so CI stays quick; `scripts/resume-suite` runs them at full size
//! (2 GiB) through `S3MOUNT_RESUME_SIZE`.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fault_proxy::proxied;
use common::mount::{command_ok, last_stat, mount_env, report, Mounted, QUICK};
use s3mount::s3::ObjectClient;

use common::{
    cp, object_sha256, pattern, sha256_hex, unique_prefix, uploads_left, write_pattern_file,
    ServerEnv,
};

const PART: u64 = 8 << 20;

fn size() -> u64 {
    std::env::var("S3MOUNT_RESUME_SIZE")
        .ok()
        .and_then(|v| s3mount::cli::parse_size(&v).ok())
        .unwrap_or(300 << 20)
}

/// Bytes of parts the upload journals under `state` record as stored.
fn journalled_bytes(state: &Path) -> u64 {
    let mut total = 0;
    let mut dirs = vec![state.join("s3mount/uploads")];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            total += text
                .lines()
                .filter_map(|l| l.strip_prefix("part "))
                .filter_map(|l| l.split(' ').nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    total
}

/// `s3mount uploads MOUNTPOINT --json`: the mount's resumable uploads.
fn resumable(m: &Mounted) -> Vec<serde_json::Value> {
    let v = report(m, "uploads");
    v["mounts"][0]["resumable_uploads"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Closes `f`; the errno if close(2) failed.
fn close(f: std::fs::File) -> Result<(), i32> {
    use std::os::fd::IntoRawFd;
    // SAFETY: closing a descriptor this test owns, once.
    match unsafe { libc::close(f.into_raw_fd()) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_cut_by_a_killed_mount_resumes_after_a_remount() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("resume-kill");
    let state = tempfile::tempdir().unwrap();
    let vars = [("XDG_STATE_HOME", state.path().as_os_str())];
    let src_dir = tempfile::tempdir().unwrap();
    let src = src_dir.path().join("big.bin");
    let size = size();
    let sha = write_pattern_file(&src, size, 21);
    let spec = format!("{}:{prefix}", env.bucket);

    let m = mount_env(&env, &spec, &[], &vars);
    let mut copy = Command::new("cp")
        .arg(&src)
        .arg(m.path().join("big.bin"))
        .spawn()
        .unwrap();
    let started = Instant::now();
    while journalled_bytes(state.path()) < size * 2 / 5 {
        assert!(
            copy.try_wait().unwrap().is_none(),
            "the copy ended before 40% was stored:\n{}",
            m.log()
        );
        assert!(started.elapsed() < Duration::from_secs(300), "too slow");
        std::thread::sleep(Duration::from_millis(5));
    }
    let log = m.kill();
    let stored_at_kill = journalled_bytes(state.path());
    assert!(!copy.wait().unwrap().success(), "the cut copy failed");
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        uploads_left(&c, &prefix).await.len(),
        1,
        "the upload is kept"
    );

    let again = mount_env(&env, &spec, &[], &vars);
    let listed = resumable(&again);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["path"], "/big.bin");
    cp(&src, &again.path().join("big.bin"), &again);
    let (_, log) = again.terminate();
    let sent = last_stat(&log, "s3_bytes_sent");
    eprintln!(
        "{} MiB; {} MiB recorded when the mount was killed; the second copy sent {} MiB ({:.1}%)",
        size >> 20,
        stored_at_kill >> 20,
        sent >> 20,
        100.0 * sent as f64 / size as f64
    );
    assert!(
        sent <= size * 3 / 5 + 2 * PART,
        "sent {sent} of {size}:\n{log}"
    );
    assert!(log.contains("completed a resumed upload"), "{log}");
    assert_eq!(object_sha256(&c, &format!("{prefix}big.bin")).await, sha);
    assert!(uploads_left(&c, &prefix).await.is_empty());
    assert_eq!(journalled_bytes(state.path()), 0, "the journal is empty");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_close_failed_by_an_unreachable_server_resumes_once_it_is_back() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("resume-close");
    let state = tempfile::tempdir().unwrap();
    let vars = [("XDG_STATE_HOME", state.path().as_os_str())];
    let (proxy, through) = proxied(&env).await;
    let m = mount_env(&through, &format!("{}:{prefix}", env.bucket), &QUICK, &vars);
    let size = (size() / 3).max(3 * PART) / PART * PART + 12345;
    let data = pattern(size as usize, 5);
    let path = m.path().join("f.bin");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&data).unwrap();
    // The parts written go up meanwhile; the last waits for the close.
    let full_parts = size / PART * PART;
    let started = Instant::now();
    while journalled_bytes(state.path()) < full_parts {
        assert!(started.elapsed() < Duration::from_secs(120), "{}", m.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.black_hole(true);
    assert_eq!(close(f), Err(libc::EIO));
    proxy.black_hole(false);
    assert!(
        m.wait_for_log("is kept for", 1, Duration::from_secs(10)),
        "{}",
        m.log()
    );
    let listed = resumable(&m);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["bytes_stored"].as_u64(), Some(full_parts));
    assert!(
        c.head_object(&format!("{prefix}f.bin")).await.is_err(),
        "nothing stored behind the application's back"
    );

    // The application writes it again, the server back: only the last part goes up.
    std::fs::write(&path, &data).unwrap_or_else(|e| panic!("{e}\n{}", m.log()));
    let (_, log) = m.terminate();
    let sent = last_stat(&log, "s3_bytes_sent");
    let first_round = full_parts;
    eprintln!(
        "{} bytes; both rounds sent {sent} (the first {first_round} and the retry of the close)",
        size
    );
    // The first round's parts, the last part's tries in the failed close, and once more.
    assert!(
        sent <= first_round + 3 * (size - full_parts) + PART,
        "{sent}:\n{log}"
    );
    assert_eq!(
        object_sha256(&c, &format!("{prefix}f.bin")).await,
        sha256_hex(&data)
    );
    assert!(uploads_left(&c, &prefix).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_not_resumed_within_its_window_is_aborted_and_one_can_be_aborted_by_hand() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("resume-window");
    let state = tempfile::tempdir().unwrap();
    let vars = [("XDG_STATE_HOME", state.path().as_os_str())];
    let (proxy, through) = proxied(&env).await;
    let spec = format!("{}:{prefix}", env.bucket);
    let fail_a_close = |m: &Mounted, name: &str| {
        let mut f = std::fs::File::create(m.path().join(name)).unwrap();
        f.write_all(&pattern(2 * PART as usize + 10, 3)).unwrap();
        let started = Instant::now();
        while journalled_bytes(state.path()) < 2 * PART {
            assert!(started.elapsed() < Duration::from_secs(60), "{}", m.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        proxy.black_hole(true);
        assert_eq!(close(f), Err(libc::EIO));
        proxy.black_hole(false);
    };

    // By hand: `s3mount uploads --abort PATH`.
    let m = mount_env(&through, &spec, &QUICK, &vars);
    fail_a_close(&m, "a.bin");
    assert_eq!(resumable(&m).len(), 1);
    let out = command_ok([
        "uploads".as_ref(),
        m.path().as_os_str(),
        "--abort".as_ref(),
        "/a.bin".as_ref(),
    ]);
    assert_eq!(out.trim(), "aborted 1 upload");
    assert!(resumable(&m).is_empty());
    assert!(uploads_left(&c, &prefix).await.is_empty());
    drop(m);

    // By the running mount, once a window of 3 s has passed.
    let mut args = QUICK.to_vec();
    args.extend(["--resume-window", "3s"]);
    let m = mount_env(&through, &spec, &args, &vars);
    fail_a_close(&m, "b.bin");
    assert_eq!(
        c.list_multipart_uploads(&prefix, None)
            .await
            .unwrap()
            .uploads
            .len(),
        1
    );
    let failed = Instant::now();
    let mut left = 1;
    while left > 0 && failed.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(200));
        left = c
            .list_multipart_uploads(&prefix, None)
            .await
            .unwrap()
            .uploads
            .len();
    }
    eprintln!("aborted {:?} after the close failed", failed.elapsed());
    assert_eq!(left, 0, "{}", m.log());
    assert!(
        failed.elapsed() >= Duration::from_secs(3),
        "not before its window"
    );
    assert!(resumable(&m).is_empty());
}
