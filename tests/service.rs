//! s3mount run as a system service, through real FUSE mounts of the real test server: mount(8)
//! and fstab with the helper `scripts/install` puts in place, ownership overrides, signals,
//! `s3mount status` during a large copy, the Prometheus endpoint, presigned URLs and browser
//! upload forms.
//!
//! **mount(8) without touching the machine.** mount(8) looks for its helper in `/sbin` only,
//! so the mount(8) tests run in a [`System`]: a mount namespace of their own in which
//! `scripts/install --destdir` has been laid over `/usr/local/bin` and `/sbin` (overlayfs, so
//! everything else there stays visible), and `/var/log`, `/var/lib` and `/run/mount` take their
//! writes into the test's temporary directory. mount(8), the helper and the daemon it starts
//! all run inside it (`nsenter`), exactly as on an installed system, and the machine's own
//! `/sbin`, `/usr/local/bin` and `/var` are never written. When the test ends, however it ends,
//! the guard unmounts, waits for every process of the namespace and removes the directory.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::mount::{binary, command, is_mounted, last_stat, mount};
use common::{pattern, read_object, sha256_hex, unique_prefix, ServerEnv};
use s3mount::s3::{ObjectAttributes, ObjectClient, PutBody};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Helpers

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd`, which must succeed; its stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn put(env: &ServerEnv, key: &str, data: &[u8], metadata: &[(&str, String)]) {
    let attrs = ObjectAttributes {
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        ..Default::default()
    };
    env.client()
        .put_object(key, PutBody::Bytes(data.to_vec().into()), &attrs)
        .await
        .unwrap_or_else(|e| panic!("PUT {key}: {e}"));
}

fn credentials_file(env: &ServerEnv, dir: &Path) -> PathBuf {
    let path = dir.join("credentials");
    std::fs::write(
        &path,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            env.access_key_id, env.secret_access_key
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// `s3mount status --json MOUNTPOINT`, run by `cmd`.
fn status_json(mut cmd: Command) -> Value {
    let out = run(&mut cmd);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}:\n{out}"))
}

fn status_of(mountpoint: &Path) -> Value {
    let mut cmd = Command::new(binary());
    cmd.args(["status", "--json"]).arg(mountpoint);
    status_json(cmd)
}

/// The HTTP status curl got, with `args`.
fn curl_code(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("curl");
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = body.rsplit_once('\n').unwrap_or(("", &body));
    (
        code.trim()
            .parse()
            .unwrap_or_else(|_| panic!("curl: {}", text(&out))),
        body.to_string(),
    )
}

/// S3 refused the request: 403 (AWS, MinIO) or 400 (Garage says InvalidRequest for an expired
/// URL or a policy condition not met), with an S3 error document.
fn assert_refused((code, body): (u16, String), what: &str) {
    assert!(
        (code == 403 || code == 400) && body.contains("<Error>"),
        "{what}: not refused: {code} {body}"
    );
    eprintln!("{what}: refused with {code}: {body}");
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not after {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn file_contains(path: &Path, needle: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle))
}

fn signal(pid: u32, name: &str) {
    run(Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string()));
}

/// Writes `data` to `path` and reads it back, through the mount: proof that it serves.
fn serves(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    assert_eq!(std::fs::read(path).unwrap(), data, "{}", path.display());
}

// ---------------------------------------------------------------------------------------------
// An installed system in a mount namespace of its own

/// `scripts/install --destdir` laid over this machine, in a mount namespace only the test's
/// commands enter. Dropping it unmounts what was mounted there and ends every process in it.
struct System {
    dir: tempfile::TempDir,
    holder: Child,
    pid: u32,
    mountpoints: Vec<PathBuf>,
}

impl System {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("s3mount-system-")
            .tempdir()
            .unwrap();
        let dest = dir.path().join("dest");
        let install = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install");
        run(Command::new(&install)
            .arg("--destdir")
            .arg(&dest)
            .arg("--binary")
            .arg(binary()));
        let helper = dest.join("sbin/mount.fuse.s3mount");
        assert_eq!(
            std::fs::read_link(&helper).unwrap(),
            Path::new("/usr/local/bin/s3mount"),
            "the helper links to the installed binary"
        );
        assert!(dest.join("sbin/mount.s3mount").is_symlink());
        assert!(dest.join("usr/local/bin/s3mount").is_file());
        for d in [
            "work/sbin",
            "work/bin",
            "work/log",
            "work/lib",
            "var/log",
            "var/lib",
        ] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        // Lower layers stay as they are; every write lands in the upper one, in `dir`.
        let script = r#"
            set -e
            overlay() { mount -t overlay overlay -o "lowerdir=$1,upperdir=$2,workdir=$3" "$1"; }
            overlay /usr/sbin "$T/dest/sbin" "$T/work/sbin"
            overlay /usr/local/bin "$T/dest/usr/local/bin" "$T/work/bin"
            overlay /var/log "$T/var/log" "$T/work/log"
            overlay /var/lib "$T/var/lib" "$T/work/lib"
            if [ -d /run/mount ]; then mount -t tmpfs -o mode=0755 s3mount-test /run/mount; fi
            echo ready
            exec cat > /dev/null
        "#;
        let mut holder = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
            ])
            .env("T", dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("unshare");
        let mut line = String::new();
        let _ = BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line);
        if line.trim() != "ready" {
            let mut err = String::new();
            let _ = holder.stderr.take().unwrap().read_to_string(&mut err);
            let _ = holder.kill();
            let _ = holder.wait();
            panic!("cannot set up the test system's mount namespace: {err}");
        }
        let pid = holder.id();
        Self {
            dir,
            holder,
            pid,
            mountpoints: Vec::new(),
        }
    }

    /// A command run inside the system.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.pid.to_string())
            .args(["-m", "--", program]);
        c
    }

    /// mount(8) with `args`, run as a service manager runs it: with no environment at all.
    fn mount8(&self, args: &[&std::ffi::OsStr]) -> Output {
        self.cmd("env")
            .args(["-i", "mount"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("mount(8)")
    }

    /// `path` of the system, as the test (outside it) reaches it.
    fn path(&self, path: &Path) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid)).join(path.strip_prefix("/").unwrap())
    }

    /// A new empty directory to mount on; unmounted when the system is dropped.
    fn mountpoint(&mut self, name: &str) -> PathBuf {
        let p = self.dir.path().join("mnt").join(name);
        std::fs::create_dir_all(&p).unwrap();
        self.mountpoints.push(p.clone());
        p
    }

    fn tmp(&self) -> &Path {
        self.dir.path()
    }

    /// The system's mount table.
    fn mountinfo(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/mountinfo", self.pid)).unwrap_or_default()
    }

    fn is_mounted(&self, mountpoint: &Path) -> bool {
        let want = mountpoint.to_string_lossy();
        self.mountinfo()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(&*want))
    }

    /// Processes in the system's namespace other than its holder.
    fn processes(&self) -> Vec<u32> {
        let Ok(ns) = std::fs::read_link(format!("/proc/{}/ns/mnt", self.pid)) else {
            return Vec::new();
        };
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| *pid != self.pid)
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok() == Some(ns.clone())
            })
            .collect()
    }
}

impl Drop for System {
    fn drop(&mut self) {
        for mp in self.mountpoints.clone().iter().rev() {
            if self.is_mounted(mp) {
                let _ = self.cmd("umount").arg(mp).stderr(Stdio::null()).status();
            }
            if self.is_mounted(mp) {
                let _ = self.cmd("umount").arg("-l").arg(mp).status();
            }
        }
        // The daemons end once unmounted, their watchdogs with them.
        let start = Instant::now();
        while !self.processes().is_empty() && start.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
        for pid in self.processes() {
            eprintln!("test system: process {pid} did not end after its unmount; killing it");
            // SAFETY: kill(2) of a process this test started in its own namespace.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        drop(self.holder.stdin.take());
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// mount(8) and fstab

/// Where a mount(8) test starts: an object `hello.txt` under a prefix of its own, an installed
/// system, and a credentials file for it.
struct Case {
    env: ServerEnv,
    prefix: String,
    sys: System,
    etc: PathBuf,
    creds: PathBuf,
    /// `bucket:prefix`
    source: String,
}

impl Case {
    async fn new(name: &str, hello: &[u8]) -> Self {
        let env = ServerEnv::main();
        let prefix = unique_prefix(name);
        put(&env, &format!("{prefix}hello.txt"), hello, &[]).await;
        let sys = System::new();
        let etc = sys.tmp().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        let creds = credentials_file(&env, &etc);
        let source = format!("{}:{prefix}", env.bucket);
        Self {
            env,
            prefix,
            sys,
            etc,
            creds,
            source,
        }
    }
}

/// Lines of `/proc/mounts` (of the system) at `mountpoint`.
fn proc_mounts_at(sys: &System, mountpoint: &Path) -> Vec<String> {
    let want = mountpoint.to_string_lossy().to_string();
    run(sys.cmd("cat").arg("/proc/mounts"))
        .lines()
        .filter(|l| l.split(' ').nth(1) == Some(want.as_str()))
        .map(str::to_string)
        .collect()
}

/// Reads `hello.txt` and writes `written.txt` through `mp` inside the system, and checks the
/// write reached S3.
async fn read_and_write(env: &ServerEnv, sys: &System, mp: &Path, prefix: &str, hello: &[u8]) {
    let got = run(sys.cmd("cat").arg(mp.join("hello.txt")));
    assert_eq!(got.as_bytes(), hello, "read through the mount");
    let data = pattern(3 << 20, 7);
    let local = sys.tmp().join(format!("{}.bin", fastrand::u32(..)));
    std::fs::write(&local, &data).unwrap();
    run(sys.cmd("cp").arg(&local).arg(mp.join("written.bin")));
    run(sys
        .cmd("sh")
        .arg("-c")
        .arg(format!("echo small > '{}'", mp.join("small.txt").display())));
    let c = env.client();
    assert_eq!(
        read_object(&c, &format!("{prefix}written.bin"), None).await,
        data,
        "written through the mount, read from S3"
    );
    assert_eq!(
        read_object(&c, &format!("{prefix}small.txt"), None).await,
        &b"small\n"[..]
    );
    // And through the test's own view of the system.
    assert_eq!(
        sha256_hex(&std::fs::read(sys.path(&mp.join("written.bin"))).unwrap()),
        sha256_hex(&data)
    );
}

/// The daemon of the mount at `mp`: it answers `s3mount status` inside the system.
fn daemon_status(sys: &System, mp: &Path) -> Value {
    let mut cmd = sys.cmd("/usr/local/bin/s3mount");
    cmd.args(["status", "--json"]).arg(mp);
    status_json(cmd)
}

fn assert_clean_unmount(sys: &System, mp: &Path, pid: u64, log: &Path) {
    let out = sys.cmd("umount").arg(mp).output().unwrap();
    assert!(out.status.success(), "umount: {}", text(&out));
    assert!(!sys.is_mounted(mp));
    wait_until(
        "the daemon ends after umount",
        Duration::from_secs(20),
        || !Path::new(&format!("/proc/{pid}")).exists(),
    );
    let log = std::fs::read_to_string(log).unwrap_or_default();
    assert!(log.contains("unmounted"), "{log}");
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(warnings.is_empty(), "a normal unmount warns: {warnings:?}");
    common::mount::assert_no_bug(&log);
}

#[tokio::test(flavor = "multi_thread")]
async fn mount_t_fuse_s3mount_under_env_i_reads_and_writes() {
    let hello = b"hello from S3\n";
    let Case {
        env,
        prefix,
        mut sys,
        etc,
        creds,
        source,
    } = Case::new("mount8", hello).await;
    let mp = sys.mountpoint("s3");
    let config = etc.join("config");
    std::fs::write(&config, format!("[default]\nregion = {}\n", env.region)).unwrap();
    let options = format!(
        "endpoint_url={},credentials_file={},config_file={},allow_other,_netdev,part_size=5M,retry_attempts=4,log_level=debug",
        env.endpoint,
        creds.display(),
        config.display()
    );
    // mount(8) as a service manager runs it: no environment at all, helper flags on.
    let started = Instant::now();
    let out = sys.mount8(&[
        "-v".as_ref(),
        "-s".as_ref(),
        "-n".as_ref(),
        "-t".as_ref(),
        "fuse.s3mount".as_ref(),
        source.as_ref(),
        mp.as_ref(),
        "-o".as_ref(),
        options.as_ref(),
    ]);
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "mount -t fuse.s3mount: {}",
        text(&out)
    );
    eprintln!("mount -t fuse.s3mount took {took:?}");
    assert!(
        text(&out).contains(&format!("mounting s3://{}/{prefix}", env.bucket)),
        "-v says what is mounted: {}",
        text(&out)
    );
    assert!(
        !text(&out).contains(&env.secret_access_key),
        "no secret on the terminal"
    );
    let lines = proc_mounts_at(&sys, &mp);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let fields: Vec<&str> = lines[0].split(' ').collect();
    assert_eq!(fields[0], source, "{lines:?}");
    assert_eq!(fields[2], "fuse.s3mount", "{lines:?}");
    assert!(fields[3].contains("allow_other"), "{lines:?}");
    let found = run(sys
        .cmd("findmnt")
        .args(["-n", "-o", "TARGET", "-t", "fuse.s3mount"]));
    assert!(found.lines().any(|l| Path::new(l.trim()) == mp), "{found}");

    read_and_write(&env, &sys, &mp, &prefix, hello).await;

    let status = daemon_status(&sys, &mp);
    // mount(8) ran the helper scripts/install put in /sbin (not mount.fuse's fallback).
    let pid = status["pid"].as_u64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv0 = String::from_utf8_lossy(cmdline.split(|b| *b == 0).next().unwrap()).to_string();
    assert_eq!(argv0, "/sbin/mount.fuse.s3mount");
    assert_eq!(status["source"], source.as_str());
    assert_eq!(status["bucket"], env.bucket.as_str());
    assert_eq!(status["prefix"], prefix.as_str());
    // Root without HOME logs to its own file per mount under /var/log/s3mount.
    let name = format!(
        "{}-{}@{}.log",
        env.bucket,
        prefix.trim_end_matches('/').replace('/', "-"),
        mp.to_string_lossy().trim_matches('/').replace('/', "-")
    );
    let log = sys.path(&Path::new("/var/log/s3mount").join(&name));
    assert!(
        file_contains(&log, "mounted"),
        "the mount's log {}: {:?}",
        log.display(),
        std::fs::read_dir(sys.path(Path::new("/var/log/s3mount")))
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("DEBUG"), "log_level=debug from -o");
    assert!(
        !logged.contains(&env.secret_access_key),
        "no secret in the log"
    );
    // Its journal of uploads is under /var/lib/s3mount (here: the system's layer of it).
    assert!(sys.path(Path::new("/var/lib/s3mount")).is_dir());
    assert_clean_unmount(&sys, &mp, pid, &log);
}

#[tokio::test(flavor = "multi_thread")]
async fn fstab_line_mounts_with_mount_t_file_and_options_only_from_o() {
    let hello = b"hello from fstab\n";
    let Case {
        env,
        prefix,
        mut sys,
        etc,
        creds,
        source,
    } = Case::new("fstab", hello).await;
    let mp = sys.mountpoint("fstab");
    let log = sys.tmp().join("fstab-mount.log");
    let fstab = etc.join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# s3mount test\n{source} {} fuse.s3mount _netdev,nofail,users,x-systemd.automount,x-systemd.idle-timeout=600,x-systemd.requires=network-online.target,endpoint_url={},region={},credentials_file={},uid=1234,gid=1234,umask=027,log_file={},metadata_ttl=0 0 0\n",
            mp.display(),
            env.endpoint,
            env.region,
            creds.display(),
            log.display()
        ),
    )
    .unwrap();
    // mount -f (fake) does everything but mount.
    let fake = sys.mount8(&[
        "-f".as_ref(),
        "-v".as_ref(),
        "-T".as_ref(),
        fstab.as_ref(),
        mp.as_ref(),
    ]);
    assert!(fake.status.success(), "mount -f: {}", text(&fake));
    assert!(!sys.is_mounted(&mp), "mount -f mounted");

    let started = Instant::now();
    let out = sys.mount8(&["-T".as_ref(), fstab.as_ref(), mp.as_ref()]);
    assert!(out.status.success(), "mount -T fstab: {}", text(&out));
    eprintln!("mount -T FILE took {:?}", started.elapsed());
    let lines = proc_mounts_at(&sys, &mp);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!("{source} {} fuse.s3mount ", mp.display())),
        "{lines:?}"
    );
    read_and_write(&env, &sys, &mp, &prefix, hello).await;
    // The ownership options of the line hold for what was just written.
    let meta = std::fs::metadata(sys.path(&mp.join("written.bin"))).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (1234, 1234, 0o640)
    );
    // mount -a sees the line as mounted (same source, type and place) and leaves it alone.
    let again = sys.mount8(&["-a".as_ref(), "-T".as_ref(), fstab.as_ref()]);
    assert!(again.status.success(), "mount -a: {}", text(&again));
    assert_eq!(proc_mounts_at(&sys, &mp).len(), 1, "mount -a mounted twice");
    // Mounting it once more by hand is refused in one line.
    let twice = sys.mount8(&["-T".as_ref(), fstab.as_ref(), mp.as_ref()]);
    assert!(!twice.status.success());
    assert!(text(&twice).contains("already"), "{}", text(&twice));
    assert_eq!(proc_mounts_at(&sys, &mp).len(), 1);
    let pid = daemon_status(&sys, &mp)["pid"].as_u64().unwrap();
    assert_clean_unmount(&sys, &mp, pid, &log);
}

// ---------------------------------------------------------------------------------------------
// Ownership overrides

#[tokio::test(flavor = "multi_thread")]
async fn uid_gid_umask_hold_for_every_entry_written_or_not() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("owner");
    // An object without metadata, one with s3fs metadata of other owners and modes, an
    // implicit directory and a directory marker with its own metadata.
    put(&env, &format!("{prefix}plain.txt"), b"plain", &[]).await;
    let s3fs_meta = |mode: u32| {
        vec![
            ("uid", "5".to_string()),
            ("gid", "6".to_string()),
            ("mode", mode.to_string()),
        ]
    };
    put(
        &env,
        &format!("{prefix}meta.txt"),
        b"meta",
        &s3fs_meta(0o100666),
    )
    .await;
    put(&env, &format!("{prefix}implicit/inner.txt"), b"inner", &[]).await;
    put(&env, &format!("{prefix}marker/"), b"", &s3fs_meta(0o40777)).await;
    let m = mount(
        &env,
        &format!("{}:{prefix}", env.bucket),
        &["-o", "uid=1234,gid=1234,umask=027"],
    );
    let work = tempfile::tempdir().unwrap();
    let local = work.path().join("local.bin");
    std::fs::write(&local, pattern(1 << 20, 3)).unwrap();
    run(Command::new("cp")
        .arg(&local)
        .arg(m.path().join("copied.bin")));
    std::fs::create_dir(m.path().join("made")).unwrap();
    std::fs::write(m.path().join("made/new.txt"), b"new").unwrap();
    std::fs::write(m.path().join("marker/in-marker.txt"), b"x").unwrap();
    // Every entry, from a fresh listing and from cached inodes alike.
    let mut seen = 0;
    let mut walk = vec![m.path().to_path_buf()];
    while let Some(dir) = walk.pop() {
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (1234, 1234, 0o750),
            "{}",
            dir.display()
        );
        seen += 1;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                walk.push(entry.path());
                continue;
            }
            assert_eq!(
                (meta.uid(), meta.gid(), meta.mode() & 0o7777),
                (1234, 1234, 0o640),
                "{}",
                entry.path().display()
            );
            seen += 1;
        }
    }
    assert_eq!(seen, 10, "the root, 3 directories and 6 files");
    // `ls -ln` says the same as stat.
    let ls = run(Command::new("ls").arg("-lnR").arg(m.path()));
    for line in ls
        .lines()
        .filter(|l| l.starts_with('-') || l.starts_with('d'))
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!((f[2], f[3]), ("1234", "1234"), "{line}");
        assert!(
            f[0] == "-rw-r-----" || f[0] == "drwxr-x---",
            "{line} of\n{ls}"
        );
    }
    drop(m);
    // The objects' own s3fs metadata is as it was.
    let head = env
        .client()
        .head_object(&format!("{prefix}meta.txt"))
        .await
        .unwrap();
    let want: BTreeMap<String, String> = s3fs_meta(0o100666)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(head.metadata, want);
}

// ---------------------------------------------------------------------------------------------
// Signals

#[tokio::test(flavor = "multi_thread")]
async fn hup_usr1_usr2_leave_it_serving_and_hup_reopens_a_moved_log() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("signals");
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("mount.log");
    let log_arg = log.to_string_lossy().into_owned();
    // Credentials from a file, which SIGHUP reads again.
    let creds = credentials_file(&env, work.path());
    let mut cmd = command(&env);
    cmd.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY");
    let m = common::mount::mount_with(
        cmd,
        &format!("{}:{prefix}", env.bucket),
        &[
            "--log-file",
            &log_arg,
            "--credentials-file",
            &creds.to_string_lossy(),
        ],
    );
    let pid = m.pid();
    serves(&m.path().join("before"), b"before");

    signal(pid, "HUP");
    wait_until("SIGHUP logged", Duration::from_secs(10), || {
        file_contains(&log, "SIGHUP: reopened the log file")
            && file_contains(&log, "refresh: SIGHUP: reading the credentials again")
    });
    serves(&m.path().join("after-hup"), b"hup");

    signal(pid, "USR1");
    wait_until("SIGUSR1 stats", Duration::from_secs(10), || {
        file_contains(&log, " stats ")
    });
    serves(&m.path().join("after-usr1"), b"usr1");

    signal(pid, "USR2");
    wait_until("SIGUSR2 on", Duration::from_secs(10), || {
        file_contains(&log, "SIGUSR2: debug logging on")
    });
    serves(&m.path().join("after-usr2"), b"usr2");
    assert!(file_contains(&log, "DEBUG"), "debug lines after SIGUSR2");
    signal(pid, "USR2");
    wait_until("SIGUSR2 off", Duration::from_secs(10), || {
        file_contains(&log, "SIGUSR2: debug logging off")
    });

    // logrotate: the file is moved away, SIGHUP makes a new one where it was.
    let rotated = work.path().join("mount.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    serves(&m.path().join("while-rotated"), b"rotated");
    signal(pid, "HUP");
    wait_until("a new log file", Duration::from_secs(10), || {
        file_contains(&log, "SIGHUP: reopened the log file")
    });
    assert!(file_contains(&rotated, "SIGUSR2: debug logging off"));
    assert!(
        !file_contains(&log, "SIGUSR2"),
        "the new file starts afresh"
    );

    // Signals nobody means for a mount end nothing either.
    for sig in ["ALRM", "PWR", "VTALRM", "XCPU", "RTMIN+3"] {
        signal(pid, sig);
    }
    serves(&m.path().join("after-others"), b"others");
    for name in [
        "before",
        "after-hup",
        "after-usr1",
        "after-usr2",
        "while-rotated",
        "after-others",
    ] {
        assert!(m.path().join(name).is_file(), "{name}");
    }
    let (status, _) = m.terminate();
    assert!(status.success(), "SIGTERM: exit {status}");
    let last = std::fs::read_to_string(&log).unwrap();
    assert!(last.contains("SIGTERM: unmounting"), "{last}");
    assert!(last.contains("unmounted"), "{last}");
    let earlier = std::fs::read_to_string(&rotated).unwrap();
    let warnings: Vec<&str> = earlier
        .lines()
        .chain(last.lines())
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_of_a_busy_mount_detaches_it_and_ends_with_the_last_open_file() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("busy");
    let mut m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    serves(&m.path().join("kept-open"), b"still readable");
    let mut open = std::fs::File::open(m.path().join("kept-open")).unwrap();
    let started = Instant::now();
    signal(m.pid(), "TERM");
    wait_until("detached", Duration::from_secs(10), || {
        !is_mounted(m.path())
    });
    let took = started.elapsed();
    assert!(
        took >= s3mount::fusemount::BUSY_GRACE,
        "detached after {took:?}, before the grace"
    );
    // The daemon serves the open file until it is closed, then ends.
    assert!(
        m.wait_exit(Duration::from_millis(300)).is_none(),
        "ended with a file open"
    );
    let mut text = String::new();
    open.read_to_string(&mut text).unwrap();
    assert_eq!(text, "still readable");
    drop(open);
    let status = m
        .wait_exit(Duration::from_secs(10))
        .expect("ends after the last close");
    assert!(status.success(), "{status}\n{}", m.log());
    assert!(
        m.log().contains("the mount is busy: detached it"),
        "{}",
        m.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn log_syslog_sends_tagged_lines_to_the_socket() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("syslog");
    let work = tempfile::tempdir().unwrap();
    let socket = work.path().join("dev-log");
    let server = std::os::unix::net::UnixDatagram::bind(&socket).unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let m = mount(
        &env,
        &format!("{}:{prefix}", env.bucket),
        &[&format!("--log-syslog={}", socket.display())],
    );
    let mut buf = vec![0u8; 16 << 10];
    let mut lines = Vec::new();
    while !lines.iter().any(|l: &String| l.contains("mounted")) {
        let n = server.recv(&mut buf).expect("a syslog datagram");
        lines.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let mounted = lines.iter().find(|l| l.contains("mounted")).unwrap();
    // <daemon.info>s3mount[PID]: bucket:prefix on MOUNTPOINT: ...
    let tag = format!(
        "<30>s3mount[{}]: {}:{prefix} on {}: ",
        m.pid(),
        env.bucket,
        m.path().display()
    );
    assert!(
        mounted.starts_with(&tag),
        "{mounted:?} does not start with {tag:?}"
    );
    assert!(lines.iter().all(|l| !l.contains(&env.secret_access_key)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_daemon_leaves_no_dead_mount() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("sigkill");
    let mut m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    serves(&m.path().join("f"), b"f");
    let socket = PathBuf::from(
        status_of(m.path())["control_socket"]
            .as_str()
            .expect("status names its control socket"),
    );
    assert!(socket.exists());
    signal(m.pid(), "KILL");
    assert!(m.wait_exit(Duration::from_secs(10)).is_some());
    // The watchdog detaches it: no "Transport endpoint is not connected" left behind.
    wait_until("the watchdog detaches", Duration::from_secs(10), || {
        !is_mounted(m.path())
    });
    let left = std::fs::read_dir(m.path()).expect("the mount point answers again");
    assert_eq!(left.count(), 0, "the empty directory under the mount");
    wait_until(
        "the dead daemon's socket is removed",
        Duration::from_secs(5),
        || !socket.exists(),
    );
}

// ---------------------------------------------------------------------------------------------
// Status and metrics

fn upload_of<'a>(status: &'a Value, path: &str) -> Option<&'a Value> {
    status["uploads"]
        .as_array()?
        .iter()
        .find(|u| u["path"] == path)
}

/// A strict reader of the Prometheus text format (0.0.4): every line is a `# HELP`, a
/// `# TYPE` before its family's samples, or a sample `name{labels} value`; names, label names
/// and escapes are checked, each family's samples are together, no series is repeated, and
/// counters end in `_total`. Returns each series (`name{labels}`) and its value.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    fn is_name(s: &str, colon: bool) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
    }
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helped: HashSet<String> = HashSet::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut series = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let at = format!("line {}: {line:?}", n + 1);
        assert!(!line.is_empty(), "{at}: empty line");
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name, rest) = (
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
            );
            assert!(is_name(name, true), "{at}: bad metric name");
            match kw {
                "HELP" => {
                    assert!(helped.insert(name.into()), "{at}: second HELP");
                    assert!(!rest.is_empty(), "{at}: empty HELP");
                }
                "TYPE" => {
                    assert!(
                        matches!(
                            rest,
                            "counter" | "gauge" | "histogram" | "summary" | "untyped"
                        ),
                        "{at}: bad type"
                    );
                    assert!(
                        types.insert(name.into(), rest.into()).is_none(),
                        "{at}: second TYPE"
                    );
                    assert!(!finished.contains(name), "{at}: TYPE after samples");
                    if rest == "counter" {
                        assert!(name.ends_with("_total"), "{at}: counter without _total");
                    }
                }
                _ => panic!("{at}: unknown comment"),
            }
            continue;
        }
        assert!(!line.starts_with('#'), "{at}: comment without a space");
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("{at}: no value"));
        let name = &line[..name_end];
        assert!(is_name(name, true), "{at}: bad metric name");
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let end = loop {
                let Some(&(i, c)) = chars.peek() else {
                    panic!("{at}: labels not closed")
                };
                if c == '}' {
                    break i;
                }
                let start = i;
                while chars.peek().is_some_and(|&(_, c)| c != '=') {
                    chars.next();
                }
                let (eq, _) = chars
                    .next()
                    .unwrap_or_else(|| panic!("{at}: label without ="));
                let lname = &body[start..eq];
                assert!(is_name(lname, false), "{at}: bad label name {lname:?}");
                assert_eq!(
                    chars.next().map(|(_, c)| c),
                    Some('"'),
                    "{at}: unquoted label"
                );
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            Some((_, 'n')) => value.push('\n'),
                            other => panic!("{at}: bad escape {other:?}"),
                        },
                        Some((_, '"')) => break,
                        Some((_, '\n')) | None => panic!("{at}: label value not closed"),
                        Some((_, c)) => value.push(c),
                    }
                }
                labels.push((lname.to_string(), value));
                match chars.peek() {
                    Some(&(_, ',')) => {
                        chars.next();
                    }
                    Some(&(_, '}')) => {}
                    other => panic!("{at}: after a label: {other:?}"),
                }
            };
            let names: HashSet<&str> = labels.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names.len(), labels.len(), "{at}: repeated label");
            rest = &body[end + 1..];
        }
        let rest = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("{at}: no space before the value"));
        let mut fields = rest.split(' ');
        let value = fields.next().unwrap_or("");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|_| panic!("{at}: bad value")),
        };
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .unwrap_or_else(|_| panic!("{at}: bad timestamp"));
        }
        assert!(fields.next().is_none(), "{at}: trailing fields");
        assert!(types.contains_key(name), "{at}: sample before its TYPE");
        if types[name] == "counter" {
            assert!(value >= 0.0, "{at}: negative counter");
        }
        if current.as_deref() != Some(name) {
            assert!(!finished.contains(name), "{at}: family not together");
            if let Some(prev) = current.replace(name.to_string()) {
                finished.insert(prev);
            }
        }
        let key = if labels.is_empty() {
            name.to_string()
        } else {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            format!("{name}{{{}}}", l.join(","))
        };
        assert!(series.insert(key, value).is_none(), "{at}: repeated series");
    }
    series
}

fn http_get(url: &str) -> (u16, String, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut conn = std::net::TcpStream::connect(host).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        conn,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/plain\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    let kind = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or("")
        .to_string();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("Content-Length");
    assert_eq!(length, body.len(), "Content-Length");
    (code, kind, body.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn status_during_a_512_mib_copy_and_metrics_that_match() {
    const SIZE: u64 = 512 << 20;
    let env = ServerEnv::main();
    let prefix = unique_prefix("status");
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("big.bin");
    {
        let mut f = std::fs::File::create(&source).unwrap();
        for i in 0..(SIZE >> 25) {
            f.write_all(&pattern(32 << 20, i)).unwrap();
        }
    }
    let m = mount(
        &env,
        &format!("{}:{prefix}", env.bucket),
        &["--metrics-addr", "127.0.0.1:0", "--log-metrics=1"],
    );
    // The mount names its metrics URL (port 0: the one it got) in the "mounted" line.
    assert!(m.wait_for_log("mounted", 1, Duration::from_secs(10)));
    let log = m.log();
    let url = log
        .split("metrics=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .map(|u| u.trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("no metrics URL in:\n{log}"));
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    assert_eq!(status_of(m.path())["metrics_url"], url.as_str());

    let started = Instant::now();
    let mut cp = Command::new("cp")
        .arg(&source)
        .arg(m.path().join("big.bin"))
        .spawn()
        .unwrap();
    let mut samples: Vec<(f64, u64, u64, u64)> = Vec::new();
    let mut text_seen = false;
    let copied = loop {
        if let Some(status) = cp.try_wait().unwrap() {
            break status;
        }
        let s = status_of(m.path());
        if let Some(up) = upload_of(&s, "/big.bin") {
            let stored = up["bytes_stored"].as_u64().unwrap();
            let written = up["bytes_written"].as_u64().unwrap();
            assert!(stored <= written, "stored {stored} > written {written}");
            assert!(up["parts_done"].as_u64().unwrap() * (8 << 20) >= stored);
            samples.push((
                started.elapsed().as_secs_f64(),
                written,
                stored,
                up["parts_in_flight"].as_u64().unwrap(),
            ));
            if !text_seen {
                let out = run(Command::new(binary()).arg("status").arg(m.path()));
                text_seen = out.contains("/big.bin  written");
            }
        }
        std::thread::sleep(Duration::from_millis(150));
    };
    let took = started.elapsed();
    assert!(copied.success());
    eprintln!(
        "cp of 512 MiB took {took:?}; status samples (s, written, stored, parts in flight): {samples:?}"
    );
    assert!(text_seen, "plain `s3mount status` shows the upload");
    let growing = samples
        .windows(2)
        .any(|w| w[0].2 < w[1].2 && w[1].2 < SIZE && w[0].2 > 0);
    assert!(
        growing,
        "two reads of status show the stored bytes growing: {samples:?}"
    );

    // `--watch --json` redraws once a second, one document a line.
    let mut watch = Command::new(binary())
        .args(["status", "--watch", "--json"])
        .arg(m.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(watch.stdout.take().unwrap());
    let watch_started = Instant::now();
    for _ in 0..2 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let doc: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(doc["bucket"], env.bucket.as_str());
    }
    let watched = watch_started.elapsed();
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(watched >= Duration::from_millis(900), "{watched:?}");
    // Only the mount's owner (and root) may ask it.
    let nobody = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            binary(),
            "status",
        ])
        .arg(m.path())
        .output()
        .unwrap();
    assert!(!nobody.status.success(), "{}", text(&nobody));
    assert!(
        text(&nobody).contains("only its owner and root"),
        "{}",
        text(&nobody)
    );

    // After close: nothing in flight, and the totals add up.
    let after = status_of(m.path());
    assert_eq!(after["uploads"], serde_json::json!([]), "{after:#}");
    let t = &after["totals"];
    let n = |k: &str| t[k].as_u64().unwrap_or_else(|| panic!("{k} in {t}"));
    let ops = &t["requests_by_operation"];
    let op = |k: &str| ops[k].as_u64().unwrap();
    assert_eq!(n("bytes_written"), SIZE);
    assert_eq!(n("bytes_stored"), SIZE);
    assert_eq!(n("uploads_completed"), 1);
    assert_eq!(n("uploads_failed"), 0);
    // Every attempt counts as a request; a loaded machine can make the store retry a few. The
    // checksum probe at mount sends two parts of its own (a server that fails its first
    // CreateMultipartUpload gets none).
    let parts = SIZE / (8 << 20);
    assert!(
        (parts..=parts + 2 + n("retries")).contains(&op("UploadPart")),
        "{} UploadParts for {parts} parts and {} retries",
        op("UploadPart"),
        n("retries")
    );
    // The checksum probe creates an upload of its own and aborts it; the file's is completed.
    assert!(op("AbortMultipartUpload") <= 1, "{t}");
    assert_eq!(
        op("CreateMultipartUpload"),
        1 + op("AbortMultipartUpload"),
        "{t}"
    );
    assert_eq!(op("CompleteMultipartUpload"), 1);
    assert!(n("bytes_sent") >= SIZE, "{t}");
    let sum: u64 = ops
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(sum, n("requests"), "requests by operation add up");

    // The mount's own stats line (SIGUSR1) says the same.
    signal(m.pid(), "USR1");
    assert!(m.wait_for_log(" stats ", 1, Duration::from_secs(10)));
    let log = m.log();
    let again = status_of(m.path());
    assert_eq!(again["totals"]["bytes_sent"], t["bytes_sent"], "idle mount");
    assert_eq!(last_stat(&log, "s3_bytes_sent"), n("bytes_sent"));
    assert_eq!(last_stat(&log, "s3_requests"), n("requests"));
    assert_eq!(last_stat(&log, "s3_errors"), n("errors"));
    assert_eq!(last_stat(&log, "uploads_in_flight"), 0);
    // --log-metrics=1: one line a second with rates.
    assert!(log.contains(" metrics "), "{log}");

    // Prometheus.
    let (code, kind, body) = http_get(&url);
    assert_eq!(code, 200);
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    let series = parse_prometheus(&body);
    assert_eq!(
        series["s3mount_s3_bytes_sent_total"],
        n("bytes_sent") as f64
    );
    assert_eq!(series["s3mount_stored_bytes_total"], SIZE as f64);
    assert_eq!(series["s3mount_written_bytes_total"], SIZE as f64);
    assert_eq!(series["s3mount_uploads_in_flight"], 0.0);
    assert_eq!(
        series["s3mount_s3_requests_total{operation=\"UploadPart\"}"],
        op("UploadPart") as f64
    );
    assert_eq!(series["s3mount_s3_retries_total"], n("retries") as f64);
    assert!(series.keys().any(|k| k.starts_with("s3mount_info{")));
    assert_eq!(http_get(&url.replace("/metrics", "/other")).0, 404);

    // docs/OPERATIONS.md names every field of the report and every metric.
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/OPERATIONS.md"))
            .unwrap();
    let mut fields = Vec::new();
    collect_fields(&after, &mut fields);
    collect_fields(&samples_doc(&m), &mut fields);
    assert!(fields.len() >= 45, "{fields:?}");
    let undocumented: Vec<&String> = fields
        .iter()
        .filter(|f| !doc.contains(&format!("`{f}`")) && !doc.contains(&format!("`{f}(")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "not in OPERATIONS.md: {undocumented:?}"
    );
    let families: HashSet<&str> = series
        .keys()
        .map(|k| k.split('{').next().unwrap())
        .collect();
    for family in families {
        assert!(
            doc.contains(&format!("`{family}")),
            "metric {family} not in OPERATIONS.md"
        );
    }

    // The copy is whole in S3.
    let head = env
        .client()
        .head_object(&format!("{prefix}big.bin"))
        .await
        .unwrap();
    assert_eq!(head.size, SIZE);
    std::fs::remove_file(m.path().join("big.bin")).unwrap();
    let status = status_of(m.path());
    assert!(status["uptime_seconds"].as_f64().unwrap() > 0.0);
    assert!(status["memory"]["rss_bytes"].as_u64().unwrap() > 0);
}

/// The names of the fields of a status report (not of the operations it counts).
fn collect_fields(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                if !out.contains(k) {
                    out.push(k.clone());
                }
                if k != "requests_by_operation" {
                    collect_fields(v, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_fields(i, out)),
        _ => {}
    }
}

/// A report with an upload and a read in flight, so their fields are seen too.
fn samples_doc(m: &common::mount::Mounted) -> Value {
    let path = m.path().join("doc-sample.bin");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&pattern(20 << 20, 5)).unwrap();
    let with_upload = status_of(m.path());
    drop(f);
    let mut r = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    r.read_exact(&mut buf).unwrap();
    let with_read = status_of(m.path());
    drop(r);
    std::fs::remove_file(&path).unwrap();
    assert!(
        !with_upload["uploads"].as_array().unwrap().is_empty(),
        "{with_upload}"
    );
    assert!(
        !with_read["reads"].as_array().unwrap().is_empty(),
        "{with_read}"
    );
    serde_json::json!([with_upload, with_read])
}

#[test]
fn the_strict_prometheus_parser_refuses_what_prometheus_refuses() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"q\\\"\\n\\\\\"} 1\n";
    assert_eq!(parse_prometheus(good).len(), 1);
    for bad in [
        "a_total 1\n",                                             // no TYPE
        "# TYPE a counter\na 1\n",                                 // counter without _total
        "# TYPE a gauge\na{x=q} 1\n",                              // unquoted
        "# TYPE a gauge\na{x=\"\\t\"} 1\n",                        // bad escape
        "# TYPE a gauge\na 1\na 2\n",                              // repeated series
        "# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\na{y=\"\"} 1\n", // split family
        "# TYPE a gauge\na one\n",                                 // bad value
        "# TYPE a gauge\na 1",                                     // no final newline
        "# TYPE 1a gauge\n",                                       // bad name
    ] {
        let caught = std::panic::catch_unwind(|| parse_prometheus(bad));
        assert!(caught.is_err(), "accepted {bad:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Presigned URLs and POST forms

fn s3mount_out(env: &ServerEnv, args: &[&str]) -> String {
    run(command(env).args(args)).trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn presigned_get_and_put_work_with_curl_and_expired_or_altered_are_refused() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("presign");
    let key = format!("{prefix}shared file.txt");
    put(&env, &key, b"shared content", &[]).await;
    let s3 = |k: &str| format!("s3://{}/{k}", env.bucket);

    let get = s3mount_out(&env, &["presign", &s3(&key), "--expires", "10m"]);
    assert!(get.starts_with(&env.endpoint), "{get}");
    assert!(!get.contains(&env.secret_access_key));
    let (code, body) = curl_code(&[&get]);
    assert_eq!((code, body.as_str()), (200, "shared content"));

    // Altered: another key with the same signature, or one character of the signature.
    let other = get.replace("shared%20file.txt", "other.txt");
    assert_ne!(other, get);
    assert_refused(curl_code(&[&other]), "another key");
    let (head, sig) = get.rsplit_once("X-Amz-Signature=").unwrap();
    let flipped: String = sig
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i == 0 {
                if c == '0' {
                    '1'
                } else {
                    '0'
                }
            } else {
                c
            }
        })
        .collect();
    let tampered = format!("{head}X-Amz-Signature={flipped}");
    assert_refused(curl_code(&[&tampered]), "a changed signature");
    let longer = get.replace("X-Amz-Expires=600", "X-Amz-Expires=6000");
    assert_ne!(longer, get);
    assert_refused(curl_code(&[&longer]), "a longer expiry");

    // Expired: it works until its time is up, and not after.
    let short = s3mount_out(&env, &["presign", &s3(&key), "--expires", "3s"]);
    assert_eq!(curl_code(&[&short]).0, 200, "before it expires");
    std::thread::sleep(Duration::from_millis(4500));
    assert_refused(curl_code(&[&short]), "an expired URL");

    // PUT: curl uploads, S3 has it.
    let work = tempfile::tempdir().unwrap();
    let upload = work.path().join("upload.bin");
    let data = pattern(300_000, 9);
    std::fs::write(&upload, &data).unwrap();
    let put_key = format!("{prefix}uploaded.bin");
    let put_url = s3mount_out(&env, &["presign", "--method", "PUT", &s3(&put_key)]);
    let up = upload.to_string_lossy();
    assert_eq!(curl_code(&["-T", &up, &put_url]).0, 200);
    assert_eq!(read_object(&env.client(), &put_key, None).await, data);
    // A PUT URL does not GET, and a GET URL does not PUT.
    assert_refused(curl_code(&[&put_url]), "GET with a PUT URL");
    assert_refused(curl_code(&["-T", &up, &get]), "PUT with a GET URL");

    // A file inside a mount is signed by that mount, with its bucket, prefix and endpoint.
    let m = mount(&env, &format!("{}:{prefix}", env.bucket), &[]);
    let mut cmd = Command::new(binary());
    let in_mount = run(cmd
        .arg("presign")
        .arg(m.path().join("shared file.txt"))
        .env_clear())
    .trim()
    .to_string();
    assert_eq!(curl_code(&[&in_mount]), (200, "shared content".to_string()));
    let new_path = m.path().join("from-curl.txt");
    let put_in_mount = run(Command::new(binary())
        .args(["presign", "--method", "PUT"])
        .arg(&new_path)
        .env_clear())
    .trim()
    .to_string();
    let small = work.path().join("small.txt");
    std::fs::write(&small, b"via a presigned PUT").unwrap();
    assert_eq!(
        curl_code(&["-T", &small.to_string_lossy(), &put_in_mount]).0,
        200
    );
    assert_eq!(
        read_object(&env.client(), &format!("{prefix}from-curl.txt"), None).await,
        &b"via a presigned PUT"[..]
    );
    let refused = Command::new(binary())
        .args(["presign", "--endpoint-url", "http://x"])
        .arg(m.path().join("shared file.txt"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("do not apply"),
        "{}",
        text(&refused)
    );
}

/// `curl` posting `fields` and then the file, as a browser posts the form.
fn post_form(url: &str, fields: &[(String, String)], file: &Path) -> (u16, String) {
    let mut args: Vec<String> = Vec::new();
    for (k, v) in fields {
        args.push("--form-string".into());
        args.push(format!("{k}={v}"));
    }
    args.push("-F".into());
    args.push(format!("file=@{}", file.display()));
    args.push(url.to_string());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    curl_code(&refs)
}

fn json_fields(form: &Value) -> Vec<(String, String)> {
    form["fields"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect()
}

/// The action and inputs of the HTML form `post-policy --html` printed.
fn html_fields(html: &str) -> (String, Vec<(String, String)>) {
    let attr = |tag: &str, name: &str| -> Option<String> {
        let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
        let end = start + tag[start..].find('"')?;
        Some(
            tag[start..end]
                .replace("&quot;", "\"")
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&"),
        )
    };
    let form = html.split("<form").nth(1).expect("a form");
    let action = attr(form.split('>').next().unwrap(), "action").expect("action");
    let mut fields = Vec::new();
    for tag in form.split("<input").skip(1) {
        let tag = tag.split('>').next().unwrap();
        if attr(tag, "type").as_deref() == Some("file")
            || attr(tag, "type").as_deref() == Some("submit")
        {
            continue;
        }
        fields.push((attr(tag, "name").unwrap(), attr(tag, "value").unwrap()));
    }
    (action, fields)
}

#[tokio::test(flavor = "multi_thread")]
async fn post_policy_forms_upload_with_curl_and_refuse_too_large_or_outside_the_prefix() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("post");
    let target = format!("s3://{}/{prefix}inbox/", env.bucket);
    let json = s3mount_out(
        &env,
        &[
            "post-policy",
            &target,
            "--max-size",
            "1K",
            "--expires",
            "10m",
        ],
    );
    let form: Value = serde_json::from_str(&json).unwrap();
    let url = form["url"].as_str().unwrap().to_string();
    let fields = json_fields(&form);
    assert!(!json.contains(&env.secret_access_key));
    let work = tempfile::tempdir().unwrap();
    let small = work.path().join("small.txt");
    std::fs::write(&small, b"a small file").unwrap();
    let (code, body) = post_form(&url, &fields, &small);
    assert_eq!(code, 201, "{body}");
    assert_eq!(
        read_object(&env.client(), &format!("{prefix}inbox/small.txt"), None).await,
        &b"a small file"[..]
    );

    // Over --max-size.
    let large = work.path().join("large.txt");
    std::fs::write(&large, vec![b'x'; 2048]).unwrap();
    assert_refused(post_form(&url, &fields, &large), "a file over --max-size");
    assert!(env
        .client()
        .head_object(&format!("{prefix}inbox/large.txt"))
        .await
        .is_err());

    // Outside the prefix.
    let outside: Vec<(String, String)> = fields
        .iter()
        .map(|(k, v)| {
            if k == "key" {
                (k.clone(), format!("{prefix}elsewhere/${{filename}}"))
            } else {
                (k.clone(), v.clone())
            }
        })
        .collect();
    assert_refused(
        post_form(&url, &outside, &small),
        "a key outside the prefix",
    );
    assert!(env
        .client()
        .head_object(&format!("{prefix}elsewhere/small.txt"))
        .await
        .is_err());

    // The HTML page's form does what a browser would.
    let html = s3mount_out(
        &env,
        &["post-policy", &target, "--max-size", "1K", "--html"],
    );
    let (action, html_fields) = html_fields(&html);
    assert_eq!(action, url);
    let page = work.path().join("page.txt");
    std::fs::write(&page, b"from the page").unwrap();
    let (code, body) = post_form(&action, &html_fields, &page);
    assert_eq!(code, 201, "{body}");
    assert_eq!(
        read_object(&env.client(), &format!("{prefix}inbox/page.txt"), None).await,
        &b"from the page"[..]
    );
}
