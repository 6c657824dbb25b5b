//! The per-mount control socket: how `s3mount status` (and `presign` of a path inside a mount)
//! reach a running mount.
//!
//! **Where.** One Unix socket per mount, named by a hash of the mount point, in a directory
//! that belongs to the mount's owner alone: `/run/s3mount` for root; `/run/user/UID/s3mount`
//! when the login manager made `/run/user/UID`; else `/tmp/s3mount-UID`, which must already be
//! the user's own, mode 0700, or is refused. The place depends only on the owner's uid and the
//! mount point, never on the environment, so `s3mount status` from a login shell finds a mount
//! that mount(8) started with no environment at all. The owner comes from the `user_id=` that
//! the kernel shows for every FUSE mount.
//!
//! **Who.** The directory is 0700 and the socket 0600, and the mount checks every caller's
//! credentials (`SO_PEERCRED`): only its owner and root are answered. What it answers can hold
//! presigned URLs made with the mount's credentials; never the credentials themselves.
//!
//! **What.** One JSON request line (`{"op": "status"}`, `"metrics"`, `"presign"`,
//! `"post_policy"`), one JSON answer, then the connection closes.

use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// The longest request line a mount reads.
const MAX_REQUEST: usize = 64 << 10;
/// How long a caller has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The directory of `uid`'s control sockets.
pub fn socket_dir(uid: u32) -> PathBuf {
    if uid == 0 {
        return PathBuf::from("/run/s3mount");
    }
    let run_user = PathBuf::from(format!("/run/user/{uid}"));
    match std::fs::metadata(&run_user) {
        Ok(m) if m.is_dir() && m.uid() == uid => run_user.join("s3mount"),
        _ => PathBuf::from(format!("/tmp/s3mount-{uid}")),
    }
}

/// The socket of the mount at `mountpoint` (canonical) owned by `uid`.
pub fn socket_path(uid: u32, mountpoint: &Path) -> PathBuf {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(mountpoint.as_os_str().as_encoded_bytes());
    socket_dir(uid).join(format!("{}.sock", hex::encode(&digest[..8])))
}

/// Makes `dir` (mode 0700) or checks that it is this user's own and nobody else's to use.
fn prepare_dir(dir: &Path, uid: u32) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?
        }
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !m.is_dir() || m.uid() != uid {
        return Err(format!(
            "{} is not a directory owned by uid {uid}; not putting the control socket there",
            dir.display()
        ));
    }
    if m.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Answers requests; implemented by the mount.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Value) -> Pin<Box<dyn Future<Output = Value> + Send + '_>>;
}

/// The listening socket of a mount; removed when dropped.
pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ControlSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Binds the socket of the mount at `mountpoint` and serves `handler` on the current runtime.
pub fn serve(mountpoint: &Path, handler: Arc<dyn Handler>) -> Result<ControlSocket, String> {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let path = socket_path(uid, mountpoint);
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    prepare_dir(&dir, uid)?;
    // A socket left by a mount that died is in the way; a live one means the mount point is
    // served already (checked before mounting, so this is a race: refuse).
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(format!(
                "{} is in use by another s3mount of {}",
                path.display(),
                mountpoint.display()
            ));
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let allowed = stream
                    .peer_cred()
                    .is_ok_and(|c| c.uid() == uid || c.uid() == 0);
                answer(stream, handler, allowed).await;
            });
        }
    });
    Ok(ControlSocket { path })
}

async fn answer(stream: tokio::net::UnixStream, handler: Arc<dyn Handler>, allowed: bool) {
    let (read, mut write) = stream.into_split();
    let reply = if !allowed {
        json!({"error": "only the owner of this mount and root may ask it"})
    } else {
        let mut line = String::new();
        let mut reader =
            tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST as u64));
        match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
            Ok(Ok(_)) => match serde_json::from_str::<Value>(&line) {
                Ok(request) => handler.handle(request).await,
                Err(e) => json!({"error": format!("the request is not JSON: {e}")}),
            },
            _ => json!({"error": "no request"}),
        }
    };
    let mut text = reply.to_string();
    text.push('\n');
    let _ = write.write_all(text.as_bytes()).await;
    let _ = write.shutdown().await;
}

/// Sends `request` to the socket at `path` and returns the answer (blocking).
pub fn request(path: &Path, request: &Value, timeout: Duration) -> Result<Value, String> {
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            "{}: permission denied (only the mount's owner and root may ask it)",
            path.display()
        ),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => format!(
            "no s3mount answers at {} (is the mount from an older s3mount, or is it gone?)",
            path.display()
        ),
        _ => format!("{}: {e}", path.display()),
    })?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let mut line = request.to_string();
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| format!("{}: no answer: {e}", path.display()))?;
    let value: Value = serde_json::from_str(&answer)
        .map_err(|e| format!("{}: the answer is not JSON: {e}", path.display()))?;
    match value.get("error").and_then(Value::as_str) {
        Some(e) => Err(e.to_string()),
        None => Ok(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        fn handle(&self, request: Value) -> Pin<Box<dyn Future<Output = Value> + Send + '_>> {
            Box::pin(async move { json!({"echo": request}) })
        }
    }

    #[test]
    fn socket_places_depend_on_the_owner_only() {
        assert_eq!(socket_dir(0), PathBuf::from("/run/s3mount"));
        let a = socket_path(0, Path::new("/mnt/a"));
        assert_eq!(a, socket_path(0, Path::new("/mnt/a")));
        assert_ne!(a, socket_path(0, Path::new("/mnt/b")));
        assert!(
            socket_dir(4242).ends_with("s3mount-4242") || socket_dir(4242).ends_with("s3mount")
        );
    }

    #[tokio::test]
    async fn the_socket_is_the_owners_only_and_answers_one_request() {
        let mnt = tempfile::tempdir().unwrap();
        let sock = serve(mnt.path(), Arc::new(Echo)).unwrap();
        let mode = std::fs::metadata(sock.path()).unwrap().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(sock.path().parent().unwrap())
            .unwrap()
            .mode();
        assert_eq!(dir_mode & 0o077, 0);
        let path = sock.path().to_path_buf();
        let got = tokio::task::spawn_blocking(move || {
            request(&path, &json!({"op": "status"}), Duration::from_secs(5))
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(got["echo"]["op"], "status");
        drop(sock);
        assert!(!socket_path(0, mnt.path()).exists() || unsafe { libc::geteuid() } != 0);
    }
}
