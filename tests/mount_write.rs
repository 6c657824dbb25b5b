//! Writing through a real FUSE mount of the real test server: what cp, rsync, tar, git and
//! ordinary programs do.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::fault_proxy::{Fault, FaultProxy};
use common::mount::{last_stat, mount};
use common::{pattern, read_object, unique_prefix, ServerEnv};
use s3mount::s3::*;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

fn sha256_file(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    out.split_whitespace().next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn cp_of_a_large_file_in_and_out() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("cp");
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source.bin");
    // 3 GiB, written in pieces so the test itself stays small in memory.
    {
        let mut f = std::fs::File::create(&source).unwrap();
        for i in 0..96u64 {
            f.write_all(&pattern(32 << 20, i)).unwrap();
        }
    }
    let want = sha256_file(&source);
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    run(Command::new("cp")
        .arg(&source)
        .arg(m.path().join("big.bin")));
    assert_eq!(
        std::fs::metadata(m.path().join("big.bin")).unwrap().len(),
        3 << 30
    );
    let back = work.path().join("back.bin");
    run(Command::new("cp").arg(m.path().join("big.bin")).arg(&back));
    assert_eq!(sha256_file(&back), want, "read back through the mount");
    std::fs::remove_file(&back).unwrap();
    // Fetched directly from S3, without the mount.
    let c = env.client();
    let head = c.head_object(&format!("{prefix}big.bin")).await.unwrap();
    assert_eq!(head.size, 3 << 30);
    assert!(head.etag.contains('-'), "uploaded in parts: {}", head.etag);
    let direct = Command::new(env!("CARGO_BIN_EXE_s3mount-bench"))
        .args(["get", &format!("{prefix}big.bin"), "--sha256"])
        .env("S3MOUNT_TEST_ACCESS_KEY_ID", &env.access_key_id)
        .env("S3MOUNT_TEST_SECRET_ACCESS_KEY", &env.secret_access_key)
        .env("S3MOUNT_TEST_ENDPOINT", &env.endpoint)
        .env("S3MOUNT_TEST_BUCKET", &env.bucket)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&direct.stdout).contains(&want),
        "direct fetch: {direct:?}"
    );
    std::fs::remove_file(m.path().join("big.bin")).unwrap();
    assert!(c.head_object(&format!("{prefix}big.bin")).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn changing_one_byte_of_a_large_file_moves_one_part() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("onebyte");
    let key = format!("{prefix}big.bin");
    let work = tempfile::tempdir().unwrap();
    let local = work.path().join("big.bin");
    {
        let mut f = std::fs::File::create(&local).unwrap();
        for i in 0..8u64 {
            f.write_all(&pattern(32 << 20, i)).unwrap();
        }
    }
    let file = std::sync::Arc::new(std::fs::File::open(&local).unwrap());
    let body = PutBody::File {
        file,
        offset: 0,
        len: 256 << 20,
    };
    c.put_object(&key, body, &ObjectAttributes::default())
        .await
        .unwrap();
    // The same byte changed in the local copy and, in place, through the mount.
    let at = 100_000_007u64;
    let change = |path: &Path| {
        let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(b"!").unwrap();
    };
    change(&local);
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    change(&m.path().join("big.bin"));
    let (status, log) = m.terminate();
    assert!(status.success());
    let sent = last_stat(&log, "s3_bytes_sent");
    let received = last_stat(&log, "s3_bytes_received");
    assert!(
        sent < 16 << 20 && received < 16 << 20,
        "one 8 MiB part each way, not 256 MiB: sent {sent}, received {received}"
    );
    let head = c.head_object(&key).await.unwrap();
    assert_eq!(head.size, 256 << 20);
    assert!(
        head.etag.contains('-'),
        "assembled from parts: {}",
        head.etag
    );
    let back = read_object(&c, &key, None).await;
    assert_eq!(
        common::sha256_hex(&back),
        sha256_file(&local),
        "exactly the local file with the same byte changed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn namespace_operations() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("ns");
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    let p = m.path();
    std::fs::create_dir(p.join("empty")).unwrap();
    assert_eq!(
        c.head_object(&format!("{prefix}empty/"))
            .await
            .unwrap()
            .size,
        0,
        "marker object"
    );
    std::fs::create_dir_all(p.join("tree/a/b")).unwrap();
    std::fs::write(p.join("tree/a/b/file.txt"), "deep").unwrap();
    std::fs::write(p.join("tree/top.txt"), "top").unwrap();
    let err = std::fs::remove_dir(p.join("tree")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY));

    // Directory rename with everything in it.
    std::fs::rename(p.join("tree"), p.join("renamed")).unwrap();
    assert_eq!(
        std::fs::read_to_string(p.join("renamed/a/b/file.txt")).unwrap(),
        "deep"
    );
    assert!(!p.join("tree").exists());
    assert_eq!(
        &read_object(&c, &format!("{prefix}renamed/top.txt"), None).await[..],
        b"top"
    );
    assert!(c
        .head_object(&format!("{prefix}tree/top.txt"))
        .await
        .is_err());

    // Rename over an existing file, and RENAME_NOREPLACE.
    std::fs::write(p.join("x"), "new x").unwrap();
    std::fs::write(p.join("y"), "old y").unwrap();
    std::fs::rename(p.join("x"), p.join("y")).unwrap();
    assert_eq!(std::fs::read_to_string(p.join("y")).unwrap(), "new x");
    std::fs::write(p.join("z"), "z").unwrap();
    let out = Command::new("mv")
        .args(["--no-clobber", "-T"])
        .arg(p.join("z"))
        .arg(p.join("y"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(p.join("y")).unwrap(),
        "new x",
        "no-clobber kept the target"
    );

    // Symlinks as s3fs stores them.
    std::os::unix::fs::symlink("renamed/top.txt", p.join("link")).unwrap();
    assert_eq!(
        std::fs::read_link(p.join("link")).unwrap(),
        Path::new("renamed/top.txt")
    );
    assert_eq!(std::fs::read_to_string(p.join("link")).unwrap(), "top");
    assert_eq!(
        &read_object(&c, &format!("{prefix}link"), None).await[..],
        b"renamed/top.txt"
    );

    // Unsupported: consistent errors, no hang.
    let err = std::fs::hard_link(p.join("y"), p.join("hard")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));

    std::fs::remove_file(p.join("y")).unwrap();
    std::fs::remove_dir(p.join("empty")).unwrap();
    assert!(c.head_object(&format!("{prefix}empty/")).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn appends_overwrites_truncation_and_rename_while_open() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("modify");
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    let p = m.path();
    std::fs::write(p.join("f"), "0123456789").unwrap();
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(p.join("f"))
            .unwrap();
        f.write_all(b"ABC").unwrap();
    }
    assert_eq!(
        std::fs::read_to_string(p.join("f")).unwrap(),
        "0123456789ABC"
    );
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(p.join("f"))
            .unwrap();
        f.seek(SeekFrom::Start(3)).unwrap();
        f.write_all(b"xyz").unwrap();
    }
    assert_eq!(
        &read_object(&c, &format!("{prefix}f"), None).await[..],
        b"012xyz6789ABC"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(p.join("f"))
        .unwrap()
        .set_len(4)
        .unwrap();
    assert_eq!(std::fs::read_to_string(p.join("f")).unwrap(), "012x");

    // Shell redirection: a duplicated descriptor closes first.
    run(Command::new("sh").arg("-c").arg(format!(
        "exec 3>'{}'; echo one >&3; (echo two >&3); exec 3>&-",
        p.join("dup").display()
    )));
    assert_eq!(
        std::fs::read_to_string(p.join("dup")).unwrap(),
        "one\ntwo\n"
    );

    // Renamed while still open for writing: ends up, complete, at the new name.
    let mut f = std::fs::File::create(p.join("draft")).unwrap();
    f.write_all(&pattern(20 << 20, 5)).unwrap();
    std::fs::rename(p.join("draft"), p.join("final")).unwrap();
    f.write_all(b"the end").unwrap();
    drop(f);
    let got = read_object(&c, &format!("{prefix}final"), None).await;
    assert_eq!(got.len(), (20 << 20) + 7);
    assert_eq!(&got[20 << 20..], b"the end");
    assert!(c.head_object(&format!("{prefix}draft")).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn mode_and_mtime_survive_a_remount() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("meta");
    let spec = format!("{}:{prefix}", env.bucket);
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    {
        let m = mount(&env, &spec, &[]);
        std::fs::write(m.path().join("f"), "x").unwrap();
        std::fs::set_permissions(m.path().join("f"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        let f = std::fs::File::options()
            .write(true)
            .open(m.path().join("f"))
            .unwrap();
        f.set_modified(when).unwrap();
        drop(f);
        std::fs::create_dir(m.path().join("d")).unwrap();
        std::fs::set_permissions(m.path().join("d"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        // chmod of a closed file reaches S3 shortly after, while mounted.
        std::fs::write(m.path().join("g"), "y").unwrap();
        std::fs::set_permissions(m.path().join("g"), std::fs::Permissions::from_mode(0o604))
            .unwrap();
        let key = format!("{prefix}g");
        let c = env.client();
        let mut mode = None;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            mode = c
                .head_object(&key)
                .await
                .unwrap()
                .metadata
                .get("mode")
                .cloned();
            if mode.as_deref() == Some("33156") {
                break;
            }
        }
        assert_eq!(mode.as_deref(), Some("33156"), "S_IFREG|0604 stored");
    }
    let m = mount(&env, &spec, &[]);
    let meta = std::fs::metadata(m.path().join("f")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!(meta.modified().unwrap(), when);
    let dmeta = std::fs::metadata(m.path().join("d")).unwrap();
    assert_eq!(dmeta.mode() & 0o7777, 0o700);
}

#[tokio::test(flavor = "multi_thread")]
async fn rsync_twice_transfers_nothing_the_second_time() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("rsync");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    for i in 0..500u64 {
        let dir = src.join(format!("d{}/e{}", i % 10, i % 3));
        std::fs::create_dir_all(&dir).unwrap();
        let size = [0usize, 100, 4096, 70_000, 300_000][(i % 5) as usize];
        std::fs::write(dir.join(format!("f{i}.bin")), pattern(size, i)).unwrap();
    }
    std::os::unix::fs::symlink("d0/e0/f0.bin", src.join("link")).unwrap();
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    let dst = m.path().join("copy");
    run(Command::new("rsync")
        .arg("-a")
        .arg(format!("{}/", src.display()))
        .arg(&dst));
    run(Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(&src)
        .arg(&dst));
    // --itemize-changes names each file sent and why, should one be.
    let stats = run(Command::new("rsync")
        .args(["-a", "--stats", "--itemize-changes"])
        .arg(format!("{}/", src.display()))
        .arg(&dst));
    assert!(
        stats.contains("Number of regular files transferred: 0"),
        "the second rsync found nothing to send:\n{stats}"
    );
    // A changed file, with --inplace.
    std::fs::write(src.join("d1/e1/f1.bin"), b"changed").unwrap();
    run(Command::new("rsync")
        .args(["-a", "--inplace"])
        .arg(format!("{}/", src.display()))
        .arg(&dst));
    assert_eq!(std::fs::read(dst.join("d1/e1/f1.bin")).unwrap(), b"changed");
    // After a remount too, nothing needs sending: mode and mtime come back from S3.
    drop(m);
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    let stats = run(Command::new("rsync")
        .args(["-a", "--stats", "--itemize-changes"])
        .arg(format!("{}/", src.display()))
        .arg(m.path().join("copy")));
    assert!(
        stats.contains("Number of regular files transferred: 0"),
        "after a remount:\n{stats}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tar_and_git_work_inside_the_mount() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("tools");
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    for i in 0..40u64 {
        let dir = tree.join(format!("sub{}", i % 4));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("file{i}")), pattern(1000 * i as usize, i)).unwrap();
    }
    let archive = work.path().join("tree.tar");
    run(Command::new("tar")
        .arg("-cf")
        .arg(&archive)
        .arg("-C")
        .arg(work.path())
        .arg("tree"));
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(m.path()));
    run(Command::new("tar")
        .arg("-df")
        .arg(&archive)
        .arg("-C")
        .arg(m.path()));

    let repo = m.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let git = |args: &[&str]| {
        run(Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@example.invalid",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(&repo))
    };
    git(&["init", "-q"]);
    std::fs::write(repo.join("README"), "hello").unwrap();
    std::fs::create_dir(repo.join("src")).unwrap();
    std::fs::write(repo.join("src/main.c"), "int main(void) { return 0; }\n").unwrap();
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "first"]);
    std::fs::write(repo.join("README"), "hello again").unwrap();
    git(&["commit", "-q", "-am", "second"]);
    git(&["fsck", "--strict"]);
    assert!(git(&["log", "--oneline"]).lines().count() == 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn fio_random_writes_verify() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("fio");
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    let out = run(Command::new("fio")
        .args([
            "--name=verify",
            "--rw=randwrite",
            "--bs=4k",
            "--size=32m",
            "--verify=crc32c",
            "--do_verify=1",
            "--ioengine=psync",
            "--verify_state_save=0",
            "--direct=0",
            "--randrepeat=1",
        ])
        .arg(format!("--filename={}", m.path().join("fio.dat").display())));
    assert!(!out.contains("verify: bad"), "{out}");
    assert_eq!(
        std::fs::metadata(m.path().join("fio.dat")).unwrap().len(),
        32 << 20
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_upload_makes_close_fail_and_leaves_nothing_behind() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("fail");
    let proxy = FaultProxy::start(env.authority(), vec![]).await;
    let mut args_env = ServerEnv::main();
    args_env.endpoint = proxy.endpoint();
    let m = mount(
        &args_env,
        &format!("{}:{prefix}", env.bucket),
        &["--retry-attempts", "3"],
    );
    std::fs::write(m.path().join("ok.txt"), "fine").unwrap_or_else(|e| panic!("{e}\n{}", m.log()));
    let mut f = std::fs::File::create(m.path().join("lost.bin")).unwrap();
    // Every request fails from now on (more faults than the mount will try).
    proxy.push(std::iter::repeat_n(Fault::Status(503, "SlowDown"), 200));
    f.write_all(&pattern(20 << 20, 9)).unwrap();
    let err = f.sync_all().unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EIO),
        "fsync reports the failure"
    );
    drop(f);
    let log = m.log();
    assert!(
        log.contains("could not store the file in S3"),
        "a log line says why:\n{log}"
    );
    drop(m);
    drop(proxy);
    assert!(
        c.head_object(&format!("{prefix}lost.bin")).await.is_err(),
        "no partial object"
    );
    // The upload is kept in the journal for a copy of the file to resume; the next mount of
    // the same prefix, told to keep none, aborts it.
    let again = mount(
        &env,
        &format!("{}:{prefix}", env.bucket),
        &["--resume-window", "0"],
    );
    // The clean-up runs in the background once the mount is up.
    let mut uploads = c.list_multipart_uploads(&prefix, None).await.unwrap();
    for _ in 0..100 {
        if uploads.uploads.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        uploads = c.list_multipart_uploads(&prefix, None).await.unwrap();
    }
    assert!(
        uploads.uploads.is_empty(),
        "no orphaned multipart upload: {uploads:?}"
    );
    drop(again);
    assert_eq!(
        &read_object(&c, &format!("{prefix}ok.txt"), None).await[..],
        b"fine"
    );
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn listings_show_the_mounts_own_changes_at_once() {
    let env = ServerEnv::main();
    let c = env.client();
    let prefix = unique_prefix("ryw");
    c.put_object(
        &format!("{prefix}t/impl/a/b/c.txt"),
        PutBody::from("c"),
        &ObjectAttributes::default(),
    )
    .await
    .unwrap();
    // A long TTL: nothing here may depend on caches expiring.
    let m = mount(
        &env,
        &format!("{}:{prefix}", env.bucket),
        &["--metadata-ttl", "30"],
    );
    // A file created and still open shows in a directory never listed before.
    std::fs::create_dir(m.path().join("x")).unwrap();
    let mut f = std::fs::File::create(m.path().join("x/h")).unwrap();
    f.write_all(&[b'x'; 70_000]).unwrap();
    assert_eq!(listing(&m.path().join("x")), ["h"]);
    assert_eq!(
        std::fs::metadata(m.path().join("x/h")).unwrap().len(),
        70_000
    );
    drop(f);
    assert_eq!(listing(&m.path().join("x")), ["h"]);
    // A listing fetched ahead (of t/impl/a, while listing t/impl) is not served after the
    // mount changed that directory.
    assert_eq!(listing(&m.path().join("t/impl")), ["a"]);
    std::fs::write(m.path().join("t/impl/a/new.txt"), "x\n").unwrap();
    assert_eq!(listing(&m.path().join("t/impl/a")), ["b", "new.txt"]);
    // Removed and renamed entries go at once too.
    std::fs::rename(m.path().join("t/impl/a/new.txt"), m.path().join("x/moved")).unwrap();
    assert_eq!(listing(&m.path().join("t/impl/a")), ["b"]);
    assert_eq!(listing(&m.path().join("x")), ["h", "moved"]);
    std::fs::remove_file(m.path().join("x/h")).unwrap();
    assert_eq!(listing(&m.path().join("x")), ["moved"]);
}
