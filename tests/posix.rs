//! POSIX details through a real FUSE mount of the real test server, each checked both as the
//! mount shows it and as S3 stores it (the object's headers read directly): unlink of open
//! files, metadata kept across attribute changes and renames, the three times, link counts,
//! Content-Type from names, errnos at the limits.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::mount::mount;
use common::{unique_prefix, ServerEnv};
use s3mount::s3::*;

/// The object's headers, waiting up to 5 s for `ready` to hold (attribute changes of closed
/// files reach S3 a moment after the call returns).
async fn head_when(c: &S3Client, key: &str, ready: impl Fn(&ObjectHead) -> bool) -> ObjectHead {
    let mut last = None;
    for _ in 0..50 {
        if let Ok(h) = c.head_object(key).await {
            if ready(&h) {
                return h;
            }
            last = Some(h);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{key} never got there; last seen: {last:#?}");
}

fn meta<'a>(h: &'a ObjectHead, name: &str) -> Option<&'a str> {
    h.metadata.get(name).map(String::as_str)
}

/// `x-amz-meta-*` time as s3fs writes it.
fn stored_time(h: &ObjectHead, name: &str) -> SystemTime {
    let v = meta(h, name).unwrap_or_else(|| panic!("no x-amz-meta-{name}"));
    let (secs, nanos) = v.split_once('.').unwrap_or((v, "0"));
    SystemTime::UNIX_EPOCH
        + Duration::new(
            secs.parse().unwrap(),
            format!("{nanos:0<9}").parse().unwrap(),
        )
}

/// The names in `dir` with the file types `readdir` gives them, sorted.
fn listed(dir: &Path) -> Vec<(String, std::fs::FileType)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().into_string().unwrap(), e.file_type().unwrap())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

fn ctime(p: &Path) -> SystemTime {
    let m = std::fs::metadata(p).unwrap();
    SystemTime::UNIX_EPOCH + Duration::new(m.ctime() as u64, m.ctime_nsec() as u32)
}

fn atime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap().accessed().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_unlinked_while_open_stays_usable_and_is_never_stored() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("unlink-open");
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    let dir = m.path().join("d");
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("f");
    let mut f = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.write_all(&vec![7u8; 100_000]).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(f.metadata().unwrap().nlink(), 0, "fstat after unlink");
    // Still written and read through the descriptor.
    f.write_all(b"more").unwrap();
    let mut back = Vec::new();
    std::io::Seek::rewind(&mut f).unwrap();
    f.read_to_end(&mut back).unwrap();
    assert_eq!(back.len(), 100_004);
    assert_eq!(&back[100_000..], b"more");
    drop(f);
    assert!(!path.exists());
    std::fs::remove_dir(&dir).expect("the directory is empty once its file is unlinked");
    let c = env.client();
    assert!(
        c.head_object(&format!("{prefix}d/f")).await.is_err(),
        "the close did not store it again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn chmod_and_rename_keep_other_clients_metadata_and_content_headers() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("keep-meta");
    let c = env.client();
    let key = format!("{prefix}doc.bin");
    let attrs = ObjectAttributes {
        content_type: Some("application/x-custom".into()),
        content: ContentHeaders {
            cache_control: Some("max-age=60".into()),
            content_disposition: Some("attachment; filename=\"doc.bin\"".into()),
            content_encoding: Some("identity".into()),
            ..Default::default()
        },
        metadata: [("foreign".to_string(), "kept".to_string())].into(),
        ..Default::default()
    };
    c.put_object(&key, PutBody::from("payload"), &attrs)
        .await
        .unwrap();
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    let path = m.path().join("doc.bin");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let h = head_when(&c, &key, |h| meta(h, "mode") == Some("33152")).await;
    assert_eq!(meta(&h, "foreign"), Some("kept"));
    assert_eq!(h.content_type.as_deref(), Some("application/x-custom"));
    assert_eq!(h.content, attrs.content);

    std::fs::rename(&path, m.path().join("moved.bin")).unwrap();
    let h = c.head_object(&format!("{prefix}moved.bin")).await.unwrap();
    assert_eq!(meta(&h, "foreign"), Some("kept"));
    assert_eq!(meta(&h, "mode"), Some("33152"));
    assert_eq!(h.content_type.as_deref(), Some("application/x-custom"));
    assert_eq!(h.content, attrs.content);
    assert_eq!(
        std::fs::read(m.path().join("moved.bin")).unwrap(),
        b"payload"
    );

    // A directory marker written by another client keeps its type and metadata on chmod.
    let marker = format!("{prefix}dir/");
    let dir_attrs = ObjectAttributes {
        content_type: Some("application/x-directory".into()),
        metadata: [("foreign".to_string(), "dir".to_string())].into(),
        ..Default::default()
    };
    c.put_object(&marker, PutBody::from(""), &dir_attrs)
        .await
        .unwrap();
    std::fs::set_permissions(m.path().join("dir"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let h = c.head_object(&marker).await.unwrap();
    assert_eq!(meta(&h, "mode"), Some("16832"), "S_IFDIR|0700");
    assert_eq!(meta(&h, "foreign"), Some("dir"));
    assert_eq!(h.content_type.as_deref(), Some("application/x-directory"));
}

#[tokio::test(flavor = "multi_thread")]
async fn ctime_mtime_and_atime_are_kept_apart_with_nanoseconds() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("times");
    let spec = format!("{}:{prefix}", env.bucket);
    let c = env.client();
    let when = SystemTime::UNIX_EPOCH + Duration::new(1_500_000_000, 123_456_789);
    {
        // TTL 0: every stat asks the mount, so the times seen are the mount's own.
        let m = mount(&env, &spec, &["--metadata-ttl", "0"]);
        let f = m.path().join("f");
        std::fs::write(&f, "data").unwrap();
        let file = std::fs::File::options().write(true).open(&f).unwrap();
        file.set_modified(when).unwrap();
        drop(file);
        assert_eq!(mtime(&f), when, "nanoseconds kept");
        let before = ctime(&f);
        assert!(before > when, "utimens moved ctime, not to the mtime given");

        // chmod moves ctime only.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(ctime(&f) > before, "chmod moves ctime");
        assert_eq!(mtime(&f), when, "chmod leaves mtime");
        let h = head_when(&c, &format!("{prefix}f"), |h| {
            meta(h, "mode") == Some("33184")
        })
        .await;
        assert_eq!(stored_time(&h, "mtime"), when);
        assert!(stored_time(&h, "ctime") > when);

        // truncate(2) and O_TRUNC move mtime and ctime.
        let t = m.path().join("t");
        std::fs::write(&t, "0123456789").unwrap();
        let file = std::fs::File::options().write(true).open(&t).unwrap();
        file.set_modified(when).unwrap();
        drop(file);
        let c0 = ctime(&t);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::File::options()
            .write(true)
            .open(&t)
            .unwrap()
            .set_len(4)
            .unwrap();
        assert!(mtime(&t) > when, "truncate moves mtime");
        assert!(ctime(&t) > c0, "truncate moves ctime");
        let file = std::fs::File::options().write(true).open(&t).unwrap();
        file.set_modified(when).unwrap();
        drop(file);
        std::fs::File::options()
            .write(true)
            .truncate(true)
            .open(&t)
            .unwrap();
        assert!(mtime(&t) > when, "O_TRUNC moves mtime");
        assert_eq!(std::fs::metadata(&t).unwrap().len(), 0);

        // relatime: the first read after a change moves atime; one right after does not.
        let r = m.path().join("r");
        std::fs::write(&r, "read me").unwrap();
        let written = atime(&r);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::read(&r).unwrap();
        let read_once = atime(&r);
        assert!(read_once > written, "relatime: atime was not after mtime");
        std::thread::sleep(Duration::from_millis(20));
        std::fs::read(&r).unwrap();
        assert_eq!(
            atime(&r),
            read_once,
            "relatime: atime newer than mtime stays"
        );
    }
    // What S3 has after a remount: the times set, to the nanosecond.
    let m = mount(&env, &spec, &[]);
    assert_eq!(mtime(&m.path().join("f")), when);
    assert!(ctime(&m.path().join("f")) > when);
    let h = c.head_object(&format!("{prefix}f")).await.unwrap();
    assert_eq!(
        meta(&h, "mtime"),
        Some("1500000000.123456789"),
        "nine digits, as s3fs writes them"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn noatime_leaves_atime_and_strictatime_moves_it_at_every_read() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("atime");
    let spec = format!("{}:{prefix}", env.bucket);
    for (option, moves) in [("noatime", false), ("strictatime", true)] {
        let m = mount(&env, &spec, &["--metadata-ttl", "0", "-o", option]);
        let r = m.path().join(option);
        std::fs::write(&r, "x").unwrap();
        let a0 = atime(&r);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::read(&r).unwrap();
        let a1 = atime(&r);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::read(&r).unwrap();
        let a2 = atime(&r);
        if moves {
            assert!(a1 > a0 && a2 > a1, "{option}: {a0:?} {a1:?} {a2:?}");
        } else {
            assert_eq!((a1, a2), (a0, a0), "{option}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn directory_times_and_link_counts_follow_their_entries() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("dir-times");
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    let d = m.path().join("d");
    std::fs::create_dir(&d).unwrap();
    assert_eq!(std::fs::metadata(&d).unwrap().nlink(), 2);
    let before = mtime(&d);
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(d.join("f"), "x").unwrap();
    let after_create = mtime(&d);
    assert!(
        after_create > before,
        "creating an entry moves the directory's mtime"
    );
    assert!(ctime(&d) >= after_create);
    std::fs::create_dir(d.join("s1")).unwrap();
    std::fs::create_dir(d.join("s2")).unwrap();
    assert_eq!(
        std::fs::metadata(&d).unwrap().nlink(),
        4,
        "2 + two subdirectories"
    );
    std::thread::sleep(Duration::from_millis(20));
    std::fs::remove_dir(d.join("s2")).unwrap();
    assert_eq!(std::fs::metadata(&d).unwrap().nlink(), 3);
    assert!(mtime(&d) > after_create, "removing an entry moves it too");
    let renamed = mtime(&d);
    std::thread::sleep(Duration::from_millis(20));
    std::fs::rename(d.join("f"), d.join("g")).unwrap();
    assert!(mtime(&d) > renamed, "a rename in it moves it too");
}

#[tokio::test(flavor = "multi_thread")]
async fn new_files_get_a_content_type_from_their_name() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("ctype");
    let c = env.client();
    {
        let m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
        std::fs::write(m.path().join("a.txt"), "text").unwrap();
        std::fs::write(m.path().join("b.png"), [0x89, b'P', b'N', b'G']).unwrap();
        std::fs::write(m.path().join("c.weird"), "?").unwrap();
        // A rename keeps the type the object was stored with.
        std::fs::rename(m.path().join("a.txt"), m.path().join("a.renamed")).unwrap();
    }
    let ty = |h: ObjectHead| h.content_type;
    let a = ty(c.head_object(&format!("{prefix}a.renamed")).await.unwrap());
    assert_eq!(a.as_deref(), Some("text/plain"));
    let b = ty(c.head_object(&format!("{prefix}b.png")).await.unwrap());
    assert_eq!(b.as_deref(), Some("image/png"));
    let other = ty(c.head_object(&format!("{prefix}c.weird")).await.unwrap());
    assert_ne!(
        other.as_deref(),
        Some("text/plain"),
        "no guess for unknown names"
    );

    // A mime.types file of the user's replaces the table; `off` sets none.
    let map = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(map.path(), "application/x-weird weird\n").unwrap();
    {
        let m = mount(
            &env,
            &format!("{}:{prefix}", env.bucket),
            &["--content-type-map", map.path().to_str().unwrap()],
        );
        std::fs::write(m.path().join("d.weird"), "?").unwrap();
    }
    let d = ty(c.head_object(&format!("{prefix}d.weird")).await.unwrap());
    assert_eq!(d.as_deref(), Some("application/x-weird"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sizes_past_the_limit_are_efbig_and_the_root_is_changed_locally() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("limits");
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    let f = m.path().join("f");
    std::fs::write(&f, "x").unwrap();
    let err = std::fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(999_999_999_999_999)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFBIG), "{err}");
    assert_eq!(std::fs::read(&f).unwrap(), b"x", "the file is as it was");
    drop(m);

    // Whole-bucket mount: touch and chmod of the root send no request for the empty key.
    let m = mount(&env, &env.bucket, &[]);
    let status = std::process::Command::new("touch")
        .arg(m.path())
        .status()
        .unwrap();
    assert!(status.success(), "touch of the root");
    std::fs::set_permissions(m.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
    assert_eq!(
        std::fs::metadata(m.path()).unwrap().mode() & 0o7777,
        0o750,
        "kept for the mount's lifetime"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fifos_sockets_and_devices_are_stored_as_s3fs_does_and_survive_a_remount() {
    use std::os::unix::fs::FileTypeExt;
    let env = ServerEnv::main();
    let prefix = unique_prefix("special");
    let spec = format!("{}:{prefix}", env.bucket);
    let c = env.client();
    let dev = libc::makedev(1, 3);
    {
        let m = mount(&env, &spec, &[]);
        let cpath =
            |name: &str| std::ffi::CString::new(m.path().join(name).to_str().unwrap()).unwrap();
        // SAFETY: valid C strings; mknod and mkfifo only read them.
        unsafe {
            assert_eq!(libc::mkfifo(cpath("fifo").as_ptr(), 0o640), 0, "mkfifo");
            assert_eq!(
                libc::mknod(cpath("null").as_ptr(), libc::S_IFCHR | 0o600, dev),
                0,
                "mknod c"
            );
            assert_eq!(
                libc::mknod(cpath("blk").as_ptr(), libc::S_IFBLK | 0o600, dev),
                0,
                "mknod b"
            );
        }
        let sock = std::os::unix::net::UnixListener::bind(m.path().join("sock")).unwrap();
        drop(sock);

        // A FIFO opened through the mount is a local FIFO.
        let fifo = m.path().join("fifo");
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::write(fifo, b"through the pipe").unwrap())
        };
        assert_eq!(std::fs::read(&fifo).unwrap(), b"through the pipe");
        writer.join().unwrap();

        std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&fifo, m.path().join("fifo2")).unwrap();
        let h = head_when(&c, &format!("{prefix}fifo2"), |h| {
            meta(h, "mode") == Some("4480")
        })
        .await;
        assert_eq!(h.size, 0);
        let h = c.head_object(&format!("{prefix}null")).await.unwrap();
        assert_eq!(
            meta(&h, "mode"),
            Some(&*(libc::S_IFCHR | 0o600).to_string())
        );
        assert_eq!(meta(&h, "rdev"), Some(&*dev.to_string()));
    }
    let m = mount(&env, &spec, &[]);
    let ft = |name: &str| std::fs::symlink_metadata(m.path().join(name)).unwrap();
    assert!(ft("fifo2").file_type().is_fifo());
    assert_eq!(ft("fifo2").mode() & 0o7777, 0o600);
    assert!(ft("null").file_type().is_char_device());
    assert_eq!(ft("null").rdev(), dev);
    assert!(ft("blk").file_type().is_block_device());
    assert_eq!(ft("blk").rdev(), dev);
    assert!(ft("sock").file_type().is_socket());
    // Listed with their types, and removed like files.
    let kinds: Vec<(String, bool)> = listed(m.path())
        .into_iter()
        .map(|(name, t)| (name, t.is_file()))
        .collect();
    assert!(kinds.iter().all(|(_, regular)| !regular), "{kinds:?}");
    for name in ["fifo2", "null", "blk", "sock"] {
        std::fs::remove_file(m.path().join(name)).unwrap();
        assert!(c.head_object(&format!("{prefix}{name}")).await.is_err());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn directories_in_the_old_formats_are_directories() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("old-dirs");
    let c = env.client();
    let typed = ObjectAttributes {
        content_type: Some("application/x-directory".into()),
        ..Default::default()
    };
    let plain = ObjectAttributes::default();
    for (key, body, attrs) in [
        ("old", "", &typed),
        ("old/inner.txt", "in", &plain),
        ("empty-old", "", &typed),
        ("hadoop_$folder$", "", &plain),
    ] {
        c.put_object(&format!("{prefix}{key}"), PutBody::from(body), attrs)
            .await
            .unwrap();
    }
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    let names: Vec<(String, bool)> = listed(m.path())
        .into_iter()
        .map(|(name, t)| (name, t.is_dir()))
        .collect();
    assert_eq!(
        names,
        [
            ("empty-old".to_string(), true),
            ("hadoop".to_string(), true),
            ("old".to_string(), true)
        ]
    );
    assert!(std::fs::metadata(m.path().join("empty-old"))
        .unwrap()
        .is_dir());
    assert_eq!(
        std::fs::read(m.path().join("old/inner.txt")).unwrap(),
        b"in"
    );
    // New entries in them are written below `dir/`; removing them removes the old markers.
    std::fs::write(m.path().join("hadoop/new"), "n").unwrap();
    assert!(c.head_object(&format!("{prefix}hadoop/new")).await.is_ok());
    std::fs::remove_file(m.path().join("hadoop/new")).unwrap();
    std::fs::remove_dir(m.path().join("hadoop")).unwrap();
    std::fs::remove_dir(m.path().join("empty-old")).unwrap();
    assert!(c
        .head_object(&format!("{prefix}hadoop_$folder$"))
        .await
        .is_err());
    assert!(c.head_object(&format!("{prefix}empty-old")).await.is_err());
    assert!(!m.path().join("hadoop").exists());
    assert!(!m.path().join("empty-old").exists());
}

fn run(cmd: &mut std::process::Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn extended_attributes_and_acls_survive_a_remount() {
    use std::process::Command;
    let env = ServerEnv::main();
    let prefix = unique_prefix("xattr");
    let spec = format!("{}:{prefix}", env.bucket);
    let c = env.client();
    {
        let m = mount(&env, &spec, &[]);
        let f = m.path().join("f");
        std::fs::write(&f, "data").unwrap();
        let d = m.path().join("d");
        std::fs::create_dir(&d).unwrap();
        for target in [&f, &d] {
            let (ok, out) = run(Command::new("setfattr")
                .args(["-n", "user.color", "-v", "blue"])
                .arg(target));
            assert!(ok, "setfattr: {out}");
        }
        let (ok, out) = run(Command::new("setfacl").args(["-m", "u:1234:rw"]).arg(&f));
        assert!(ok, "setfacl: {out}");
        // Past S3's 2 KiB of metadata: E2BIG, nothing changed.
        let big = "x".repeat(3000);
        let (ok, out) = run(Command::new("setfattr")
            .args(["-n", "user.big", "-v", &big])
            .arg(&f));
        assert!(!ok && out.contains("Argument list too long"), "{out}");
        // Set, removed, gone.
        let (ok, _) = run(Command::new("setfattr")
            .args(["-n", "user.gone", "-v", "1"])
            .arg(&f));
        assert!(ok);
        let (ok, out) = run(Command::new("setfattr").args(["-x", "user.gone"]).arg(&f));
        assert!(ok, "setfattr -x: {out}");
        let (ok, out) = run(Command::new("getfattr").args(["-n", "user.gone"]).arg(&f));
        assert!(!ok && out.contains("No such attribute"), "{out}");
        let h = head_when(&c, &format!("{prefix}f"), |h| {
            h.metadata.get("xattr").is_some_and(|x| {
                s3mount::fs::xattr::decode(x).contains_key("system.posix_acl_access")
            })
        })
        .await;
        let stored = s3mount::fs::xattr::decode(&h.metadata["xattr"]);
        assert_eq!(
            stored.get("user.color").map(Vec::as_slice),
            Some(&b"blue"[..])
        );
        assert!(!stored.contains_key("user.gone") && !stored.contains_key("user.big"));
    }
    let m = mount(&env, &spec, &[]);
    for target in ["f", "d"] {
        let (ok, out) = run(Command::new("getfattr")
            .args(["-n", "user.color", "--only-values"])
            .arg(m.path().join(target)));
        assert!(ok && out.starts_with("blue"), "{target}: {out}");
    }
    let (ok, out) = run(Command::new("getfacl").arg("-n").arg(m.path().join("f")));
    assert!(ok && out.contains("user:1234:rw-"), "getfacl: {out}");
}
