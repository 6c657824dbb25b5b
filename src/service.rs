//! What a running mount does besides answering the kernel: signals, the control socket, the
//! metrics endpoint and the periodic log lines.
//!
//! **Signals.** SIGHUP reopens the log file (logrotate's `postrotate`) and reads the
//! credentials again (the credential task listens for it too); SIGUSR1 logs a stats snapshot
//! with every upload and read in flight; SIGUSR2 switches debug logging on and off; SIGTERM,
//! SIGINT and SIGQUIT unmount (a busy mount is detached and the process ends with its last
//! open file). Every other signal whose default would end the process (SIGALRM, SIGPWR,
//! SIGXCPU, the real-time signals, ...) is caught and logged, so none leaves a dead mount;
//! SIGKILL and crashes are the watchdog's (see `fusemount.rs`).
//!
//! **Metrics.** `--metrics-addr` serves `GET /metrics` over plain HTTP/1.1, answered from one
//! [`status::snapshot`]; anything else is a 404. It is off unless asked for.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::control;
use crate::fusemount::{FuseMount, Unmounted};
use crate::logging::Logging;
use crate::presign::{self, FormRequest, UrlRequest};
use crate::status::{self, MountState};

/// Signals that would end the process by default and mean nothing to a mount.
fn ignored_signals() -> Vec<(i32, &'static str)> {
    let mut v = vec![
        (libc::SIGALRM, "SIGALRM"),
        (libc::SIGVTALRM, "SIGVTALRM"),
        (libc::SIGPROF, "SIGPROF"),
        (libc::SIGIO, "SIGIO"),
        (libc::SIGPWR, "SIGPWR"),
        (libc::SIGSTKFLT, "SIGSTKFLT"),
        (libc::SIGXCPU, "SIGXCPU"),
        (libc::SIGXFSZ, "SIGXFSZ"),
        (libc::SIGTSTP, "SIGTSTP"),
        (libc::SIGTTIN, "SIGTTIN"),
        (libc::SIGTTOU, "SIGTTOU"),
    ];
    for n in libc::SIGRTMIN()..=libc::SIGRTMAX() {
        v.push((n, "a real-time signal"));
    }
    v
}

/// Unmounts (or detaches, when busy) and logs how it went.
async fn unmount(mount: Arc<FuseMount>, why: &str) {
    tracing::info!(mountpoint = %mount.mountpoint.display(), "{why}: unmounting");
    let outcome = tokio::task::spawn_blocking(move || mount.unmount()).await;
    match outcome {
        Ok(Ok(Unmounted::Done)) => {}
        Ok(Ok(Unmounted::Detached)) => tracing::warn!(
            "the mount is busy: detached it; s3mount ends once the last open file is closed"
        ),
        Ok(Ok(Unmounted::AlreadyGone)) => tracing::info!(
            "the mount was already detached; s3mount ends once the last open file is closed"
        ),
        Ok(Err(e)) => tracing::error!("unmount failed: {e}"),
        Err(e) => tracing::error!("unmount failed: {e}"),
    }
}

/// Starts handling signals for the running mount. Call within the runtime.
pub fn handle_signals(state: Arc<MountState>, logging: Arc<Logging>, mount: Arc<FuseMount>) {
    use tokio::signal::unix::{signal, SignalKind};
    let listen = |kind: SignalKind| match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot handle signal {}: {e}", kind.as_raw_value());
            None
        }
    };
    if let Some(mut hup) = listen(SignalKind::hangup()) {
        let logging = logging.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match logging.reopen() {
                    Some(Ok(path)) => tracing::info!(
                        log_file = %path.display(),
                        "SIGHUP: reopened the log file; reading the credentials again"
                    ),
                    Some(Err(e)) => tracing::error!("SIGHUP: cannot reopen the log file: {e}"),
                    None => tracing::info!("SIGHUP: reading the credentials again"),
                }
            }
        });
    }
    if let Some(mut usr1) = listen(SignalKind::user_defined1()) {
        let state = state.clone();
        tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                status::log_stats(&status::snapshot(&state), true);
            }
        });
    }
    if let Some(mut usr2) = listen(SignalKind::user_defined2()) {
        tokio::spawn(async move {
            while usr2.recv().await.is_some() {
                let on = logging.toggle_debug();
                tracing::info!("SIGUSR2: debug logging {}", if on { "on" } else { "off" });
            }
        });
    }
    for (kind, name) in [
        (SignalKind::terminate(), "SIGTERM"),
        (SignalKind::interrupt(), "SIGINT"),
        (SignalKind::quit(), "SIGQUIT"),
    ] {
        if let Some(mut s) = listen(kind) {
            let mount = mount.clone();
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    unmount(mount.clone(), name).await;
                }
            });
        }
    }
    for (n, name) in ignored_signals() {
        // The last real-time signals may be beyond what the runtime can watch: those stay
        // at their default, as nobody sends them by accident.
        if let Ok(mut s) = signal(SignalKind::from_raw(n)) {
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    tracing::info!(signal = n, "ignoring {name}");
                }
            });
        }
    }
}

/// Answers the control socket.
pub struct Control {
    pub state: Arc<MountState>,
}

fn secs(request: &Value, field: &str, default: u64) -> Duration {
    Duration::from_secs(request[field].as_u64().unwrap_or(default))
}

fn text(request: &Value, field: &str) -> Option<String> {
    request[field].as_str().map(str::to_string)
}

impl Control {
    fn key_of(&self, path: &str) -> String {
        format!("{}{}", self.state.info.prefix, path.trim_start_matches('/'))
    }

    fn answer(&self, request: &Value) -> Value {
        let cfg = self.state.client.inner().config();
        match request["op"].as_str() {
            Some("status") => status::snapshot(&self.state),
            Some("metrics") => {
                json!({"text": status::render_prometheus(&status::snapshot(&self.state))})
            }
            Some("presign") => {
                let req = UrlRequest {
                    key: self.key_of(request["path"].as_str().unwrap_or("")),
                    method: text(request, "method").unwrap_or_else(|| "GET".into()),
                    expires: secs(request, "expires_seconds", 3600),
                    public_endpoint: text(request, "public_endpoint"),
                };
                match presign::presign_url(cfg, &req) {
                    Ok((url, warning)) => json!({"url": url, "warning": warning}),
                    Err(e) => json!({"error": e}),
                }
            }
            Some("post_policy") => {
                let mut prefix = self.key_of(request["path"].as_str().unwrap_or(""));
                if !prefix.is_empty() && !prefix.ends_with('/') {
                    prefix.push('/');
                }
                let req = FormRequest {
                    prefix,
                    expires: secs(request, "expires_seconds", 3600),
                    max_size: request["max_size"].as_u64(),
                    content_type: text(request, "content_type"),
                    acl: text(request, "acl"),
                    public_endpoint: text(request, "public_endpoint"),
                };
                presign::post_form(cfg, &req).unwrap_or_else(|e| json!({"error": e}))
            }
            Some(other) => json!({"error": format!("unknown request {other:?}")}),
            None => json!({"error": "the request names no op"}),
        }
    }
}

impl control::Handler for Control {
    fn handle(
        &self,
        request: Value,
    ) -> Pin<Box<dyn std::future::Future<Output = Value> + Send + '_>> {
        Box::pin(async move {
            let state = self.state.clone();
            if request["op"].as_str() == Some("abort_uploads") {
                let key = request["path"].as_str().map(|p| self.key_of(p));
                if key.is_none() && request["all"].as_bool() != Some(true) {
                    return json!({"error": "name an upload's path, or all"});
                }
                let aborted = state.fs.abort_resumable(key.as_deref()).await;
                return json!({"aborted": aborted});
            }
            // Building a snapshot reads /proc; signing may build a client: off the workers.
            let me = Control { state };
            tokio::task::spawn_blocking(move || me.answer(&request))
                .await
                .unwrap_or_else(|e| json!({"error": format!("the request failed: {e}")}))
        })
    }
}

/// Binds the metrics endpoint (so a taken port fails the mount, not a background task).
pub async fn bind_metrics(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))
}

/// Serves `GET /metrics` on `listener`.
pub fn serve_metrics(listener: tokio::net::TcpListener, state: Arc<MountState>) {
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                let read_head = async {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 << 10 {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                };
                if tokio::time::timeout(Duration::from_secs(5), read_head)
                    .await
                    .is_err()
                {
                    return;
                }
                let line = String::from_utf8_lossy(&head);
                let mut words = line.split_whitespace();
                let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let (status, kind, body) = if method == "GET"
                    && matches!(target.split('?').next(), Some("/metrics") | Some("/"))
                {
                    let body = tokio::task::spawn_blocking(move || {
                        status::render_prometheus(&status::snapshot(&state))
                    })
                    .await
                    .unwrap_or_default();
                    ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body)
                } else {
                    (
                        "404 Not Found",
                        "text/plain; charset=utf-8",
                        "only GET /metrics is served here\n".to_string(),
                    )
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(response.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
}

/// The stats line every 60 s, and the `--log-metrics` line every `metrics_every`.
pub fn log_periodically(state: Arc<MountState>, metrics_every: Option<Duration>) {
    let stats_state = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.tick().await;
        loop {
            tick.tick().await;
            let s = stats_state.clone();
            if let Ok(v) = tokio::task::spawn_blocking(move || status::snapshot(&s)).await {
                status::log_stats(&v, false);
            }
        }
    });
    let Some(every) = metrics_every else {
        return;
    };
    tokio::spawn(async move {
        let mut line = status::MetricsLine::new();
        let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
        tick.tick().await;
        loop {
            tick.tick().await;
            let s = state.clone();
            if let Ok(v) = tokio::task::spawn_blocking(move || status::snapshot(&s)).await {
                line.log(v);
            }
        }
    });
}
