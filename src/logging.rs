//! Where log lines go, and the two things signals change about them.
//!
//! A mount logs to stderr (in the foreground), to its own file (in the background: one file
//! per mount, so two mounts of a bucket never interleave), or to syslog (`--log-syslog`,
//! which journald reads too). The file is held by a [`LogFile`] that SIGHUP reopens, so
//! logrotate can move it away and the next line starts a new one. The level filter sits
//! behind a reload handle that SIGUSR2 flips between the configured level and debug.
//!
//! Syslog lines go as datagrams to the local socket (`/dev/log`), one per event, in the
//! form every local syslog daemon and journald accept: `<PRI>s3mount[PID]: TAG message`, where
//! TAG names the bucket, prefix and mount point, so several mounts can be told apart. The
//! daemon adds the time and host.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Where the lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stderr,
    File(PathBuf),
    /// The syslog socket, and the tag that names the mount in each line.
    Syslog {
        socket: PathBuf,
        tag: String,
    },
}

/// The log file; reopened (at the same path) on SIGHUP.
pub struct LogFile {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

impl LogFile {
    fn open(path: &Path) -> Result<Self, String> {
        let file = open_append(path)
            .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    /// Opens the path again (a new file if the old one was moved away).
    pub fn reopen(&self) -> std::io::Result<()> {
        let fresh = open_append(&self.path)?;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// One event's line into the log file, written whole while the file is locked.
pub struct LogFileLine<'a>(std::sync::MutexGuard<'a, std::fs::File>);

impl Write for LogFileLine<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

struct SharedFile(Arc<LogFile>);

impl<'a> MakeWriter<'a> for SharedFile {
    type Writer = LogFileLine<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        LogFileLine(self.0.file.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The syslog socket.
pub struct Syslog {
    socket: PathBuf,
    conn: Mutex<Option<UnixDatagram>>,
    tag: String,
}

/// Syslog's facility "daemon".
const FACILITY_DAEMON: u8 = 3;
/// The longest datagram sent; longer lines are cut.
const MAX_DATAGRAM: usize = 8 << 10;

impl Syslog {
    fn connect(socket: &Path, tag: String) -> Result<Self, String> {
        let conn = UnixDatagram::unbound()
            .and_then(|s| s.connect(socket).map(|()| s))
            .map_err(|e| {
                format!(
                    "cannot send logs to syslog at {}: {e}; is a syslog daemon or journald running? (or use --log-file)",
                    socket.display()
                )
            })?;
        Ok(Self {
            socket: socket.to_path_buf(),
            conn: Mutex::new(Some(conn)),
            tag,
        })
    }

    fn send(&self, priority: u8, text: &[u8]) {
        let text = String::from_utf8_lossy(text);
        let mut line = format!(
            "<{priority}>s3mount[{}]: {}{}",
            std::process::id(),
            self.tag,
            text.trim_end()
        )
        .into_bytes();
        line.truncate(MAX_DATAGRAM);
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        // A restarted syslog daemon has a new socket: connect again once.
        for _ in 0..2 {
            if conn.is_none() {
                *conn = UnixDatagram::unbound()
                    .and_then(|s| s.connect(&self.socket).map(|()| s))
                    .ok();
            }
            match conn.as_ref().map(|c| c.send(&line)) {
                Some(Ok(_)) => return,
                _ => *conn = None,
            }
        }
    }
}

/// One event, sent as one datagram when the formatter is done with it.
pub struct SyslogLine<'a> {
    sink: &'a Syslog,
    priority: u8,
    buf: Vec<u8>,
}

impl Write for SyslogLine<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogLine<'_> {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.sink.send(self.priority, &self.buf);
        }
    }
}

struct SharedSyslog(Arc<Syslog>);

fn severity(level: &tracing::Level) -> u8 {
    match *level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        tracing::Level::DEBUG | tracing::Level::TRACE => 7,
    }
}

impl<'a> MakeWriter<'a> for SharedSyslog {
    type Writer = SyslogLine<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        SyslogLine {
            sink: &self.0,
            priority: FACILITY_DAEMON * 8 + 6,
            buf: Vec::new(),
        }
    }
    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        SyslogLine {
            sink: &self.0,
            priority: FACILITY_DAEMON * 8 + severity(meta.level()),
            buf: Vec::new(),
        }
    }
}

/// The running logger: what SIGHUP and SIGUSR2 act on.
pub struct Logging {
    file: Option<Arc<LogFile>>,
    filter: reload::Handle<EnvFilter, Registry>,
    normal: String,
    debug_on: AtomicBool,
}

impl Logging {
    /// Reopens the log file, if logs go to one; returns its path.
    pub fn reopen(&self) -> Option<std::io::Result<PathBuf>> {
        self.file
            .as_ref()
            .map(|f| f.reopen().map(|()| f.path().to_path_buf()))
    }

    /// Switches debug logging on, or back to the configured level; returns whether it is on.
    pub fn toggle_debug(&self) -> bool {
        let on = !self.debug_on.fetch_xor(true, Ordering::Relaxed);
        let text = if on {
            "warn,s3mount=debug".to_string()
        } else {
            self.normal.clone()
        };
        if let Err(e) = self.filter.modify(|f| *f = EnvFilter::new(&text)) {
            tracing::warn!("cannot change the log level: {e}");
        }
        on
    }
}

/// The filter for `level`, unless `RUST_LOG` says otherwise.
fn filter_text(level: &str) -> String {
    std::env::var("RUST_LOG").unwrap_or_else(|_| format!("warn,s3mount={level}"))
}

/// Installs the process's logger. Call once.
pub fn init(level: &str, target: &Target) -> Result<Arc<Logging>, String> {
    let normal = filter_text(level);
    let (filter, handle) = reload::Layer::new(EnvFilter::new(&normal));
    let mut file = None;
    let (writer, ansi, time) = match target {
        Target::Stderr => {
            // Colours only on a terminal: a redirected log stays plain text.
            use std::io::IsTerminal;
            (
                BoxMakeWriter::new(std::io::stderr),
                std::io::stderr().is_terminal(),
                true,
            )
        }
        Target::File(path) => {
            let f = Arc::new(LogFile::open(path)?);
            file = Some(f.clone());
            (BoxMakeWriter::new(SharedFile(f)), false, true)
        }
        Target::Syslog { socket, tag } => {
            let s = Arc::new(Syslog::connect(socket, tag.clone())?);
            (BoxMakeWriter::new(SharedSyslog(s)), false, false)
        }
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(writer);
    let installed = if time {
        tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .try_init()
    } else {
        tracing_subscriber::registry()
            .with(filter)
            .with(layer.without_time())
            .try_init()
    };
    installed.map_err(|e| format!("cannot set up logging: {e}"))?;
    // A panic is a bug: say so in the log (in the background stderr goes nowhere), with where
    // it happened. The FUSE request it was serving is answered EIO by fuser.
    std::panic::set_hook(Box::new(|info| {
        let backtrace = std::backtrace::Backtrace::capture();
        tracing::error!("bug: {info}\n{backtrace}");
    }));
    Ok(Arc::new(Logging {
        file,
        filter: handle,
        normal,
        debug_on: AtomicBool::new(false),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syslog_lines_carry_priority_pid_and_tag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let server = UnixDatagram::bind(&path).unwrap();
        let sink = Syslog::connect(&path, "b:p on /m: ".into()).unwrap();
        {
            let w = SharedSyslog(Arc::new(sink));
            let mut line = w.make_writer();
            line.priority = FACILITY_DAEMON * 8 + 4;
            line.write_all(b"WARN hello\n").unwrap();
        }
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).unwrap();
        let got = std::str::from_utf8(&buf[..n]).unwrap();
        assert_eq!(
            got,
            format!("<28>s3mount[{}]: b:p on /m: WARN hello", std::process::id())
        );
    }

    #[test]
    fn a_moved_log_file_is_made_again_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        let f = LogFile::open(&path).unwrap();
        std::fs::rename(&path, dir.path().join("m.log.1")).unwrap();
        assert!(!path.exists());
        f.reopen().unwrap();
        SharedFile(Arc::new(f))
            .make_writer()
            .write_all(b"x\n")
            .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "x\n");
    }
}
