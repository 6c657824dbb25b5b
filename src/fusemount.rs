//! Putting the FUSE connection on the mount point and taking it off again, done here rather
//! than by fuser, so each step behaves as a system service needs:
//!
//! - **The type is `fuse.s3mount`** in `/proc/mounts`, so `findmnt -t fuse.s3mount`, `umount -a
//!   -t fuse.s3mount` and mount(8)'s fstab bookkeeping find it; the source is what the user
//!   gave (`bucket:prefix` from fstab), so `mount -a` sees the line as mounted.
//! - **Root mounts with mount(2)** and never opens or enters the mount point (it is examined
//!   with `AT_NO_AUTOMOUNT`): under `x-systemd.automount` the mount point is an autofs trigger,
//!   and anything that triggers it from the mount helper would wait for itself. Other users go
//!   through `fusermount3`, found without `PATH` in the usual places.
//! - **Unmounting** (SIGTERM, SIGINT) of a mount still busy after a second detaches it instead
//!   (the lazy unmount of `umount -l`): the mount point is free at once and the process ends
//!   when the last open file is closed and the kernel lets go of the connection, as after
//!   `fusermount3 -u -z`. An
//!   unmount finds out first whether the mount is still attached, so a normal `umount` leaves
//!   no error behind.
//! - **A watchdog** (`s3mount __watchdog`, a small process started after mounting) holds a
//!   pipe from the daemon; when the daemon dies in any way, SIGKILL and crashes included, the
//!   pipe closes and the watchdog detaches the mount if it is still the same one (same device
//!   number at the same place), so no signal leaves a mount that answers "Transport endpoint
//!   is not connected".

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor`
    pub device: String,
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
    /// The filesystem's own options (for FUSE: `user_id=`, `group_id=`, ...).
    pub super_options: String,
}

impl MountEntry {
    /// The `user_id=` of a FUSE mount: whose it is.
    pub fn fuse_owner(&self) -> Option<u32> {
        self.super_options
            .split(',')
            .find_map(|o| o.strip_prefix("user_id="))
            .and_then(|v| v.parse().ok())
    }
}

/// `\040` and friends, as the kernel escapes mount paths.
pub fn unescape(p: &str) -> String {
    let bytes = p.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; lines it cannot read are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            if dash < 6 || fields.len() < dash + 3 {
                return None;
            }
            Some(MountEntry {
                device: fields[2].to_string(),
                mountpoint: PathBuf::from(unescape(fields[4])),
                fstype: fields[dash + 1].to_string(),
                source: unescape(fields[dash + 2]),
                super_options: fields.get(dash + 3).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// The mounts of this process's namespace, in mount order.
pub fn mounts() -> Vec<MountEntry> {
    parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// The topmost mount at `path`.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.mountpoint == path)
}

/// `path` made absolute without following the last component into an automount (realpath
/// reads links with readlink, which never triggers one).
pub fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `stat` of `path` that never triggers an automount at it.
pub fn stat_no_automount(path: &Path) -> std::io::Result<libc::stat> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: zeroed is a valid `stat` for fstatat to fill; the path is a valid C string.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::fstatat(libc::AT_FDCWD, c.as_ptr(), &mut st, libc::AT_NO_AUTOMOUNT) };
    if r == 0 {
        Ok(st)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Where `fusermount3` (or the older `fusermount`) is: `PATH`, then the usual places, since
/// mount(8) and systemd run helpers without `PATH`.
pub fn find_fusermount() -> Option<PathBuf> {
    find_fusermount_in(&std::env::var_os("PATH").unwrap_or_default())
}

fn find_fusermount_in(path: &std::ffi::OsStr) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::split_paths(path).collect();
    for d in ["/usr/bin", "/bin", "/usr/local/bin", "/usr/sbin", "/sbin"] {
        dirs.push(PathBuf::from(d));
    }
    ["fusermount3", "fusermount"]
        .iter()
        .find_map(|name| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()))
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// What to mount.
#[derive(Debug, Clone)]
pub struct MountSpec<'a> {
    /// What `/proc/mounts` shows as the source.
    pub source: &'a str,
    pub mountpoint: &'a Path,
    pub read_only: bool,
    pub noexec: bool,
    /// The kernel's `allow_other` (fuser filters `allow_root` itself).
    pub allow_other: bool,
}

pub const FSTYPE: &str = "fuse.s3mount";

/// How long an unmount tries again while the mount is busy before it detaches it: a request
/// the kernel still has in flight (the RELEASE after a close) makes it busy for a moment, open
/// files and working directories for good.
pub const BUSY_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// A mounted FUSE connection.
#[derive(Debug, Clone)]
pub struct FuseMount {
    pub mountpoint: PathBuf,
    /// The mount's `major:minor`, which tells it from a later mount at the same place.
    pub device: String,
}

/// How an unmount went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    Done,
    /// It was busy and is detached: the process ends when its last file is closed.
    Detached,
    /// It was no longer attached (unmounted or detached by someone else).
    AlreadyGone,
}

/// Mounts a new FUSE connection; returns its `/dev/fuse` descriptor.
pub fn mount(spec: &MountSpec<'_>) -> Result<(OwnedFd, FuseMount), String> {
    let mountpoint = canonical(spec.mountpoint);
    let fd = if is_root() {
        match mount_syscall(spec, &mountpoint)? {
            Some(fd) => fd,
            // Root without the right to mount (a user namespace): as everyone else does.
            None => mount_fusermount(spec, &mountpoint)?,
        }
    } else {
        mount_fusermount(spec, &mountpoint)?
    };
    let device = mount_at(&mountpoint)
        .filter(|m| m.fstype.starts_with("fuse"))
        .map(|m| m.device)
        .ok_or_else(|| {
            format!(
                "mounted {}, but /proc/self/mountinfo does not show it",
                mountpoint.display()
            )
        })?;
    Ok((fd, FuseMount { mountpoint, device }))
}

fn mount_syscall(spec: &MountSpec<'_>, mountpoint: &Path) -> Result<Option<OwnedFd>, String> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| format!("cannot open /dev/fuse: {e} (is the fuse module loaded?)"))?;
    let fd = OwnedFd::from(dev);
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions",
        fd.as_raw_fd()
    );
    if spec.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if spec.read_only {
        flags |= libc::MS_RDONLY;
    }
    if spec.noexec {
        flags |= libc::MS_NOEXEC;
    }
    let c = |s: &str| CString::new(s).map_err(|_| format!("{s:?} holds a NUL byte"));
    let (source, target, fstype, data) = (
        c(spec.source)?,
        CString::new(mountpoint.as_os_str().as_bytes())
            .map_err(|_| "the mount point holds a NUL byte".to_string())?,
        c(FSTYPE)?,
        c(&data)?,
    );
    // SAFETY: all pointers are valid C strings that live across the call.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if r == 0 {
        return Ok(Some(fd));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EPERM) {
        return Ok(None);
    }
    Err(format!("mount(2) on {}: {e}", mountpoint.display()))
}

/// Options for fusermount3's `-o`: commas inside values cannot be escaped there.
fn fusermount_options(spec: &MountSpec<'_>) -> String {
    let mut o = format!(
        "subtype=s3mount,fsname={},default_permissions,nosuid,nodev",
        spec.source.replace(',', "%2C")
    );
    if spec.read_only {
        o.push_str(",ro");
    }
    if spec.noexec {
        o.push_str(",noexec");
    }
    if spec.allow_other {
        o.push_str(",allow_other");
    }
    o
}

fn mount_fusermount(spec: &MountSpec<'_>, mountpoint: &Path) -> Result<OwnedFd, String> {
    let fusermount = find_fusermount()
        .ok_or("fusermount3 was not found: install the fuse3 package (apt-get install fuse3)")?;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| format!("socketpair for fusermount3: {e}"))?;
    // The child's end must survive exec.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, 0) };
    let output = Command::new(&fusermount)
        .arg("-o")
        .arg(fusermount_options(spec))
        .arg("--")
        .arg(mountpoint)
        .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", fusermount.display()))?;
    drop(theirs);
    if !output.status.success() {
        let why = String::from_utf8_lossy(&output.stderr).trim().to_string();
        return Err(format!("{} failed: {why}", fusermount.display()));
    }
    receive_fd(&ours).map_err(|e| format!("no /dev/fuse descriptor from fusermount3: {e}"))
}

/// The descriptor fusermount3 sends over `sock` (SCM_RIGHTS).
fn receive_fd(sock: &std::os::unix::net::UnixStream) -> std::io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // u64s: aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: recvmsg on a socket we own into the buffers above.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel filled msg; CMSG_FIRSTHDR/CMSG_DATA walk what it wrote.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(std::io::Error::other("the message carried no descriptor"));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

impl FuseMount {
    /// Whether this mount is still attached at its mount point.
    pub fn attached(&self) -> bool {
        attached(&self.mountpoint, &self.device)
    }

    /// Unmounts; a mount still busy after [`BUSY_GRACE`] is detached instead.
    pub fn unmount(&self) -> Result<Unmounted, String> {
        let start = std::time::Instant::now();
        loop {
            if !self.attached() {
                return Ok(Unmounted::AlreadyGone);
            }
            match self.unmount_once()? {
                Some(done) => return Ok(done),
                None if start.elapsed() < BUSY_GRACE => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                None => return self.detach(),
            }
        }
    }

    /// One plain unmount; `None` when the mount is busy.
    fn unmount_once(&self) -> Result<Option<Unmounted>, String> {
        if is_root() {
            match umount2(&self.mountpoint, 0) {
                Ok(()) => return Ok(Some(Unmounted::Done)),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(None),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    return Ok(Some(Unmounted::AlreadyGone))
                }
                // Root without the right (a user namespace): fusermount3 below.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
                Err(e) => return Err(format!("unmounting {}: {e}", self.mountpoint.display())),
            }
        }
        if fusermount_unmount(&self.mountpoint, false)? {
            return Ok(Some(Unmounted::Done));
        }
        if !self.attached() {
            return Ok(Some(Unmounted::AlreadyGone));
        }
        Ok(None)
    }

    /// Detaches the busy mount (`umount -l`): the process ends when its last file is closed.
    fn detach(&self) -> Result<Unmounted, String> {
        if is_root() {
            match umount2(&self.mountpoint, libc::MNT_DETACH) {
                Ok(()) => return Ok(Unmounted::Detached),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    return Ok(Unmounted::AlreadyGone)
                }
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
                Err(e) => return Err(format!("detaching {}: {e}", self.mountpoint.display())),
            }
        }
        if fusermount_unmount(&self.mountpoint, true)? {
            return Ok(Unmounted::Detached);
        }
        Err(format!(
            "fusermount3 could not unmount {}",
            self.mountpoint.display()
        ))
    }

    /// Starts the watchdog that detaches this mount if the process dies without unmounting.
    /// Keep the returned pipe open for the life of the process.
    pub fn start_watchdog(&self, log: Option<&Path>) -> std::io::Result<std::process::ChildStdin> {
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg("__watchdog")
            .arg(&self.device)
            .arg(&self.mountpoint)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(log) = log {
            cmd.arg(log);
        }
        let mut child = cmd.spawn()?;
        child
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("the watchdog has no stdin"))
    }
}

fn attached(mountpoint: &Path, device: &str) -> bool {
    mounts()
        .iter()
        .any(|m| m.mountpoint == mountpoint && m.device == device)
}

fn umount2(path: &Path, flags: libc::c_int) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid C string path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `fusermount3 -u [-z] MOUNTPOINT`; false when it refused (busy).
fn fusermount_unmount(mountpoint: &Path, lazy: bool) -> Result<bool, String> {
    let fusermount = find_fusermount().ok_or("fusermount3 was not found")?;
    let mut cmd = Command::new(&fusermount);
    cmd.arg("-u").arg("-q");
    if lazy {
        cmd.arg("-z");
    }
    cmd.arg("--")
        .arg(mountpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.status()
        .map(|s| s.success())
        .map_err(|e| format!("cannot run {}: {e}", fusermount.display()))
}

/// A daemon that was killed could not remove its control socket: the watchdog does, unless a
/// new mount at the same place answers on it by now. Only an answer counts: the pipe can close
/// before the dying daemon's listening socket does, which still takes a connection and then
/// resets it.
fn remove_dead_control_socket(mountpoint: &Path) {
    // SAFETY: geteuid cannot fail.
    let path = crate::control::socket_path(unsafe { libc::geteuid() }, mountpoint);
    let request = serde_json::json!({"op": "status"});
    if path.exists()
        && crate::control::request(&path, &request, std::time::Duration::from_secs(5)).is_err()
    {
        let _ = std::fs::remove_file(&path);
    }
}

/// `s3mount __watchdog DEVICE MOUNTPOINT [LOG]`: waits until the daemon's end of the pipe on
/// stdin closes, then detaches the mount if it is still there. Returns the exit status.
pub fn run_watchdog(device: &str, mountpoint: &Path, log: Option<&Path>) -> i32 {
    // Signals a terminal sends to the whole group are the daemon's to handle.
    for sig in [libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGTSTP] {
        // SAFETY: setting a signal to ignored.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    remove_dead_control_socket(mountpoint);
    if !attached(mountpoint, device) {
        return 0;
    }
    let done = if is_root() {
        umount2(mountpoint, libc::MNT_DETACH).is_ok()
    } else {
        fusermount_unmount(mountpoint, true).unwrap_or(false)
    };
    if let Some(log) = log {
        let line = format!(
            "s3mount watchdog: the s3mount of {} ended without unmounting; {}\n",
            mountpoint.display(),
            if done {
                "detached the dead mount"
            } else {
                "could not detach it: run fusermount3 -u -z on it"
            }
        );
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(log) {
            let _ = std::io::Write::write_all(&mut f, line.as_bytes());
        }
    }
    if done {
        0
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_read_with_escapes_and_optional_fields() {
        let text = "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    50 36 0:52 / /mnt/with\\040space rw,nosuid,nodev,relatime shared:30 - fuse.s3mount b:p rw,user_id=1000,group_id=1000,default_permissions\n\
                    51 36 0:53 / /mnt/auto rw,relatime - autofs systemd-1 rw,fd=48,pgrp=1,timeout=0\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].mountpoint, PathBuf::from("/mnt/with space"));
        assert_eq!(
            (m[1].fstype.as_str(), m[1].source.as_str()),
            ("fuse.s3mount", "b:p")
        );
        assert_eq!(m[1].device, "0:52");
        assert_eq!(m[1].fuse_owner(), Some(1000));
        assert_eq!(m[2].fstype, "autofs");
        assert_eq!(unescape("a\\134b\\011c"), "a\\b\tc");
    }

    #[test]
    fn fusermount_options_name_the_subtype_and_cannot_be_split_by_the_source() {
        let spec = MountSpec {
            source: "b:odd,prefix",
            mountpoint: Path::new("/m"),
            read_only: true,
            noexec: false,
            allow_other: true,
        };
        assert_eq!(
            fusermount_options(&spec),
            "subtype=s3mount,fsname=b:odd%2Cprefix,default_permissions,nosuid,nodev,ro,allow_other"
        );
    }

    #[test]
    fn fusermount3_is_found_without_path() {
        let installed = ["/usr/bin/fusermount3", "/bin/fusermount3"]
            .iter()
            .any(|p| Path::new(p).is_file());
        let found = find_fusermount_in(std::ffi::OsStr::new(""));
        assert_eq!(found.is_some(), installed, "{found:?}");
        assert!(find_fusermount_in(std::ffi::OsStr::new("/nonexistent")).is_some() == installed);
    }
}
