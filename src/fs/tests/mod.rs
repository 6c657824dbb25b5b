//! Core tests: the filesystem over the in-memory mock, no FUSE.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::s3::{
    Checksum, MetadataDirective, MockClient, ObjectAttributes, ObjectClient, Operation, PutBody,
};

fn fs_with(keys: &[&str], ttl: Duration) -> (Arc<MockClient>, S3Filesystem<MockClient>) {
    let mock = Arc::new(MockClient::new("b"));
    for k in keys {
        mock.insert(k, format!("content of {k}"));
    }
    let config = FsConfig {
        metadata_ttl: ttl,
        uid: 1000,
        gid: 1000,
        ..FsConfig::default()
    };
    (mock.clone(), S3Filesystem::new(mock, config))
}

async fn names(fs: &S3Filesystem<MockClient>, ino: Ino) -> Vec<(String, Kind)> {
    let fh = fs.opendir(ino).await.unwrap();
    let entries = fs.readdir(ino, fh, 0).unwrap();
    fs.releasedir(fh);
    entries
        .into_iter()
        .skip(2)
        .map(|(_, e)| (e.name, e.attr.kind))
        .collect()
}

async fn path(fs: &S3Filesystem<MockClient>, p: &str) -> FsResult<Attr> {
    let mut ino = ROOT_INO;
    let mut attr = fs.getattr(ino).await?;
    for part in p.split('/').filter(|s| !s.is_empty()) {
        attr = fs.lookup(ino, part).await?;
        ino = attr.ino;
    }
    Ok(attr)
}

#[tokio::test]
async fn markers_implicit_directories_and_shadowing() {
    let (_m, fs) = fs_with(
        &[
            "a.txt",
            "marker/",
            "implicit/deep/x",
            "both",
            "both/inner",
            "bad//name",
            "dots/../up",
            "dots/./here",
        ],
        Duration::from_secs(1),
    );
    assert_eq!(
        names(&fs, ROOT_INO).await,
        vec![
            ("a.txt".into(), Kind::File),
            ("bad".into(), Kind::Directory),
            ("both".into(), Kind::Directory),
            ("dots".into(), Kind::Directory),
            ("implicit".into(), Kind::Directory),
            ("marker".into(), Kind::Directory),
        ]
    );
    assert_eq!(
        path(&fs, "both").await.unwrap().kind,
        Kind::Directory,
        "directory shadows file"
    );
    assert_eq!(path(&fs, "implicit/deep/x").await.unwrap().kind, Kind::File);
    assert!(names(&fs, path(&fs, "marker").await.unwrap().ino)
        .await
        .is_empty());
    // `bad//name` has an empty segment and `..`/`.` segments cannot be names: skipped.
    assert!(names(&fs, path(&fs, "bad").await.unwrap().ino)
        .await
        .is_empty());
    assert!(names(&fs, path(&fs, "dots").await.unwrap().ino)
        .await
        .is_empty());
    assert!(matches!(path(&fs, "nope").await, Err(FsError::NotFound)));
    let long = "x".repeat(256);
    assert!(matches!(
        fs.lookup(ROOT_INO, &long).await,
        Err(FsError::NameTooLong)
    ));
    let file = path(&fs, "a.txt").await.unwrap();
    assert!(matches!(
        fs.lookup(file.ino, "x").await,
        Err(FsError::NotADirectory)
    ));
}

#[tokio::test]
async fn large_directory_lists_without_head_per_entry() {
    let keys: Vec<String> = (0..2500).map(|i| format!("big/f{i:05}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let (mock, fs) = fs_with(&refs, Duration::from_secs(60));
    let dir = path(&fs, "big").await.unwrap();
    let heads_before = mock.count(Operation::HeadObject);
    let listed = names(&fs, dir.ino).await;
    assert_eq!(listed.len(), 2500);
    assert_eq!(listed[0].0, "f00000");
    assert_eq!(listed[2499].0, "f02499");
    // What `ls -l` does next: a lookup and getattr per entry, all from the cache.
    for (name, _) in &listed {
        let a = fs.lookup(dir.ino, name).await.unwrap();
        assert_eq!(a.size, format!("content of big/{name}").len() as u64);
        fs.getattr(a.ino).await.unwrap();
    }
    assert_eq!(
        mock.count(Operation::HeadObject),
        heads_before,
        "no HEAD per entry"
    );
    assert_eq!(
        mock.count(Operation::ListObjectsV2),
        1 + 4,
        "lookup of big (1 list) + 4 pages (200 entries, then 1,000 at a time)"
    );
}

#[tokio::test]
async fn out_of_band_changes_show_after_the_ttl() {
    // Long enough that a loaded machine cannot let it lapse between two calls of the test.
    let ttl = Duration::from_secs(1);
    let (mock, fs) = fs_with(&["f"], ttl);
    let a = path(&fs, "f").await.unwrap();
    assert_eq!(a.size, "content of f".len() as u64);
    assert!(matches!(path(&fs, "g").await, Err(FsError::NotFound)));

    mock.insert("f", "changed, longer content");
    mock.insert("g", "new");
    // Within the TTL the cache answers (and the negative entry holds).
    assert_eq!(
        fs.getattr(a.ino).await.unwrap().size,
        "content of f".len() as u64
    );
    assert!(matches!(path(&fs, "g").await, Err(FsError::NotFound)));
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert_eq!(
        fs.getattr(a.ino).await.unwrap().size,
        "changed, longer content".len() as u64
    );
    assert_eq!(path(&fs, "g").await.unwrap().size, 3);

    mock.delete_object("f").await.unwrap();
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert!(matches!(fs.getattr(a.ino).await, Err(FsError::NotFound)));
    assert!(matches!(path(&fs, "f").await, Err(FsError::NotFound)));
}

#[tokio::test]
async fn subdirectory_listings_are_prefetched_and_used_once() {
    let ttl = Duration::from_secs(1);
    let (mock, fs) = fs_with(&["a/1", "a/2", "b/x/3", "top"], ttl);
    let fs = Arc::new(fs);
    let root = fs.opendir(ROOT_INO).await.unwrap();
    fs.prefetch_subdirectories(root);
    fs.releasedir(root);
    let a = path(&fs, "a").await.unwrap().ino;
    let b = path(&fs, "b").await.unwrap().ino;
    // The root, then both subdirectories in the background; wait for them to start.
    for _ in 0..200 {
        if mock.count(Operation::ListObjectsV2) >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let lists = mock.count(Operation::ListObjectsV2);
    let names_of = |v: Vec<(String, Kind)>| v.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    assert_eq!(names_of(names(&fs, a).await), ["1", "2"]);
    assert_eq!(names_of(names(&fs, b).await), ["x"]);
    assert_eq!(
        mock.count(Operation::ListObjectsV2),
        lists,
        "served from the prefetch"
    );
    // Each prefetched listing serves one opendir: the next one asks S3 again.
    mock.insert("a/new", "n");
    assert_eq!(names_of(names(&fs, a).await), ["1", "2", "new"]);
    assert_eq!(mock.count(Operation::ListObjectsV2), lists + 1);

    // A prefetched listing older than the TTL is not used.
    let root = fs.opendir(ROOT_INO).await.unwrap();
    fs.prefetch_subdirectories(root);
    fs.releasedir(root);
    mock.insert("b/late", "l");
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert_eq!(names_of(names(&fs, b).await), ["late", "x"]);
}

/// A walk (find, du) opens subdirectories in order: each opened directory starts the listings
/// of the ones after it, many ahead after small directories, one ahead after large ones (whose
/// listings would be done, and too old, long before they are opened).
#[tokio::test]
async fn a_walk_keeps_listings_started_ahead_sized_to_its_directories() {
    let mut keys: Vec<String> = (0..6).map(|i| format!("small/d{i}/f")).collect();
    for d in 0..4 {
        keys.extend((0..=1000).map(|i| format!("large/d{d}/f{i:04}")));
    }
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let (mock, fs) = fs_with(&keys, Duration::from_secs(30));
    let fs = Arc::new(fs);
    let settle = || async { tokio::time::sleep(Duration::from_millis(50)).await };
    let walk = |top: &'static str| {
        let (fs, mock) = (fs.clone(), mock.clone());
        async move {
            let top = path(&fs, top).await.unwrap().ino;
            let start = mock.count(Operation::ListObjectsV2);
            let fh = fs.opendir(top).await.unwrap();
            fs.prefetch_subdirectories(fh);
            let dirs: Vec<Ino> = fs
                .readdir(top, fh, 2)
                .unwrap()
                .iter()
                .map(|(_, e)| e.attr.ino)
                .collect();
            fs.releasedir(fh);
            // Listings made by the time each directory is opened (prefetches included).
            let mut made = Vec::new();
            for d in dirs {
                settle().await;
                made.push(mock.count(Operation::ListObjectsV2));
                let fh = fs.opendir(d).await.unwrap();
                fs.prefetch_subdirectories(fh);
                fs.releasedir(fh);
            }
            settle().await;
            (made, mock.count(Operation::ListObjectsV2) - start)
        }
    };
    let (made, listings) = walk("small").await;
    // The first two at the start; after the first small one, the other four: no listing
    // waits for the opendir, and none is made twice.
    let made: Vec<u64> = made.iter().map(|n| n - made[0]).collect();
    assert_eq!(
        made,
        [0, 4, 4, 4, 4, 4],
        "listings made before each opendir"
    );
    assert_eq!(listings, 1 + 6, "each directory listed once");

    let (made, listings) = walk("large").await;
    // Two pages each. d0 and d1 at the start, then one directory ahead at a time.
    let made: Vec<u64> = made.iter().map(|n| n - made[0]).collect();
    assert_eq!(made, [0, 0, 2, 4], "listings made before each opendir");
    assert_eq!(listings, 1 + 4 * 2, "each directory listed once");
}

#[tokio::test]
async fn zero_ttl_always_asks_s3() {
    let (mock, fs) = fs_with(&["f"], Duration::ZERO);
    path(&fs, "f").await.unwrap();
    path(&fs, "f").await.unwrap();
    assert_eq!(mock.count(Operation::HeadObject), 2);
}

#[tokio::test]
async fn s3fs_metadata_and_symlinks() {
    let (mock, fs) = fs_with(&[], Duration::from_secs(1));
    let attrs = s3fs_attrs(
        0o100600,
        &[("uid", "42"), ("gid", "43"), ("mtime", "1500000000.5")],
    );
    mock.put_object("f", PutBody::from("x"), &attrs)
        .await
        .unwrap();
    let link_attrs = s3fs_attrs(0o120777, &[]);
    mock.put_object("l", PutBody::from("target/path"), &link_attrs)
        .await
        .unwrap();

    let f = path(&fs, "f").await.unwrap();
    assert_eq!((f.perm, f.uid, f.gid), (0o600, 42, 43));
    assert_eq!(
        f.mtime,
        SystemTime::UNIX_EPOCH + Duration::new(1_500_000_000, 500_000_000)
    );
    let l = path(&fs, "l").await.unwrap();
    assert_eq!(l.kind, Kind::Symlink);
    assert_eq!(fs.readlink(l.ino).await.unwrap(), b"target/path");
}

#[tokio::test]
async fn open_read_and_stale_handles() {
    let (mock, fs) = fs_with(&[], Duration::from_secs(1));
    // Larger than the first prefetch window (about 32 MiB), so a far read needs a new GET.
    let size = 40 << 20;
    let data: Vec<u8> = (0..size as u32).map(|i| (i % 251) as u8).collect();
    mock.insert("f", data.clone());
    let f = path(&fs, "f").await.unwrap();
    let fh = fs.open(f.ino, false, false).await.unwrap();
    assert_eq!(
        &fs.read(fh, 1000, 5000).await.unwrap()[..],
        &data[1000..6000]
    );
    mock.insert("f", vec![0u8; size]);
    // Already fetched: still the version the handle opened.
    assert_eq!(&fs.read(fh, 6000, 10).await.unwrap()[..], &data[6000..6010]);
    let err = fs.read(fh, (38 << 20) as u64, 10).await.unwrap_err();
    assert_eq!(err.errno(), libc::ESTALE);
    fs.release_file(fh).await;
    assert!(matches!(fs.read(fh, 0, 1).await, Err(FsError::BadHandle)));
    // A new open sees the new version.
    let fh = fs.open(f.ino, false, false).await.unwrap();
    assert_eq!(
        &fs.read(fh, (38 << 20) as u64, 10).await.unwrap()[..],
        &[0u8; 10]
    );
    let dir_err = fs.open(ROOT_INO, false, false).await.unwrap_err();
    assert_eq!(dir_err.errno(), libc::EISDIR);
}

#[tokio::test]
async fn read_only_mount_refuses_writes() {
    let mock = Arc::new(MockClient::new("b"));
    mock.insert("f", "x");
    let fs = S3Filesystem::new(
        mock,
        FsConfig {
            read_only: true,
            ..FsConfig::default()
        },
    );
    let f = path(&fs, "f").await.unwrap();
    assert_eq!(errno_of(fs.open(f.ino, true, false).await), libc::EROFS);
    let me = attributes::Caller {
        uid: 0,
        gid: 0,
        process: 1,
    };
    assert_eq!(
        errno_of(fs.mkdir(ROOT_INO, "d", 0o755, me).await),
        libc::EROFS
    );
    assert_eq!(
        errno_of(fs.create(ROOT_INO, "n", 0o644, me).await),
        libc::EROFS
    );
    assert_eq!(errno_of(fs.unlink(ROOT_INO, "f").await), libc::EROFS);
    assert_eq!(
        errno_of(fs.rename(ROOT_INO, "f", ROOT_INO, "g", false).await),
        libc::EROFS
    );
}

#[tokio::test]
async fn prefix_mount_sees_only_its_prefix() {
    let mock = Arc::new(MockClient::new("b"));
    for k in ["top", "pre/inside", "pre/sub/x", "prefix-sibling/y"] {
        mock.insert(k, "v");
    }
    let fs = S3Filesystem::new(
        mock,
        FsConfig {
            prefix: "pre".into(),
            ..FsConfig::default()
        },
    );
    assert_eq!(
        names(&fs, ROOT_INO).await,
        vec![
            ("inside".into(), Kind::File),
            ("sub".into(), Kind::Directory)
        ]
    );
    assert!(matches!(path(&fs, "top").await, Err(FsError::NotFound)));
}

#[tokio::test]
async fn s3_failures_surface_as_eio_with_the_request() {
    let (mock, fs) = fs_with(&["f"], Duration::from_secs(1));
    mock.fail_next(
        Operation::ListObjectsV2,
        crate::s3::ErrorKind::InternalError,
        1,
    );
    let err = fs.opendir(ROOT_INO).await.unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert!(err.to_string().contains("ListObjectsV2"), "{err}");
    mock.fail_next(Operation::HeadObject, crate::s3::ErrorKind::AccessDenied, 1);
    assert_eq!(path(&fs, "f").await.unwrap_err().errno(), libc::EACCES);
}

fn me() -> attributes::Caller {
    attributes::Caller {
        uid: 1000,
        gid: 1000,
        process: 1,
    }
}

/// Asserts the `x-amz-meta-` values of object `key`, `None` where one must be absent.
async fn assert_meta(mock: &MockClient, key: &str, want: &[(&str, Option<&str>)]) {
    let m = meta(mock, key).await;
    for (k, v) in want {
        assert_eq!(m.get(*k).map(String::as_str), *v, "x-amz-meta-{k}");
    }
}

/// The errno of a call that must fail.
fn errno_of<T: std::fmt::Debug>(r: FsResult<T>) -> i32 {
    r.unwrap_err().errno()
}

/// Attributes as s3fs-fuse stores them: `mode`, and the other `x-amz-meta-` pairs given.
fn s3fs_attrs(mode: u32, more: &[(&str, &str)]) -> ObjectAttributes {
    let mut metadata = BTreeMap::from([("mode".to_string(), mode.to_string())]);
    metadata.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    ObjectAttributes {
        metadata,
        ..Default::default()
    }
}

async fn meta(mock: &MockClient, key: &str) -> BTreeMap<String, String> {
    mock.head_object(key).await.unwrap().metadata
}

#[tokio::test]
async fn create_write_close_stores_object_with_s3fs_metadata() {
    let (mock, fs) = fs_with(&[], Duration::from_secs(1));
    let (attr, fh) = fs
        .create(ROOT_INO, "new.txt", 0o100640, me())
        .await
        .unwrap();
    assert_eq!(attr.perm, 0o640);
    fs.write(fh, 0, b"hello ").await.unwrap();
    fs.write(fh, 6, b"world").await.unwrap();
    assert!(mock.object("new.txt").is_none(), "not visible before close");
    fs.flush(fh).await.unwrap();
    assert_eq!(&mock.object("new.txt").unwrap().data[..], b"hello world");
    let m = meta(&mock, "new.txt").await;
    assert_eq!(
        m.get("mode").map(String::as_str),
        Some("33184"),
        "S_IFREG|0640 in decimal"
    );
    assert_eq!(m.get("uid").map(String::as_str), Some("1000"));
    for t in ["mtime", "ctime", "atime"] {
        let v = m.get(t).unwrap_or_else(|| panic!("x-amz-meta-{t}"));
        let (secs, nanos) = v.split_once('.').unwrap_or((v, "0"));
        assert!(
            secs.parse::<u64>().is_ok() && nanos.parse::<u32>().is_ok(),
            "{t}: {v}"
        );
    }
    assert_eq!(
        mock.object("new.txt")
            .unwrap()
            .attrs
            .content_type
            .as_deref(),
        Some("text/plain"),
        "from the name"
    );
    fs.release_file(fh).await;
    assert_eq!(fs.getattr(attr.ino).await.unwrap().size, 11);
    assert_eq!(
        errno_of(fs.create(ROOT_INO, "new.txt", 0o644, me()).await),
        libc::EEXIST
    );
}

#[tokio::test]
async fn writes_through_a_duplicate_after_a_close_are_kept() {
    let (mock, fs) = fs_with(&[], Duration::from_secs(1));
    let (attr, fh) = fs.create(ROOT_INO, "f", 0o644, me()).await.unwrap();
    let dup = fs.open(attr.ino, true, false).await.unwrap();
    fs.write(fh, 0, b"first").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release_file(fh).await;
    fs.write(dup, 5, b" second").await.unwrap();
    fs.flush(dup).await.unwrap();
    fs.release_file(dup).await;
    assert_eq!(&mock.object("f").unwrap().data[..], b"first second");
}

#[tokio::test]
async fn open_existing_without_truncate_appends_and_overwrites() {
    let (mock, fs) = fs_with(&[], Duration::from_secs(1));
    mock.insert("f", "0123456789");
    let f = path(&fs, "f").await.unwrap();
    let fh = fs.open(f.ino, true, false).await.unwrap();
    assert_eq!(&fs.read(fh, 0, 4).await.unwrap()[..], b"0123");
    fs.write(fh, 10, b"AB").await.unwrap();
    fs.write(fh, 2, b"xy").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release_file(fh).await;
    assert_eq!(&mock.object("f").unwrap().data[..], b"01xy456789AB");
    let fh = fs.open(f.ino, true, true).await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release_file(fh).await;
    assert!(mock.object("f").unwrap().data.is_empty(), "O_TRUNC empties");
}

#[tokio::test]
async fn mkdir_rmdir_unlink_and_symlink() {
    let (mock, fs) = fs_with(&["full/x"], Duration::from_secs(1));
    let d = fs.mkdir(ROOT_INO, "d", 0o750, me()).await.unwrap();
    assert_eq!((d.kind, d.perm), (Kind::Directory, 0o750));
    assert!(
        mock.object("d/").is_some(),
        "a marker keeps the empty directory"
    );
    assert_eq!(
        errno_of(fs.mkdir(ROOT_INO, "d", 0o755, me()).await),
        libc::EEXIST
    );
    let full = path(&fs, "full").await.unwrap();
    assert_eq!(errno_of(fs.rmdir(ROOT_INO, "full").await), libc::ENOTEMPTY);
    assert_eq!(errno_of(fs.unlink(ROOT_INO, "full").await), libc::EISDIR);
    assert_eq!(errno_of(fs.rmdir(full.ino, "x").await), libc::ENOTDIR);
    fs.unlink(full.ino, "x").await.unwrap();
    assert!(mock.object("full/x").is_none());
    fs.rmdir(ROOT_INO, "d").await.unwrap();
    assert!(mock.object("d/").is_none());
    assert!(matches!(path(&fs, "d").await, Err(FsError::NotFound)));

    let l = fs
        .symlink(ROOT_INO, "link", "../target", me())
        .await
        .unwrap();
    assert_eq!(l.kind, Kind::Symlink);
    assert_eq!(&mock.object("link").unwrap().data[..], b"../target");
    assert_eq!(
        meta(&mock, "link").await.get("mode").map(String::as_str),
        Some("41471"),
        "S_IFLNK|0777"
    );
    assert_eq!(fs.readlink(l.ino).await.unwrap(), b"../target");
}

#[tokio::test]
async fn chmod_and_utimens_on_a_closed_file_use_copy_replace() {
    let (mock, fs) = fs_with(&["f"], Duration::from_secs(1));
    let f = path(&fs, "f").await.unwrap();
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    let chmod = attributes::SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    let touch = attributes::SetAttr {
        mtime: Some(when),
        ..Default::default()
    };
    fs.setattr(f.ino, chmod).await.unwrap();
    let a = fs.setattr(f.ino, touch).await.unwrap();
    assert_eq!((a.perm, a.mtime), (0o600, when));
    // Deferred: both changes go in one copy, once they are METADATA_WRITE_DELAY old.
    assert_eq!(mock.count(Operation::CopyObject), 0);
    assert_eq!(path(&fs, "f").await.unwrap().perm, 0o600, "shown meanwhile");
    fs.store_pending_metadata(METADATA_WRITE_DELAY).await;
    assert_eq!(mock.count(Operation::CopyObject), 0, "not due yet");
    tokio::time::sleep(METADATA_WRITE_DELAY).await;
    fs.store_pending_metadata(METADATA_WRITE_DELAY).await;
    assert_eq!(mock.count(Operation::CopyObject), 1);
    assert_eq!(
        mock.count(Operation::PutObject),
        0,
        "the data was not uploaded again"
    );
    assert_meta(
        &mock,
        "f",
        &[("mode", Some("33152")), ("mtime", Some("1600000000"))],
    )
    .await;
    assert_eq!(&mock.object("f").unwrap().data[..], b"content of f");
    // Truncate a closed file.
    let a = fs
        .setattr(
            f.ino,
            attributes::SetAttr {
                size: Some(3),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(a.size, 3);
    assert_eq!(&mock.object("f").unwrap().data[..], b"con");
    assert_eq!(
        meta(&mock, "f").await.get("mode").map(String::as_str),
        Some("33152"),
        "metadata kept"
    );
}

#[tokio::test]
async fn rename_files_and_directories() {
    let (mock, fs) = fs_with(
        &["a", "dir/one", "dir/sub/two", "other"],
        Duration::from_secs(1),
    );
    let a = path(&fs, "a").await.unwrap();
    fs.rename(ROOT_INO, "a", ROOT_INO, "b", false)
        .await
        .unwrap();
    assert!(mock.object("a").is_none());
    assert_eq!(&mock.object("b").unwrap().data[..], b"content of a");
    assert_eq!(
        fs.getattr(a.ino).await.unwrap().ino,
        a.ino,
        "the inode follows the rename"
    );
    assert_eq!(
        errno_of(fs.rename(ROOT_INO, "b", ROOT_INO, "other", true).await),
        libc::EEXIST
    );
    fs.rename(ROOT_INO, "b", ROOT_INO, "other", false)
        .await
        .unwrap();
    assert_eq!(
        &mock.object("other").unwrap().data[..],
        b"content of a",
        "replaced"
    );

    let sub = path(&fs, "dir/sub").await.unwrap();
    fs.rename(ROOT_INO, "dir", ROOT_INO, "moved", false)
        .await
        .unwrap();
    let mut keys = mock.keys();
    keys.sort();
    assert_eq!(keys, vec!["moved/one", "moved/sub/two", "other"]);
    let two = fs.lookup(sub.ino, "two").await.unwrap();
    let fh = fs.open(two.ino, false, false).await.unwrap();
    assert_eq!(
        &fs.read(fh, 0, 100).await.unwrap()[..],
        b"content of dir/sub/two",
        "descendants moved too"
    );
}

#[tokio::test]
async fn a_file_renamed_while_open_is_stored_at_its_new_name() {
    let (mock, fs) = fs_with(&[], Duration::from_secs(1));
    let (_, fh) = fs.create(ROOT_INO, "draft", 0o644, me()).await.unwrap();
    fs.write(fh, 0, b"part one,").await.unwrap();
    fs.rename(ROOT_INO, "draft", ROOT_INO, "final", false)
        .await
        .unwrap();
    fs.write(fh, 9, b" part two").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release_file(fh).await;
    assert_eq!(
        &mock.object("final").unwrap().data[..],
        b"part one, part two"
    );
    assert!(mock.object("draft").is_none());
}

#[tokio::test]
async fn an_existing_file_renamed_while_open_keeps_its_unwritten_bytes() {
    let (mock, fs) = fs_with(&[], Duration::from_secs(1));
    mock.insert("old", "0123456789");
    let f = path(&fs, "old").await.unwrap();
    let fh = fs.open(f.ino, true, false).await.unwrap();
    fs.write(fh, 0, b"ab").await.unwrap();
    fs.rename(ROOT_INO, "old", ROOT_INO, "new", false)
        .await
        .unwrap();
    fs.write(fh, 8, b"yz").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release_file(fh).await;
    assert_eq!(&mock.object("new").unwrap().data[..], b"ab234567yz");
    assert!(mock.object("old").is_none());
}

#[tokio::test]
async fn failed_upload_makes_close_fail_and_leaves_nothing() {
    let (mock, fs) = fs_with(&[], Duration::from_secs(1));
    let (_, fh) = fs.create(ROOT_INO, "doomed", 0o644, me()).await.unwrap();
    fs.write(fh, 0, b"data").await.unwrap();
    // The close fails; the last release must not store it behind the application's back,
    // though S3 would take it now.
    mock.fail_next(Operation::PutObject, crate::s3::ErrorKind::InternalError, 1);
    assert_eq!(errno_of(fs.flush(fh).await), libc::EIO);
    fs.release_file(fh).await;
    assert!(mock.object("doomed").is_none());
    assert_eq!(mock.count(Operation::PutObject), 1, "not sent again");
    assert_eq!(mock.open_uploads_settled().await, 0);
}

#[tokio::test]
async fn small_directory_listings_carry_s3fs_metadata() {
    let (mock, fs) = fs_with(&[], Duration::from_secs(1));
    let attrs = s3fs_attrs(0o100600, &[("mtime", "1500000000")]);
    mock.put_object("d/f", PutBody::from("x"), &attrs)
        .await
        .unwrap();
    mock.put_object("d/l", PutBody::from("f"), &s3fs_attrs(0o120777, &[]))
        .await
        .unwrap();
    let d = path(&fs, "d").await.unwrap();
    let fh = fs.opendir(d.ino).await.unwrap();
    let entries = fs.readdir(d.ino, fh, 2).unwrap();
    let f = &entries.iter().find(|(_, e)| e.name == "f").unwrap().1.attr;
    assert_eq!(
        (f.perm, f.mtime),
        (
            0o600,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000)
        )
    );
    let l = &entries.iter().find(|(_, e)| e.name == "l").unwrap().1.attr;
    assert_eq!(l.kind, Kind::Symlink);
    let heads = mock.count(Operation::HeadObject);
    // Listing again: the object is unchanged, so what HEAD said is kept without asking again.
    let fh = fs.opendir(d.ino).await.unwrap();
    assert_eq!(fs.readdir(d.ino, fh, 2).unwrap().len(), 2);
    assert_eq!(mock.count(Operation::HeadObject), heads);
}

#[tokio::test]
async fn stale_lookups_are_revalidated_by_one_listing_of_the_tree() {
    let keys: Vec<String> = (0..30).map(|i| format!("t/d{}/f{i}", i % 3)).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let ttl = Duration::from_millis(200);
    let (mock, fs) = fs_with(&refs, ttl);
    for k in &keys {
        path(&fs, k).await.unwrap();
    }
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    let (heads, lists) = (
        mock.count(Operation::HeadObject),
        mock.count(Operation::ListObjectsV2),
    );
    for k in &keys {
        path(&fs, k).await.unwrap();
    }
    // Stale, all of them: one listing of the root's whole tree confirms every inode.
    assert_eq!(mock.count(Operation::ListObjectsV2) - lists, 1);
    assert_eq!(mock.count(Operation::HeadObject), heads);

    // What changed elsewhere is still seen: new content, new metadata (same ETag, later
    // Last-Modified), a deleted file, a file now shadowed by a directory.
    mock.insert("t/d0/f0", "new content");
    let chmod = s3fs_attrs(0o100600, &[]);
    mock.copy_object("t/d1/f1", "t/d1/f1", &MetadataDirective::Replace(chmod))
        .await
        .unwrap();
    let later = mock.object("t/d1/f1").unwrap().last_modified + Duration::from_secs(5);
    mock.set_last_modified("t/d1/f1", later);
    mock.delete_object("t/d2/f2").await.unwrap();
    mock.insert("t/d0/f3/inner", "x");
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    assert_eq!(path(&fs, "t/d0/f0").await.unwrap().size, 11);
    assert_eq!(path(&fs, "t/d1/f1").await.unwrap().perm, 0o600);
    assert_eq!(
        path(&fs, "t/d2/f2").await.unwrap_err().errno(),
        libc::ENOENT
    );
    assert_eq!(path(&fs, "t/d0/f3").await.unwrap().kind, Kind::Directory);
    assert_eq!(path(&fs, "t/d1/f4").await.unwrap().size, 18);
}

#[tokio::test]
async fn a_tree_over_one_page_is_revalidated_by_its_own_entries() {
    let mut keys: Vec<String> = (0..1100).map(|i| format!("big/k{i:04}")).collect();
    keys.extend(["a".to_string(), "z".to_string()]);
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let ttl = Duration::from_millis(200);
    let (mock, fs) = fs_with(&refs, ttl);
    let (a, z) = (path(&fs, "a").await.unwrap(), path(&fs, "z").await.unwrap());
    let count = |op| mock.count(op);
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    let (heads, lists) = (
        count(Operation::HeadObject),
        count(Operation::ListObjectsV2),
    );
    // The whole tree does not fit: "a" comes before the page's end, "z" after it, so "z" is
    // revalidated by a page of the root's own entries from just before its name (no HEAD).
    assert_eq!(fs.getattr(a.ino).await.unwrap().size, a.size);
    assert_eq!(fs.lookup(ROOT_INO, "z").await.unwrap().ino, z.ino);
    assert_eq!(count(Operation::ListObjectsV2) - lists, 2);
    assert_eq!(count(Operation::HeadObject) - heads, 0);
    // From then on the root's own entries, one page with delimiter, cover both.
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    let (heads, lists) = (
        count(Operation::HeadObject),
        count(Operation::ListObjectsV2),
    );
    fs.lookup(ROOT_INO, "a").await.unwrap();
    fs.lookup(ROOT_INO, "z").await.unwrap();
    assert_eq!(count(Operation::ListObjectsV2) - lists, 1);
    assert_eq!(count(Operation::HeadObject), heads);
}

/// rsync and `ls -l` stat a directory's entries in name order after reading it, often more
/// than the TTL later. In a tree too large for one page, each stale entry is revalidated with a
/// page of its directory from just before its name, which answers the entries after it too:
/// no HEAD per entry.
#[tokio::test]
async fn entries_statted_in_order_are_revalidated_a_page_at_a_time() {
    // 999 files and a subdirectory of 2,000 keys, which sorts first.
    let mut keys: Vec<String> = (0..2000).map(|i| format!("big/a/{i:05}")).collect();
    keys.extend((0..999).map(|i| format!("big/k{i:05}")));
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let ttl = Duration::from_millis(300);
    let (mock, fs) = fs_with(&refs, ttl);
    let big = path(&fs, "big").await.unwrap().ino;
    // As readdirplus does: the kernel keeps a reference to every entry.
    let fh = fs.opendir(big).await.unwrap();
    let names: Vec<String> = fs
        .readdir(big, fh, 3)
        .unwrap()
        .into_iter()
        .map(|(_, e)| {
            fs.entry_returned(e.attr.ino);
            e.name
        })
        .collect();
    fs.releasedir(fh);
    assert_eq!(names.len(), 999);
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    let (heads, lists) = (
        mock.count(Operation::HeadObject),
        mock.count(Operation::ListObjectsV2),
    );
    for name in &names {
        fs.lookup(big, name).await.unwrap();
    }
    assert_eq!(
        mock.count(Operation::HeadObject),
        heads,
        "no HEAD per entry"
    );
    // The tree's first page (which shows it is too large), then a page of the directory.
    let made = mock.count(Operation::ListObjectsV2) - lists;
    assert!((2..=3).contains(&made), "{made} listings for 999 lookups");
}

#[tokio::test]
async fn cp_over_an_existing_file_stores_it_once_and_a_chmod_during_the_upload_is_copied() {
    let mock = Arc::new(MockClient::new("b"));
    mock.crc32c
        .store(true, std::sync::atomic::Ordering::Relaxed);
    mock.insert("f", "the old version");
    let config = FsConfig {
        metadata_ttl: Duration::from_secs(1),
        write: WriteConfig {
            part_size: 1000,
            ..WriteConfig::default()
        },
        ..FsConfig::default()
    };
    let fs = S3Filesystem::new(mock.clone(), config);
    let f = path(&fs, "f").await.unwrap();
    let data: Vec<u8> = (0..3500u32).map(|i| (i % 251) as u8).collect();
    let truncate = attributes::SetAttr {
        size: Some(0),
        ..Default::default()
    };
    // What cp does over an existing file, as the kernel passes it on: open for writing
    // (O_TRUNC comes apart, as a truncation), write several parts in order, close.
    let fh = fs.open(f.ino, true, false).await.unwrap();
    fs.setattr(f.ino, truncate.clone()).await.unwrap();
    for (i, chunk) in data.chunks(500).enumerate() {
        fs.write(fh, i as u64 * 500, chunk).await.unwrap();
    }
    fs.flush(fh).await.unwrap();
    fs.release_file(fh).await;
    assert_eq!(&mock.object("f").unwrap().data[..], &data[..]);
    // The upload carried the truncation's times: no copy of the object after it, and its
    // parts went with CRC32C (nothing of the old version was left to copy server-side).
    assert_eq!(mock.count(Operation::CopyObject), 0);
    assert_eq!(mock.count(Operation::UploadPartCopy), 0);
    assert_eq!(mock.upload_checksums(), vec![Checksum::Crc32c]);

    // A chmod after the upload was made is not in it: one copy stores it.
    let fh = fs.open(f.ino, true, false).await.unwrap();
    fs.setattr(f.ino, truncate).await.unwrap();
    fs.write(fh, 0, &data[..2500]).await.unwrap();
    let chmod = attributes::SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    fs.setattr(f.ino, chmod).await.unwrap();
    fs.write(fh, 2500, &data[2500..]).await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release_file(fh).await;
    assert_eq!(&mock.object("f").unwrap().data[..], &data[..]);
    assert_eq!(mock.count(Operation::CopyObject), 1);
    assert_eq!(mock.count(Operation::CreateMultipartUpload), 2);
    assert_eq!(
        meta(&mock, "f").await.get("mode").map(String::as_str),
        Some("33152")
    );
}

#[tokio::test]
async fn attributes_changed_before_a_rename_travel_with_its_copy() {
    let (mock, fs) = fs_with(&["d/.f.tmp", "g", "h"], Duration::from_secs(1));
    let d = path(&fs, "d").await.unwrap();
    let f = path(&fs, "d/.f.tmp").await.unwrap();
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    // What rsync does with each file it receives: chmod, utimens, rename into place.
    let change = attributes::SetAttr {
        mode: Some(0o640),
        ..Default::default()
    };
    fs.setattr(f.ino, change).await.unwrap();
    let change = attributes::SetAttr {
        mtime: Some(when),
        ..Default::default()
    };
    fs.setattr(f.ino, change.clone()).await.unwrap();
    fs.rename(d.ino, ".f.tmp", d.ino, "f", false).await.unwrap();
    assert_eq!(
        mock.count(Operation::CopyObject),
        1,
        "the rename's copy only"
    );
    assert_meta(
        &mock,
        "d/f",
        &[("mode", Some("33184")), ("mtime", Some("1600000000"))],
    )
    .await;
    assert!(mock.object("d/.f.tmp").is_none());
    fs.store_pending_metadata(Duration::ZERO).await;
    assert_eq!(
        mock.count(Operation::CopyObject),
        1,
        "nothing left to store"
    );

    // fsync stores them at once; an unlinked file's are dropped.
    let g = path(&fs, "g").await.unwrap();
    fs.setattr(g.ino, change.clone()).await.unwrap();
    let fh = fs.open(g.ino, false, false).await.unwrap();
    fs.fsync(g.ino, fh).await.unwrap();
    fs.release_file(fh).await;
    assert_eq!(mock.count(Operation::CopyObject), 2);
    assert_eq!(
        meta(&mock, "g").await.get("mtime").map(String::as_str),
        Some("1600000000")
    );
    let h = path(&fs, "h").await.unwrap();
    fs.setattr(h.ino, change).await.unwrap();
    fs.unlink(ROOT_INO, "h").await.unwrap();
    fs.store_pending_metadata(Duration::ZERO).await;
    assert_eq!(mock.count(Operation::CopyObject), 2);
}

#[tokio::test]
async fn deferred_attributes_that_cannot_be_stored_give_way_to_s3s() {
    let (mock, fs) = fs_with(&["f"], Duration::from_secs(1));
    let f = path(&fs, "f").await.unwrap();
    let change = attributes::SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    fs.setattr(f.ino, change.clone()).await.unwrap();
    mock.fail_next(Operation::CopyObject, crate::s3::ErrorKind::AccessDenied, 1);
    fs.store_pending_metadata(Duration::ZERO).await;
    assert_eq!(path(&fs, "f").await.unwrap().perm, 0o644, "what S3 has");
    // fsync says so.
    fs.setattr(f.ino, change).await.unwrap();
    mock.fail_next(Operation::CopyObject, crate::s3::ErrorKind::AccessDenied, 1);
    let fh = fs.open(f.ino, false, false).await.unwrap();
    assert_eq!(errno_of(fs.fsync(f.ino, fh).await), libc::EIO);
    fs.release_file(fh).await;
}

#[tokio::test]
async fn entries_known_only_from_a_listing_are_not_renewed_by_one() {
    // A directory too large for HEADs per entry: its entries show the listing's attributes,
    // and once expired a lookup asks for the object's own (s3fs mode), not another listing.
    let keys: Vec<String> = (1..1100).map(|i| format!("big/f{i:05}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let ttl = Duration::from_millis(200);
    let (mock, fs) = fs_with(&refs, ttl);
    let attrs = s3fs_attrs(0o100600, &[]);
    mock.put_object("big/f00000", PutBody::from("x"), &attrs)
        .await
        .unwrap();
    let big = path(&fs, "big").await.unwrap();
    assert_eq!(names(&fs, big.ino).await.len(), 1100);
    assert_eq!(fs.lookup(big.ino, "f00000").await.unwrap().perm, 0o644);
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    assert_eq!(fs.lookup(big.ino, "f00000").await.unwrap().perm, 0o600);
}

#[tokio::test]
async fn a_file_being_written_shows_in_a_listing_of_a_directory_never_listed() {
    let (_mock, fs) = fs_with(&[], Duration::from_secs(1));
    let x = fs.mkdir(ROOT_INO, "x", 0o755, me()).await.unwrap();
    let (_, fh) = fs.create(x.ino, "h", 0o644, me()).await.unwrap();
    fs.write(fh, 0, &[7u8; 70_000]).await.unwrap();
    let fh_dir = fs.opendir(x.ino).await.unwrap();
    let entries = fs.readdir(x.ino, fh_dir, 2).unwrap();
    fs.releasedir(fh_dir);
    let h: Vec<_> = entries.iter().filter(|(_, e)| e.name == "h").collect();
    assert_eq!(h.len(), 1, "listed while still open: {entries:?}");
    assert_eq!(h[0].1.attr.size, 70_000, "with its size so far");
    fs.flush(fh).await.unwrap();
    fs.release_file(fh).await;
    assert_eq!(names(&fs, x.ino).await, vec![("h".into(), Kind::File)]);
}

#[tokio::test]
async fn a_listing_fetched_ahead_is_not_served_after_the_mount_changed_its_directory() {
    let ttl = Duration::from_secs(5);
    let (mock, fs) = fs_with(&["t/impl/a/b/c.txt"], ttl);
    let fs = Arc::new(fs);
    let imp = path(&fs, "t/impl").await.unwrap().ino;
    // `ls t/impl` lists `a` ahead, in the background.
    let fh = fs.opendir(imp).await.unwrap();
    fs.prefetch_subdirectories(fh);
    fs.releasedir(fh);
    for _ in 0..200 {
        if mock.count(Operation::ListObjectsV2) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let a = path(&fs, "t/impl/a").await.unwrap().ino;
    let (_, fh) = fs.create(a, "new.txt", 0o644, me()).await.unwrap();
    fs.write(fh, 0, b"x\n").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release_file(fh).await;
    assert_eq!(
        names(&fs, a).await,
        vec![
            ("b".into(), Kind::Directory),
            ("new.txt".into(), Kind::File)
        ]
    );
}

#[tokio::test]
async fn a_file_unlinked_while_being_written_is_not_listed() {
    let (_mock, fs) = fs_with(&["d/keep"], Duration::from_secs(1));
    let d = path(&fs, "d").await.unwrap().ino;
    let (_, fh) = fs.create(d, "gone", 0o644, me()).await.unwrap();
    fs.write(fh, 0, b"data").await.unwrap();
    fs.unlink(d, "gone").await.unwrap();
    assert_eq!(names(&fs, d).await, vec![("keep".into(), Kind::File)]);
    fs.release_file(fh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_inode_per_name_under_racing_lookups_listings_and_renames() {
    let mut keys: Vec<String> = (0..40).map(|i| format!("dir/f{i}")).collect();
    keys.push("dir/sub/x".into());
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    // A zero TTL: every lookup and listing goes to the mock and upserts.
    let (_mock, fs) = fs_with(&refs, Duration::ZERO);
    let fs = Arc::new(fs);
    let dir = path(&fs, "dir").await.unwrap().ino;
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let fs = fs.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..30u64 {
                let i = (t * 7 + round * 3) % 40;
                match (t + round) % 4 {
                    0 => {
                        let fh = fs.opendir(dir).await.unwrap();
                        fs.releasedir(fh);
                    }
                    1 => {
                        let _ = fs.lookup(dir, &format!("f{i}")).await;
                    }
                    2 => {
                        // Renames back and forth keep the set of names.
                        let (a, b) = (format!("f{i}"), format!("g{i}"));
                        if fs.rename(dir, &a, dir, &b, true).await.is_ok() {
                            fs.rename(dir, &b, dir, &a, true).await.unwrap();
                        }
                    }
                    _ => {
                        let _ = fs.lookup(dir, "sub").await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every name has one inode, the one the table maps it to, and no two names share one.
    let fh = fs.opendir(dir).await.unwrap();
    let entries = fs.readdir(dir, fh, 2).unwrap();
    fs.releasedir(fh);
    let mut seen = std::collections::HashSet::new();
    for (_, e) in &entries {
        let looked_up = fs.lookup(dir, &e.name).await.unwrap();
        assert_eq!(looked_up.ino, e.attr.ino, "{} has one inode", e.name);
        assert!(seen.insert(e.attr.ino), "{} shares an inode", e.name);
    }
    assert_eq!(entries.len(), 41);
}

#[tokio::test]
async fn a_file_unlinked_while_open_stays_usable_and_is_never_stored() {
    let (mock, fs) = fs_with(&[], Duration::from_secs(1));
    let d = fs.mkdir(ROOT_INO, "d", 0o755, me()).await.unwrap();
    let (_, fh) = fs.create(d.ino, "f", 0o644, me()).await.unwrap();
    fs.write(fh, 0, &[1u8; 3000]).await.unwrap();
    fs.flush(fh).await.unwrap();
    assert!(mock.object("d/f").is_some());
    fs.unlink(d.ino, "f").await.unwrap();
    assert!(mock.object("d/f").is_none());
    // Still readable and writable through the open descriptor.
    fs.write(fh, 3000, b"more").await.unwrap();
    let got = fs.read(fh, 2998, 10).await.unwrap();
    assert_eq!(&got[..], &[1, 1, b'm', b'o', b'r', b'e']);
    // Neither the close nor the release stores it again.
    fs.flush(fh).await.unwrap();
    fs.release_file(fh).await;
    assert!(mock.object("d/f").is_none(), "never stored again");
    assert_eq!(mock.open_uploads_settled().await, 0);
    // And its directory can go.
    fs.rmdir(ROOT_INO, "d").await.unwrap();
    assert!(mock.keys().is_empty(), "{:?}", mock.keys());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_on_overlapping_names_leave_a_consistent_tree() {
    let (mock, fs) = fs_with(&[], Duration::ZERO);
    let fs = Arc::new(fs);
    let d = fs.mkdir(ROOT_INO, "s", 0o755, me()).await.unwrap().ino;
    let names = ["a", "b", "c", "sub"];
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let fs = fs.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..60u64 {
                let x = (t * 31 + round * 17) as usize;
                let (n, m) = (names[x % 4], names[(x / 4) % 4]);
                match (x / 16) % 6 {
                    0 | 1 => {
                        if let Ok((_, fh)) = fs.create(d, n, 0o644, me()).await {
                            let data = vec![t as u8; 500 + (x % 3000)];
                            let _ = fs.write(fh, 0, &data).await;
                            let _ = fs.flush(fh).await;
                            fs.release_file(fh).await;
                        }
                    }
                    2 => {
                        let _ = fs.unlink(d, n).await;
                    }
                    3 => {
                        let _ = fs.rename(d, n, d, m, false).await;
                    }
                    4 => {
                        if let Ok(a) = fs.lookup(d, n).await {
                            if let Ok(fh) = fs.open(a.ino, false, false).await {
                                let _ = fs.read(fh, 0, 4096).await;
                                fs.release_file(fh).await;
                            }
                        }
                    }
                    _ => {
                        if fs.mkdir(d, n, 0o755, me()).await.is_ok() {
                            let _ = fs.rmdir(d, n).await;
                        }
                        let fh = fs.opendir(d).await.unwrap();
                        let _ = fs.readdir(d, fh, 0);
                        fs.releasedir(fh);
                    }
                }
            }
        }));
    }
    let all = futures_util::future::join_all(tasks);
    for t in tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("no task hangs")
    {
        t.expect("no task panics");
    }
    // Everything is closed: what the core shows is what S3 has, name by name and byte by byte.
    let fh = fs.opendir(d).await.unwrap();
    let entries = fs.readdir(d, fh, 0).unwrap();
    fs.releasedir(fh);
    let mut shown: Vec<String> = entries
        .iter()
        .map(|(_, e)| e.name.clone())
        .filter(|n| n != "." && n != "..")
        .collect();
    shown.sort();
    let mut stored: Vec<String> = mock
        .keys()
        .into_iter()
        .filter_map(|k| {
            k.strip_prefix("s/")
                .map(|n| n.trim_end_matches('/').to_string())
        })
        .filter(|n| !n.is_empty())
        .collect();
    stored.sort();
    stored.dedup();
    assert_eq!(shown, stored);
    for name in shown {
        let a = fs.lookup(d, &name).await.unwrap();
        if a.kind != Kind::File {
            continue;
        }
        let fh = fs.open(a.ino, false, false).await.unwrap();
        let got = fs.read(fh, 0, 1 << 20).await.unwrap();
        fs.release_file(fh).await;
        let object = mock.object(&format!("s/{name}")).unwrap();
        assert_eq!(&got[..], &object.data[..], "{name} reads as S3 has it");
        assert_eq!(a.size, object.data.len() as u64, "{name}'s size");
    }
    assert_eq!(mock.open_uploads_settled().await, 0);
}

#[tokio::test]
async fn chmod_keeps_other_clients_metadata_and_content_type() {
    let (mock, fs) = fs_with(&[], Duration::ZERO);
    let mut theirs = crate::s3::ObjectAttributes {
        content_type: Some("text/csv".into()),
        ..Default::default()
    };
    theirs.metadata.insert("origin".into(), "etl-job-7".into());
    mock.insert_with("data.csv", "a,b\n", theirs);
    let a = fs.lookup(ROOT_INO, "data.csv").await.unwrap();
    let change = attributes::SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    fs.setattr(a.ino, change).await.unwrap();
    fs.store_pending_metadata(Duration::ZERO).await;
    let stored = mock.object("data.csv").unwrap().attrs;
    assert_eq!(stored.content_type.as_deref(), Some("text/csv"));
    assert_eq!(
        stored.metadata.get("origin").map(String::as_str),
        Some("etl-job-7")
    );
    assert_eq!(
        stored.metadata.get("mode").map(String::as_str),
        Some("33152")
    );
}

mod model;

mod writeback;

#[tokio::test]
async fn a_directory_listed_whole_answers_lookups_of_names_it_lacks() {
    let (mock, fs) = fs_with(&["d/a", "d/old_$folder$"], Duration::from_secs(60));
    let d = path(&fs, "d").await.unwrap().ino;
    assert_eq!(names(&fs, d).await.len(), 2, "a and old");
    let heads = mock.count(Operation::HeadObject);
    let lists = mock.count(Operation::ListObjectsV2);
    for i in 0..50 {
        assert_eq!(
            errno_of(fs.lookup(d, &format!("new{i}")).await),
            libc::ENOENT
        );
    }
    assert_eq!(mock.count(Operation::HeadObject), heads, "no HEAD per name");
    assert_eq!(mock.count(Operation::ListObjectsV2), lists, "nor a listing");
    assert_eq!(fs.lookup(d, "old").await.unwrap().kind, Kind::Directory);
    // A directory made here is empty: files made in it need no lookups.
    let made = fs.mkdir(ROOT_INO, "made", 0o755, me()).await.unwrap().ino;
    let lists = mock.count(Operation::ListObjectsV2);
    let (_, fh) = fs.create(made, "f", 0o644, me()).await.unwrap();
    fs.release_file(fh).await;
    assert_eq!(mock.count(Operation::ListObjectsV2), lists);
}

#[tokio::test]
async fn another_clients_new_key_shows_once_the_listing_expires() {
    let (mock, fs) = fs_with(&["d/a"], Duration::from_millis(50));
    let d = path(&fs, "d").await.unwrap().ino;
    names(&fs, d).await;
    assert_eq!(errno_of(fs.lookup(d, "b").await), libc::ENOENT);
    mock.insert("d/b", "theirs");
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(fs.lookup(d, "b").await.unwrap().size, 6);
}

/// A filesystem over `mock` whose reads keep what they fetch in the read cache at `dir`.
fn fs_with_read_cache(mock: Arc<MockClient>, dir: &std::path::Path) -> S3Filesystem<MockClient> {
    let config = FsConfig {
        metadata_ttl: Duration::ZERO,
        ..FsConfig::default()
    };
    let cache_config = disk_cache::DiskCacheConfig {
        dir: dir.to_path_buf(),
        max_bytes: 64 << 20,
        passthrough: false,
    };
    let cache =
        disk_cache::DiskCache::open(&cache_config, "b", "", config.read.block_size).unwrap();
    S3Filesystem::new(mock, config).with_read_cache(cache)
}

/// The whole file at `name`, read from start to end in the kernel's 1 MiB pieces.
async fn read_through(fs: &S3Filesystem<MockClient>, name: &str) -> Vec<u8> {
    let f = path(fs, name).await.unwrap();
    let fh = fs.open(f.ino, false, false).await.unwrap();
    let mut out = Vec::new();
    loop {
        let piece = fs.read(fh, out.len() as u64, 1 << 20).await.unwrap();
        if piece.is_empty() {
            break;
        }
        out.extend_from_slice(&piece);
    }
    fs.release_file(fh).await;
    out
}

/// Waits (a bounded time) until the read cache holds `bytes`: blocks are written off the
/// reader's path.
async fn cache_holds(fs: &S3Filesystem<MockClient>, bytes: u64) {
    for _ in 0..500 {
        if fs.read_cache_stats().unwrap().used_bytes == bytes {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the read cache holds {:?}, not {bytes} bytes",
        fs.read_cache_stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_cache_serves_later_opens_and_mounts_without_a_get() {
    let dir = tempfile::tempdir().unwrap();
    let mock = Arc::new(MockClient::new("b"));
    let size = (5 << 20) + 12_345;
    let data: Vec<u8> = (0..size as u32).map(|i| (i % 251) as u8).collect();
    mock.insert("f", data.clone());
    {
        let fs = fs_with_read_cache(mock.clone(), dir.path());
        assert_eq!(read_through(&fs, "f").await, data);
        cache_holds(&fs, size as u64).await;
        let gets = mock.count(Operation::GetObject);
        assert_eq!(read_through(&fs, "f").await, data);
        // Random reads too.
        let f = path(&fs, "f").await.unwrap();
        let fh = fs.open(f.ino, false, false).await.unwrap();
        for offset in [4_000_000u64, 17, 5 << 20, 2_000_000] {
            let got = fs.read(fh, offset, 70_000).await.unwrap();
            let end = (offset as usize + 70_000).min(size);
            assert_eq!(&got[..], &data[offset as usize..end]);
        }
        fs.release_file(fh).await;
        assert_eq!(mock.count(Operation::GetObject), gets, "no GET once cached");
        fs.unmounting().await;
    }
    // The next mount finds it.
    let fs = fs_with_read_cache(mock.clone(), dir.path());
    let gets = mock.count(Operation::GetObject);
    assert_eq!(read_through(&fs, "f").await, data);
    assert_eq!(
        mock.count(Operation::GetObject),
        gets,
        "no GET after a remount"
    );
    // Another client replaces the object: the next open reads the new version from S3.
    let newer = vec![7u8; 3 << 20];
    mock.insert("f", newer.clone());
    assert_eq!(read_through(&fs, "f").await, newer);
    assert!(mock.count(Operation::GetObject) > gets);
    cache_holds(&fs, newer.len() as u64).await;
}
