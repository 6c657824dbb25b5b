//! The s3fs-fuse format both ways, on the same server: files written by s3fs-fuse (Debian's
//! `s3fs`) with modes, owners, times, xattrs, an ACL, a symlink and special files read through
//! s3mount with every attribute equal, and the other way round. Runs when `s3fs` is installed
//! (CI installs it); says so and passes otherwise.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::mount::{is_mounted, mount, unmount};
use common::{unique_prefix, ServerEnv};

/// A running `s3fs -f`, unmounted and reaped when dropped.
struct S3fs {
    dir: tempfile::TempDir,
    child: Child,
    _passwd: tempfile::TempDir,
}

impl S3fs {
    fn mount(env: &ServerEnv, prefix: &str) -> S3fs {
        let passwd = tempfile::tempdir().unwrap();
        let file = passwd.path().join("passwd");
        std::fs::write(
            &file,
            format!("{}:{}", env.access_key_id, env.secret_access_key),
        )
        .unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let dir = tempfile::Builder::new().prefix("s3fs-").tempdir().unwrap();
        let child = Command::new("s3fs")
            .arg(format!("{}:/{}", env.bucket, prefix.trim_end_matches('/')))
            .arg(dir.path())
            .arg("-f")
            .args(["-o", &format!("passwd_file={}", file.display())])
            .args(["-o", &format!("url={}", env.endpoint)])
            .args(["-o", "use_path_request_style"])
            .args(["-o", &format!("endpoint={}", env.region)])
            .args(["-o", "use_xattr"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3fs");
        let start = Instant::now();
        while !is_mounted(dir.path()) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "s3fs did not mount"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        S3fs {
            dir,
            child,
            _passwd: passwd,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for S3fs {
    fn drop(&mut self) {
        unmount(self.dir.path());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have_s3fs() -> bool {
    Command::new("s3fs").arg("--version").output().is_ok()
}

/// Runs `script` with `sh -e` in `dir`; its standard output.
fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Everything `stat`, `getfattr` and `getfacl` say of the tree, one line per name. Not the
/// device number: s3fs-fuse 1.90 keeps none (its devices read back as 0:0), s3mount stores
/// `x-amz-meta-rdev` (tests/posix.rs checks it survives).
fn attributes(dir: &Path) -> String {
    sh(
        dir,
        "for n in *; do stat -c '%n %f %u %g %s %x %y %z' \"$n\"; \
         [ -L \"$n\" ] || [ -p \"$n\" ] || [ -c \"$n\" ] || getfattr -d --absolute-names \"$n\" 2>/dev/null; \
         done; getfacl -n --absolute-names f.txt",
    )
}

/// A tree with every kind of attribute s3fs stores.
const WRITE_TREE: &str = "
echo hi > f.txt
setfattr -n user.color -v blue f.txt
setfacl -m u:1234:rw f.txt
touch -d '2020-01-02 03:04:05.123456789' f.txt
chmod 640 f.txt
mkfifo fifo
chown 12:34 fifo
python3 -c \"import os; os.mknod('dev', 0o20600, os.makedev(1, 3))\"
ln -s f.txt link
mkdir d
setfattr -n user.k -v v d
chmod 700 d
";

#[tokio::test(flavor = "multi_thread")]
async fn what_s3fs_writes_s3mount_shows_the_same_and_the_other_way_round() {
    if !have_s3fs() {
        eprintln!("s3fs is not installed: the s3fs-fuse cross-check does not run");
        return;
    }
    let env = ServerEnv::main();
    for writer_is_s3fs in [true, false] {
        let prefix = unique_prefix(if writer_is_s3fs {
            "by-s3fs"
        } else {
            "by-s3mount"
        });
        let spec = format!("{}:{prefix}", env.bucket);
        {
            if writer_is_s3fs {
                let s = S3fs::mount(&env, &prefix);
                sh(s.path(), WRITE_TREE);
            } else {
                let m = mount(&env, &spec, &[]);
                sh(m.path(), WRITE_TREE);
            }
        }
        // Both read what is stored now, each freshly mounted.
        let s = S3fs::mount(&env, &prefix);
        let m = mount(&env, &spec, &[]);
        let (by_s3fs, by_s3mount) = (attributes(s.path()), attributes(m.path()));
        assert_eq!(
            by_s3mount,
            by_s3fs,
            "written by {}",
            if writer_is_s3fs { "s3fs" } else { "s3mount" }
        );
        assert!(by_s3mount.contains("user.color=\"blue\""), "{by_s3mount}");
        assert!(by_s3mount.contains("user:1234:rw-"), "{by_s3mount}");
        assert!(
            by_s3mount.contains("2020-01-02 03:04:05.123456789"),
            "{by_s3mount}"
        );
    }
}
