//! The write-back queue over the mock: closes that return before S3 has the file, changes
//! to pending files, a queue left by a mount that ended, conflicts, the bound on room.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::fs::writeback::{Queue, WriteBackConfig};
use crate::s3::ErrorKind;

fn queue(dir: &std::path::Path, max_bytes: u64) -> Queue {
    let cfg = WriteBackConfig {
        dir: dir.to_path_buf(),
        max_bytes,
        delay: Duration::ZERO,
    };
    Queue::open(&cfg, "b", "").unwrap()
}

/// A filesystem with write-back into `dir`, its worker running.
fn wb_fs(mock: &Arc<MockClient>, dir: &std::path::Path) -> Arc<S3Filesystem<MockClient>> {
    wb_fs_max(mock, dir, 1 << 30)
}

fn wb_fs_max(
    mock: &Arc<MockClient>,
    dir: &std::path::Path,
    max_bytes: u64,
) -> Arc<S3Filesystem<MockClient>> {
    let config = FsConfig {
        uid: 1000,
        gid: 1000,
        ..FsConfig::default()
    };
    let fs =
        Arc::new(S3Filesystem::new(mock.clone(), config).with_write_back(queue(dir, max_bytes)));
    fs.start_write_back(&tokio::runtime::Handle::current());
    fs
}

/// S3 refuses every write for now (an outage as the queue sees it; lookups still work, as
/// they would from a cache).
fn outage(mock: &MockClient) {
    for op in [
        Operation::PutObject,
        Operation::CreateMultipartUpload,
        Operation::UploadPart,
    ] {
        mock.fail_next(op, ErrorKind::InternalError, 1_000_000);
    }
}

async fn write_file(fs: &S3Filesystem<MockClient>, name: &str, data: &[u8]) -> Ino {
    let (attr, fh) = fs.create(ROOT_INO, name, 0o100640, me()).await.unwrap();
    fs.write(fh, 0, data).await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release_file(fh).await;
    attr.ino
}

async fn read_all(fs: &S3Filesystem<MockClient>, ino: Ino) -> Vec<u8> {
    let fh = fs.open(ino, false, false).await.unwrap();
    let data = fs.read(fh, 0, 1 << 20).await.unwrap();
    fs.release_file(fh).await;
    data.to_vec()
}

/// Waits (up to 10 s) until the queue is empty.
async fn drained(fs: &S3Filesystem<MockClient>) {
    for _ in 0..1000 {
        if fs.write_back_info().unwrap().files == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("still queued: {:?}", fs.write_back_info());
}

/// The spools and entries in the cache directory once a store that just ended let go of its
/// spool (up to 2 s).
async fn cache_left(dir: &std::path::Path) -> Vec<String> {
    for _ in 0..200 {
        if cache_files(dir).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cache_files(dir)
}

/// The spools in the cache directory that hold something (besides its lock and the queue's
/// log; empty spools are kept for new files while the mount runs).
fn cache_files(dir: &std::path::Path) -> Vec<String> {
    let mut names = Vec::new();
    for d in std::fs::read_dir(dir).unwrap() {
        let d = d.unwrap();
        if d.file_type().unwrap().is_dir() {
            for f in std::fs::read_dir(d.path()).unwrap() {
                let f = f.unwrap();
                let name = f.file_name().into_string().unwrap();
                let empty = f.metadata().unwrap().len() == 0;
                if name != "lock" && name != "queue.log" && !empty {
                    names.push(name);
                }
            }
        }
    }
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_returns_before_s3_has_the_file_and_the_queue_stores_it_through_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let mock = Arc::new(MockClient::new("b"));
    let fs = wb_fs(&mock, dir.path());
    outage(&mock);
    let ino = write_file(&fs, "a.txt", b"hello").await;
    assert!(mock.object("a.txt").is_none(), "S3 is down");
    // Seen locally meanwhile: stat, listing, read.
    assert_eq!(fs.getattr(ino).await.unwrap().size, 5);
    assert_eq!(
        names(&fs, ROOT_INO).await,
        vec![("a.txt".into(), Kind::File)]
    );
    assert_eq!(read_all(&fs, ino).await, b"hello");
    assert_eq!(cache_files(dir.path()).len(), 1, "its spool");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(fs.write_back_info().unwrap().pending[0].failures > 0);
    mock.clear_failures();
    drained(&fs).await;
    let stored = mock.object("a.txt").unwrap();
    assert_eq!(&stored.data[..], b"hello");
    assert_eq!(
        stored.attrs.metadata.get("mode").map(String::as_str),
        Some("33184"),
        "S_IFREG|0640"
    );
    assert!(stored.attrs.metadata.contains_key("mtime"));
    assert!(
        cache_left(dir.path()).await.is_empty(),
        "nothing left locally"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_renamed_within_the_delay_is_stored_once_at_its_new_name() {
    let dir = tempfile::tempdir().unwrap();
    let mock = Arc::new(MockClient::new("b"));
    let cfg = WriteBackConfig {
        dir: dir.path().to_path_buf(),
        max_bytes: 1 << 30,
        delay: Duration::from_millis(400),
    };
    let fs = Arc::new(
        S3Filesystem::new(mock.clone(), FsConfig::default())
            .with_write_back(Queue::open(&cfg, "b", "").unwrap()),
    );
    fs.start_write_back(&tokio::runtime::Handle::current());
    // rsync's way: a temporary name, then a rename over the real one.
    write_file(&fs, ".f.XXXXXX", b"synced").await;
    fs.rename(ROOT_INO, ".f.XXXXXX", ROOT_INO, "f", false)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(mock.keys().is_empty(), "nothing stored within the delay");
    drained(&fs).await;
    assert_eq!(mock.keys(), vec!["f"]);
    assert_eq!(&mock.object("f").unwrap().data[..], b"synced");
    assert_eq!(mock.count(Operation::PutObject), 1);
    assert_eq!(mock.count(Operation::CopyObject), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_unlink_chmod_truncate_and_rewrite_of_pending_files_all_reach_s3() {
    let dir = tempfile::tempdir().unwrap();
    let mock = Arc::new(MockClient::new("b"));
    let fs = wb_fs(&mock, dir.path());
    outage(&mock);
    let a = write_file(&fs, "a", b"aaaa").await;
    let b = write_file(&fs, "b", b"bbbb").await;
    let c = write_file(&fs, "c", b"first version").await;
    let d = write_file(&fs, "d", b"dddddddd").await;
    fs.rename(ROOT_INO, "a", ROOT_INO, "a2", false)
        .await
        .unwrap();
    fs.unlink(ROOT_INO, "b").await.unwrap();
    let fh = fs.open(c, true, true).await.unwrap();
    fs.write(fh, 0, b"second").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release_file(fh).await;
    let chmod = SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    fs.setattr(a, chmod).await.unwrap();
    let truncate = SetAttr {
        size: Some(3),
        ..Default::default()
    };
    fs.setattr(d, truncate).await.unwrap();
    assert_eq!(fs.write_back_info().unwrap().files, 3, "a2, c, d");
    assert_eq!(
        names(&fs, ROOT_INO).await,
        vec![
            ("a2".into(), Kind::File),
            ("c".into(), Kind::File),
            ("d".into(), Kind::File)
        ]
    );
    mock.clear_failures();
    drained(&fs).await;
    let mut keys = mock.keys();
    keys.sort();
    assert_eq!(keys, vec!["a2", "c", "d"]);
    assert_eq!(&mock.object("a2").unwrap().data[..], b"aaaa");
    assert_eq!(
        mock.object("a2")
            .unwrap()
            .attrs
            .metadata
            .get("mode")
            .map(String::as_str),
        Some("33152"),
        "S_IFREG|0600"
    );
    assert_eq!(&mock.object("c").unwrap().data[..], b"second");
    assert_eq!(&mock.object("d").unwrap().data[..], b"ddd");
    assert!(cache_left(dir.path()).await.is_empty());
    let _ = b;
}

#[test]
fn two_mounts_of_one_bucket_never_share_a_queue() {
    let dir = tempfile::tempdir().unwrap();
    let first = queue(dir.path(), 1 << 30);
    let cfg = WriteBackConfig {
        dir: dir.path().to_path_buf(),
        max_bytes: 1 << 30,
        delay: Duration::ZERO,
    };
    let err = Queue::open(&cfg, "b", "").unwrap_err();
    assert!(err.contains("another s3mount"), "{err}");
    assert!(
        Queue::open(&cfg, "b", "other/").is_ok(),
        "another prefix has its own"
    );
    drop(first);
    assert!(
        Queue::open(&cfg, "b", "").is_ok(),
        "free once the first is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_an_older_version_queued_in_entry_files_are_stored_after_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let mock = Arc::new(MockClient::new("b"));
    let qdir = queue(dir.path(), 1 << 30).dir().to_path_buf();
    // What the version before the queue log left: a synced spool and its entry file beside it.
    std::fs::write(qdir.join("spool-old1"), b"queued before the upgrade").unwrap();
    let entry = serde_json::json!({
        "key": "old.txt", "size": 25, "since_ms": 1_700_000_000_000u64, "expect": {"absent": true},
        "changing": false, "conflict": null, "content_type": "text/plain", "content": {},
        "metadata": {"mode": "33188"}, "storage_class": null,
    });
    std::fs::write(qdir.join("spool-old1.entry"), entry.to_string()).unwrap();
    // A spool nothing names (open when that mount ended) is not stored.
    std::fs::write(qdir.join("spool-open"), b"never closed").unwrap();
    let fs = Arc::new(
        S3Filesystem::new(mock.clone(), FsConfig::default())
            .with_write_back(queue(dir.path(), 1 << 30)),
    );
    assert_eq!(fs.recover_write_back().await, 1);
    assert!(!qdir.join("spool-old1.entry").exists(), "in the log now");
    assert!(!qdir.join("spool-open").exists());
    fs.start_write_back(&tokio::runtime::Handle::current());
    drained(&fs).await;
    let stored = mock.object("old.txt").unwrap();
    assert_eq!(&stored.data[..], b"queued before the upgrade");
    assert_eq!(
        stored.attrs.metadata.get("mode").map(String::as_str),
        Some("33188")
    );
    assert_eq!(mock.keys(), vec!["old.txt"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_found_at_mount_is_shown_then_stored_with_its_attributes() {
    let dir = tempfile::tempdir().unwrap();
    let mock = Arc::new(MockClient::new("b"));
    mock.insert("sub/", "");
    let config = FsConfig {
        uid: 1000,
        gid: 1000,
        ..FsConfig::default()
    };
    {
        // A mount whose worker never ran (killed right after the closes).
        let fs = S3Filesystem::new(mock.clone(), config.clone())
            .with_write_back(queue(dir.path(), 1 << 30));
        write_file(&fs, "x", b"kept across mounts").await;
        let sub = path(&fs, "sub").await.unwrap().ino;
        let (_, fh) = fs.create(sub, "y", 0o100600, me()).await.unwrap();
        fs.write(fh, 0, b"in a directory").await.unwrap();
        fs.flush(fh).await.unwrap();
        fs.release_file(fh).await;
        fs.rename(ROOT_INO, "x", ROOT_INO, "x2", false)
            .await
            .unwrap();
        let (_, open) = fs.create(ROOT_INO, "open", 0o644, me()).await.unwrap();
        fs.write(open, 0, b"half").await.unwrap();
    }
    assert_eq!(mock.keys(), vec!["sub/"], "nothing stored yet");
    let fs = Arc::new(
        S3Filesystem::new(mock.clone(), config).with_write_back(queue(dir.path(), 1 << 30)),
    );
    assert_eq!(fs.recover_write_back().await, 2);
    // Shown before S3 has them, with their attributes.
    let x2 = path(&fs, "x2").await.unwrap();
    assert_eq!(x2.perm, 0o640);
    assert_eq!(read_all(&fs, x2.ino).await, b"kept across mounts");
    let y = path(&fs, "sub/y").await.unwrap();
    assert_eq!((y.perm, y.size), (0o600, 14));
    assert_eq!(
        names(&fs, ROOT_INO).await,
        vec![("sub".into(), Kind::Directory), ("x2".into(), Kind::File)]
    );
    fs.start_write_back(&tokio::runtime::Handle::current());
    drained(&fs).await;
    assert_eq!(&mock.object("x2").unwrap().data[..], b"kept across mounts");
    let y = mock.object("sub/y").unwrap();
    assert_eq!(&y.data[..], b"in a directory");
    assert_eq!(
        y.attrs.metadata.get("mode").map(String::as_str),
        Some("33152")
    );
    assert!(mock.object("open").is_none(), "never closed: never stored");
    let left = cache_left(dir.path()).await;
    assert!(left.is_empty(), "{left:?}");
}

async fn conflict(ignore_conditions: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mock = Arc::new(MockClient::new("b"));
    mock.ignore_conditions
        .store(ignore_conditions, std::sync::atomic::Ordering::Relaxed);
    mock.insert("f", "old");
    mock.insert("g", "old");
    let fs = wb_fs(&mock, dir.path());
    fs.probe_conditional_writes().await;
    mock.fail_next(Operation::PutObject, ErrorKind::InternalError, 1_000_000);
    let f = path(&fs, "f").await.unwrap().ino;
    let fh = fs.open(f, true, true).await.unwrap();
    fs.write(fh, 0, b"mine").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release_file(fh).await;
    write_file(&fs, "new", b"mine too").await;
    // Another client changes f and makes new while they wait.
    mock.insert("f", "theirs");
    mock.insert("new", "theirs too");
    mock.clear_failures();
    drained(&fs).await;
    assert_eq!(&mock.object("f").unwrap().data[..], b"theirs");
    assert_eq!(&mock.object("new").unwrap().data[..], b"theirs too");
    let copies: Vec<String> = mock
        .keys()
        .into_iter()
        .filter(|k| k.contains(".s3mount-conflict-"))
        .collect();
    assert_eq!(copies.len(), 2, "{copies:?}");
    for c in copies {
        let want: &[u8] = if c.starts_with("f.") {
            b"mine"
        } else {
            b"mine too"
        };
        assert_eq!(&mock.object(&c).unwrap().data[..], want, "{c}");
    }
    assert_eq!(fs.write_back_info().unwrap().conflicts, 2);
    assert_eq!(&mock.object("g").unwrap().data[..], b"old");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_write_never_replaces_another_clients_change() {
    conflict(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_conditional_writes_a_head_finds_the_change_first() {
    conflict(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_stores_at_once_and_a_full_cache_makes_closes_wait() {
    let dir = tempfile::tempdir().unwrap();
    let mock = Arc::new(MockClient::new("b"));
    let fs = wb_fs_max(&mock, dir.path(), 10);
    let (_, fh) = fs.create(ROOT_INO, "synced", 0o644, me()).await.unwrap();
    fs.write(fh, 0, b"12345").await.unwrap();
    fs.fsync(fs.handle_ino(fh).unwrap(), fh).await.unwrap();
    assert_eq!(&mock.object("synced").unwrap().data[..], b"12345");
    fs.release_file(fh).await;
    outage(&mock);
    write_file(&fs, "one", b"12345678").await;
    // A second file would pass the 10 bytes: its close waits for room.
    let (_, fh) = fs.create(ROOT_INO, "two", 0o644, me()).await.unwrap();
    fs.write(fh, 0, b"12345678").await.unwrap();
    let close = fs.flush(fh);
    tokio::pin!(close);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut close)
            .await
            .is_err(),
        "waits while S3 is away"
    );
    mock.clear_failures();
    tokio::time::timeout(Duration::from_secs(10), close)
        .await
        .expect("room once the first is stored")
        .unwrap();
    fs.release_file(fh).await;
    drained(&fs).await;
    assert_eq!(&mock.object("two").unwrap().data[..], b"12345678");
    // Larger than the whole cache: stored before the close returns.
    let (_, fh) = fs.create(ROOT_INO, "big", 0o644, me()).await.unwrap();
    fs.write(fh, 0, b"0123456789abc").await.unwrap();
    fs.flush(fh).await.unwrap();
    assert!(mock.object("big").is_some());
    fs.release_file(fh).await;
}
