//! Mounting the real `s3mount` binary for a test, and always unmounting it afterwards.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::ServerEnv;

/// A running `s3mount --foreground`. Dropping it unmounts (lazily if busy) and reaps the process,
/// also when the test failed.
pub struct Mounted {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    log: PathBuf,
}

impl Mounted {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The process id of the running s3mount.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Waits up to `limit` for the log to hold `count` lines containing `needle`.
    pub fn wait_for_log(&self, needle: &str, count: usize, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.log().matches(needle).count() >= count {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// What s3mount logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The mount's peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the mount's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM")
            * 1024
    }

    /// Sends SIGTERM and waits for the process to unmount and exit; returns its status and
    /// everything it logged.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on the pid of a child we started and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = wait_with_timeout(&mut child, Duration::from_secs(20));
        assert!(!is_mounted(self.path()), "SIGTERM unmounted the filesystem");
        let log = self.log();
        assert_no_bug(&log);
        (status, log)
    }
}

impl Mounted {
    /// Kills the s3mount process with SIGKILL, as a crash or the OOM killer would, reaps it
    /// and unmounts the dead mount; returns what it logged.
    pub fn kill(mut self) -> String {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on the pid of a child we started and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
        unmount(self.path());
        self.log()
    }

    /// Waits up to `limit` for the s3mount process to end by itself; its status if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn wait_with_timeout(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            return child.wait().expect("wait after kill");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unmount(self.dir.path());
            wait_with_timeout(&mut child, Duration::from_secs(10));
        }
        let panicking = std::thread::panicking();
        if !panicking {
            let log = self.log();
            let _ = std::fs::remove_file(&self.log);
            assert_no_bug(&log);
            return;
        }
        {
            // The test failed: what the mount said is the first thing to read.
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "--- last {} lines of the s3mount log of {} ---\n{}",
                tail.len(),
                self.dir.path().display(),
                tail.join("\n")
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Unmounts the FUSE mount at `path`, lazily if it is busy; nothing if nothing is mounted.
pub fn unmount(path: &Path) {
    if !is_mounted(path) {
        return;
    }
    let _ = Command::new("fusermount3").arg("-u").arg(path).status();
    if is_mounted(path) {
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(path)
            .status();
    }
}

/// The number after `name=` in the last `stats` line of a mount log.
pub fn last_stat(log: &str, name: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(" stats "))
        .unwrap_or_else(|| panic!("no stats line in the log:\n{log}"));
    let at = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no {name} in {line}"));
    line[at + name.len() + 2..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A panic (a bug, logged by s3mount's panic hook or Rust's default one) or a FUSE request
/// left without an answer fails the test that mounted, whatever it checked itself.
pub fn assert_no_bug(log: &str) {
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("panicked at") || l.contains("Reply not sent"))
        .take(5)
        .collect();
    assert!(
        bad.is_empty(),
        "the mount's log shows a bug:\n{}",
        bad.join("\n")
    );
}

pub fn is_mounted(path: &Path) -> bool {
    // The parent, not the mount point itself: a stat of a mount that stopped answering would
    // wait for it, and a test cleaning up after a hang would hang too.
    let canonical = match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    };
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(canonical.to_string_lossy().as_ref()))
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_s3mount")
}

/// The command with the server's endpoint and credentials, and nothing else of the caller's AWS
/// environment.
pub fn command(env: &ServerEnv) -> Command {
    let mut cmd = Command::new(binary());
    // No test may reach for a real instance metadata service, or through the machine's proxy.
    for name in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
    ] {
        cmd.env_remove(name);
    }
    cmd.env("AWS_EC2_METADATA_DISABLED", "true");
    cmd.env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env("AWS_ACCESS_KEY_ID", &env.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", &env.secret_access_key)
        .env("AWS_REGION", &env.region)
        .env("AWS_ENDPOINT_URL", &env.endpoint)
        .env("HOME", std::env::temp_dir());
    cmd
}

/// Mounts `bucket_spec` (`bucket` or `bucket:prefix`) with `args`, waits until the mount is
/// there, and returns its guard.
pub fn mount(env: &ServerEnv, bucket_spec: &str, args: &[&str]) -> Mounted {
    mount_with(command(env), bucket_spec, args)
}

/// [`mount`] with more environment variables for the mount process.
pub fn mount_env(
    env: &ServerEnv,
    bucket_spec: &str,
    args: &[&str],
    vars: &[(&str, &std::ffi::OsStr)],
) -> Mounted {
    let mut cmd = command(env);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    mount_with(cmd, bucket_spec, args)
}

/// [`mount`] with a command the caller prepared (its own environment).
pub fn mount_with(mut cmd: Command, bucket_spec: &str, args: &[&str]) -> Mounted {
    let dir = tempfile::Builder::new()
        .prefix("s3mount-test-")
        .tempdir()
        .expect("mount point");
    let log = dir.path().with_extension("log");
    cmd.arg(bucket_spec)
        .arg(dir.path())
        .arg("--foreground")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    let child = cmd.spawn().expect("start s3mount");
    let mut m = Mounted {
        dir,
        child: Some(child),
        log,
    };
    let start = Instant::now();
    while !is_mounted(m.path()) {
        if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!("s3mount exited with {status} before mounting:\n{}", m.log());
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not mounted after 20 s:\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    m
}

/// Runs s3mount in the background mode and returns its output: for mount-time error checks.
pub fn run_to_exit(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run s3mount")
}

/// `s3mount COMMAND --json MOUNTPOINT`'s report of mount `m` (`status`, `uploads`).
pub fn report(m: &Mounted, command: &str) -> serde_json::Value {
    let out = command_ok([command.as_ref(), "--json".as_ref(), m.path().as_os_str()]);
    serde_json::from_str(&out).unwrap()
}

/// The standard output of `s3mount ARGS...`, which must succeed.
pub fn command_ok<'a>(args: impl IntoIterator<Item = &'a std::ffi::OsStr>) -> String {
    let out = Command::new(binary()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Timeouts that make requests to an unreachable server give up in seconds.
pub const QUICK: [&str; 6] = [
    "--request-timeout",
    "2",
    "--stall-timeout",
    "2",
    "--retry-max-time",
    "4",
];
