//! What `s3mount status`, the metrics endpoint and the stats lines report, built in one place.
//!
//! A mount makes one [`snapshot`] (a JSON document) of itself: who it is (bucket, prefix,
//! mount point, pid, uptime), what is in flight (from [`crate::activity`]), the totals since
//! it mounted (the client's [`crate::s3::http::ClientStats`] and the core's `FsStats`), and
//! its memory and disk use. `s3mount status` asks each mount's control socket for it and prints
//! it as text or as it is (`--json`); the Prometheus endpoint and the `--log-metrics` line
//! render the same document, so the three can never disagree.
//!
//! Disk use is found without the core's help: the spool files and local copies are unlinked
//! temporary files held open by this process, so `/proc/self/fd` lists them (`(deleted)`),
//! and their allocated blocks are what they take.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

use crate::activity::Observed;
use crate::fs::S3Filesystem;
use crate::s3::{Operation, S3Client};

/// The filesystem of a real mount.
pub type MountFs = S3Filesystem<Observed<S3Client>>;

/// Who a mount is: fixed for its lifetime.
#[derive(Debug, Clone)]
pub struct MountInfo {
    pub mountpoint: PathBuf,
    pub source: String,
    pub bucket: String,
    pub prefix: String,
    pub endpoint: String,
    pub region: String,
    pub read_only: bool,
    pub spool_dir: PathBuf,
    /// Where `--metrics-addr` serves, if it does.
    pub metrics_url: Option<String>,
}

/// Everything a report needs from a running mount.
pub struct MountState {
    pub info: MountInfo,
    pub fs: Arc<MountFs>,
    pub client: Arc<Observed<S3Client>>,
    pub started: Instant,
    pub started_at: SystemTime,
}

fn rfc3339(t: SystemTime) -> String {
    crate::s3::credentials::format_time(t)
}

/// A key as a path inside the mount (`/dir/file`).
fn path_of(key: &str, prefix: &str) -> String {
    format!("/{}", key.strip_prefix(prefix).unwrap_or(key))
}

/// A value of `/proc/self/status`, in bytes.
fn proc_status_bytes(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Bytes allocated to the unlinked temporary files this process holds in `dirs` (spool files
/// and local copies), each file counted once.
fn temp_file_bytes(dirs: &[PathBuf]) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let mut seen = HashSet::new();
    let mut total = 0;
    for entry in entries.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let text = target.to_string_lossy();
        let Some(file) = text.strip_suffix(" (deleted)") else {
            continue;
        };
        if !dirs.iter().any(|d| Path::new(file).starts_with(d)) {
            continue;
        }
        if let Ok(m) = std::fs::metadata(entry.path()) {
            if m.is_file() && seen.insert((m.dev(), m.ino())) {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

pub(crate) fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: a zeroed statvfs for the call to fill; a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The mount's report, as `s3mount status --json` prints it.
pub fn snapshot(m: &MountState) -> Value {
    let info = &m.info;
    let activity = m.client.activity();
    let prefix = &info.prefix;
    let uploads: Vec<Value> = activity
        .uploads()
        .into_iter()
        .map(|u| {
            json!({
                "path": path_of(&u.key, prefix),
                "key": u.key,
                "bytes_written": u.written,
                "bytes_stored": u.stored,
                "parts_done": u.parts_done,
                "parts_in_flight": u.parts_in_flight,
                "rate_bytes_per_second": u.store_rate.round(),
                "write_rate_bytes_per_second": u.write_rate.round(),
                "retries": u.retries,
                "age_seconds": secs(u.age),
            })
        })
        .collect();
    let reads: Vec<Value> = activity
        .reads()
        .into_iter()
        .map(|r| {
            json!({
                "path": path_of(&r.key, prefix),
                "key": r.key,
                "bytes": r.bytes,
                "gets_in_flight": r.gets_in_flight,
                "rate_bytes_per_second": r.rate.round(),
                "retries": r.retries,
                "age_seconds": secs(r.age),
            })
        })
        .collect();
    let resumable: Vec<Value> =
        m.fs.resumable_uploads()
            .into_iter()
            .map(|r| {
                json!({
                    "path": path_of(&r.key, prefix),
                    "key": r.key,
                    "upload_id": r.upload_id,
                    "parts_stored": r.parts,
                    "bytes_stored": r.bytes_stored,
                    "idle_seconds": secs(r.idle),
                    "replaces_etag": r.base,
                })
            })
            .collect();
    let c = m.client.inner().stats();
    let f = m.fs.stats();
    let a = activity.totals();
    let by_operation: serde_json::Map<String, Value> = Operation::ALL
        .iter()
        .map(|op| (op.to_string(), json!(c.requests_of(*op))))
        .collect();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let tmp = std::env::temp_dir();
    let mut dirs = vec![info.spool_dir.clone()];
    if tmp != info.spool_dir {
        dirs.push(tmp);
    }
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "mountpoint": info.mountpoint,
        "source": info.source,
        "bucket": info.bucket,
        "prefix": info.prefix,
        "endpoint": info.endpoint,
        "region": info.region,
        "read_only": info.read_only,
        "pid": std::process::id(),
        "control_socket": crate::control::socket_path(
            // SAFETY: geteuid cannot fail.
            unsafe { libc::geteuid() },
            &info.mountpoint
        ),
        "metrics_url": info.metrics_url,
        // SAFETY: geteuid cannot fail.
        "uid": unsafe { libc::geteuid() },
        "started": rfc3339(m.started_at),
        "uptime_seconds": secs(m.started.elapsed()),
        "uploads": uploads,
        "resumable_uploads": resumable,
        "write_back": write_back(m, prefix),
        "read_cache": m.fs.read_cache_stats().map(|c| json!({
            "bytes": c.used_bytes,
            "max_bytes": c.max_bytes,
            "objects": c.objects,
            "hits": c.hits,
            "hit_bytes": c.hit_bytes,
            "corrupt_blocks": c.corrupt_blocks,
            "passthrough_opens": c.passthrough_opens,
        })),
        "resume_window_seconds": m.fs.config().write.resume_window.as_secs(),
        "reads": reads,
        "totals": {
            "requests": c.requests.load(Relaxed),
            "requests_by_operation": by_operation,
            "bytes_sent": c.bytes_sent.load(Relaxed),
            "bytes_received": c.bytes_received.load(Relaxed),
            "errors": c.errors.load(Relaxed),
            "retries": c.retries.load(Relaxed),
            "throttles": c.throttles.load(Relaxed),
            "uploads_completed": a.uploads_completed,
            "uploads_failed": a.uploads_failed,
            "bytes_stored": a.bytes_stored,
            "bytes_written": a.bytes_written,
            "lookups": f.lookups.load(Relaxed),
            "listings": f.listings.load(Relaxed),
            "reads": f.reads.load(Relaxed),
            "bytes_read": f.bytes_read.load(Relaxed),
        },
        "memory": {
            "rss_bytes": proc_status_bytes(&status, "VmRSS:"),
            "peak_rss_bytes": proc_status_bytes(&status, "VmHWM:"),
            "buffers_bytes": m.fs.memory_in_use(),
            "buffers_limit_bytes": m.fs.config().max_memory,
        },
        "disk": {
            "spool_dir": info.spool_dir,
            "spool_bytes": temp_file_bytes(&dirs),
            "free_bytes": free_bytes(&info.spool_dir),
        },
    })
}

/// The write-back queue (`null` without --write-back): files, bytes, the oldest's age, and
/// each pending file.
fn write_back(m: &MountState, prefix: &str) -> Value {
    let Some(q) = m.fs.write_back_info() else {
        return Value::Null;
    };
    let pending: Vec<Value> = q
        .pending
        .iter()
        .map(|p| {
            json!({
                "path": path_of(&p.key, prefix),
                "key": p.key,
                "bytes": p.size,
                "age_seconds": secs(p.age),
                "failed_attempts": p.failures,
            })
        })
        .collect();
    json!({
        "files": q.files,
        "bytes": q.bytes,
        "max_bytes": q.max_bytes,
        "oldest_seconds": q.oldest.map(secs),
        "stored": q.stored,
        "conflicts": q.conflicts,
        "server_checks_conditions": q.server_checks_conditions,
        "pending": pending,
    })
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

fn u(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn f(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_f64)
        .unwrap_or(0.0)
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// `12.3 MiB`
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `1h02m`, `3m05s`, `12s`
pub fn duration(secs: f64) -> String {
    let t = secs.max(0.0) as u64;
    match t {
        0..=59 => format!("{t}s"),
        60..=3599 => format!("{}m{:02}s", t / 60, t % 60),
        3600..=86_399 => format!("{}h{:02}m", t / 3600, (t % 3600) / 60),
        _ => format!("{}d{:02}h", t / 86_400, (t % 86_400) / 3600),
    }
}

fn rate(per_second: f64) -> String {
    format!("{}/s", bytes(per_second.max(0.0) as u64))
}

/// The report as `s3mount status` prints it.
pub fn render_text(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}  s3://{}/{}  pid {}  up {}  endpoint {}{}",
        s(v, "mountpoint"),
        s(v, "bucket"),
        s(v, "prefix"),
        u(v, &["pid"]),
        duration(f(v, &["uptime_seconds"])),
        s(v, "endpoint"),
        if v.get("read_only").and_then(Value::as_bool) == Some(true) {
            "  read-only"
        } else {
            ""
        }
    );
    if let Some(url) = v.get("metrics_url").and_then(Value::as_str) {
        let _ = writeln!(out, "  metrics: {url}");
    }
    let uploads = v.get("uploads").and_then(Value::as_array);
    let _ = writeln!(
        out,
        "  uploads in flight: {}",
        uploads.map_or(0, |a| a.len())
    );
    for up in uploads.into_iter().flatten() {
        let _ = writeln!(
            out,
            "    {}  written {}  stored {}  parts {} done, {} in flight  {}  retries {}  age {}",
            s(up, "path"),
            bytes(u(up, &["bytes_written"])),
            bytes(u(up, &["bytes_stored"])),
            u(up, &["parts_done"]),
            u(up, &["parts_in_flight"]),
            rate(f(up, &["rate_bytes_per_second"])),
            u(up, &["retries"]),
            duration(f(up, &["age_seconds"])),
        );
    }
    let _ = write!(out, "{}", render_resumable(v));
    let _ = write!(out, "{}", render_write_back(v));
    let rc = &v["read_cache"];
    if !rc.is_null() {
        let _ = writeln!(
            out,
            "  read cache: {} objects, {} of {}  served {} reads ({}), {} opens read by the kernel",
            u(rc, &["objects"]),
            bytes(u(rc, &["bytes"])),
            bytes(u(rc, &["max_bytes"])),
            u(rc, &["hits"]),
            bytes(u(rc, &["hit_bytes"])),
            u(rc, &["passthrough_opens"]),
        );
    }
    let reads = v.get("reads").and_then(Value::as_array);
    let _ = writeln!(out, "  reads in flight: {}", reads.map_or(0, |a| a.len()));
    for r in reads.into_iter().flatten() {
        let _ = writeln!(
            out,
            "    {}  read {}  {}  GETs in flight {}  retries {}  age {}",
            s(r, "path"),
            bytes(u(r, &["bytes"])),
            rate(f(r, &["rate_bytes_per_second"])),
            u(r, &["gets_in_flight"]),
            u(r, &["retries"]),
            duration(f(r, &["age_seconds"])),
        );
    }
    let t = &v["totals"];
    let ops: Vec<String> = t
        .get("requests_by_operation")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
                .map(|(op, n)| format!("{op} {}", n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "  totals: {} requests ({})  sent {}  received {}  errors {}  retries {}  throttles {}",
        u(t, &["requests"]),
        if ops.is_empty() {
            "none".to_string()
        } else {
            ops.join(", ")
        },
        bytes(u(t, &["bytes_sent"])),
        bytes(u(t, &["bytes_received"])),
        u(t, &["errors"]),
        u(t, &["retries"]),
        u(t, &["throttles"]),
    );
    let _ = writeln!(
        out,
        "          uploads {} completed, {} failed  stored {}  written {}  read {}",
        u(t, &["uploads_completed"]),
        u(t, &["uploads_failed"]),
        bytes(u(t, &["bytes_stored"])),
        bytes(u(t, &["bytes_written"])),
        bytes(u(t, &["bytes_read"])),
    );
    let _ = writeln!(
        out,
        "  memory: rss {} (peak {})  buffers {} of {}",
        bytes(u(v, &["memory", "rss_bytes"])),
        bytes(u(v, &["memory", "peak_rss_bytes"])),
        bytes(u(v, &["memory", "buffers_bytes"])),
        bytes(u(v, &["memory", "buffers_limit_bytes"])),
    );
    let _ = writeln!(
        out,
        "  disk: {} of spool and local copies in {} ({} free)",
        bytes(u(v, &["disk", "spool_bytes"])),
        v["disk"]["spool_dir"].as_str().unwrap_or("?"),
        v["disk"]["free_bytes"]
            .as_u64()
            .map_or_else(|| "?".to_string(), bytes),
    );
    out
}

/// The write-back queue of a mount's report (nothing without --write-back): a summary line,
/// then up to 20 pending files, oldest first.
pub fn render_write_back(v: &Value) -> String {
    let mut out = String::new();
    let w = &v["write_back"];
    if w.is_null() {
        return out;
    }
    let _ = writeln!(
        out,
        "  write-back queue: {} files, {} of {}{}  stored {}  conflicts {}",
        u(w, &["files"]),
        bytes(u(w, &["bytes"])),
        bytes(u(w, &["max_bytes"])),
        w["oldest_seconds"]
            .as_f64()
            .map_or_else(String::new, |a| format!("  oldest {}", duration(a))),
        u(w, &["stored"]),
        u(w, &["conflicts"]),
    );
    let mut pending: Vec<&Value> = w["pending"].as_array().into_iter().flatten().collect();
    pending.sort_by(|a, b| f(b, &["age_seconds"]).total_cmp(&f(a, &["age_seconds"])));
    for p in pending.iter().take(20) {
        let _ = writeln!(
            out,
            "    {}  {}  waiting {}{}",
            s(p, "path"),
            bytes(u(p, &["bytes"])),
            duration(f(p, &["age_seconds"])),
            match u(p, &["failed_attempts"]) {
                0 => String::new(),
                n => format!("  {n} failed attempts"),
            }
        );
    }
    if pending.len() > 20 {
        let _ = writeln!(out, "    ... and {} more", pending.len() - 20);
    }
    out
}

/// The resumable uploads of a mount's report, one line each (nothing when there are none).
pub fn render_resumable(v: &Value) -> String {
    let mut out = String::new();
    let list = v.get("resumable_uploads").and_then(Value::as_array);
    let Some(list) = list.filter(|l| !l.is_empty()) else {
        return out;
    };
    let _ = writeln!(
        out,
        "  resumable uploads: {} (aborted when idle for {})",
        list.len(),
        duration(f(v, &["resume_window_seconds"]))
    );
    for r in list {
        let _ = writeln!(
            out,
            "    {}  stored {} in {} parts  idle {}",
            s(r, "path"),
            bytes(u(r, &["bytes_stored"])),
            u(r, &["parts_stored"]),
            duration(f(r, &["idle_seconds"])),
        );
    }
    out
}

/// A label value in the Prometheus text format.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The report in the Prometheus text exposition format (version 0.0.4).
pub fn render_prometheus(v: &Value) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let one = |x: f64| vec![(String::new(), x)];
    let t = &v["totals"];
    metric(
        "s3mount_info",
        "gauge",
        "The mount: bucket, prefix, mount point and version.",
        vec![(
            format!(
                "{{bucket=\"{}\",prefix=\"{}\",mountpoint=\"{}\",version=\"{}\"}}",
                label(s(v, "bucket")),
                label(s(v, "prefix")),
                label(s(v, "mountpoint")),
                label(s(v, "version"))
            ),
            1.0,
        )],
    );
    metric(
        "s3mount_uptime_seconds",
        "gauge",
        "Seconds since the mount began.",
        one(f(v, &["uptime_seconds"])),
    );
    let by_op: Vec<(String, f64)> = t
        .get("requests_by_operation")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(op, n)| {
                    (
                        format!("{{operation=\"{}\"}}", label(op)),
                        n.as_u64().unwrap_or(0) as f64,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    metric(
        "s3mount_s3_requests_total",
        "counter",
        "S3 requests sent, retries included, by operation.",
        by_op,
    );
    for (name, key, help) in [
        (
            "s3mount_s3_bytes_sent_total",
            "bytes_sent",
            "Request body bytes sent to S3.",
        ),
        (
            "s3mount_s3_bytes_received_total",
            "bytes_received",
            "Object data bytes received from S3.",
        ),
        (
            "s3mount_s3_errors_total",
            "errors",
            "S3 requests that failed after their retries (NoSuchKey not counted).",
        ),
        (
            "s3mount_s3_retries_total",
            "retries",
            "S3 requests sent again after a transient failure.",
        ),
        (
            "s3mount_s3_throttles_total",
            "throttles",
            "Answers asking to slow down (SlowDown, 503, 429).",
        ),
        (
            "s3mount_uploads_completed_total",
            "uploads_completed",
            "Objects stored (PutObject or CompleteMultipartUpload answered).",
        ),
        (
            "s3mount_uploads_failed_total",
            "uploads_failed",
            "Objects whose storing failed.",
        ),
        (
            "s3mount_stored_bytes_total",
            "bytes_stored",
            "Bytes S3 stored for uploads (parts, copies and PutObjects answered).",
        ),
        (
            "s3mount_written_bytes_total",
            "bytes_written",
            "Bytes applications wrote through the mount.",
        ),
        ("s3mount_lookups_total", "lookups", "File system lookups."),
        ("s3mount_listings_total", "listings", "Directory listings."),
        ("s3mount_reads_total", "reads", "File system reads."),
        (
            "s3mount_read_bytes_total",
            "bytes_read",
            "Bytes applications read through the mount.",
        ),
    ] {
        metric(name, "counter", help, one(u(t, &[key]) as f64));
    }
    let count = |key: &str| v.get(key).and_then(Value::as_array).map_or(0, |a| a.len()) as f64;
    metric(
        "s3mount_uploads_in_flight",
        "gauge",
        "Files written and not stored yet.",
        one(count("uploads")),
    );
    if !v["write_back"].is_null() {
        metric(
            "s3mount_write_back_pending_files",
            "gauge",
            "Files closed under --write-back that S3 does not have yet.",
            one(f(v, &["write_back", "files"])),
        );
        metric(
            "s3mount_write_back_pending_bytes",
            "gauge",
            "Bytes of those files.",
            one(f(v, &["write_back", "bytes"])),
        );
        metric(
            "s3mount_write_back_oldest_seconds",
            "gauge",
            "How long the oldest of them has waited.",
            one(f(v, &["write_back", "oldest_seconds"])),
        );
        metric(
            "s3mount_write_back_conflicts_total",
            "counter",
            "Files stored beside an object another client changed meanwhile.",
            one(f(v, &["write_back", "conflicts"])),
        );
    }
    if !v["read_cache"].is_null() {
        metric(
            "s3mount_read_cache_bytes",
            "gauge",
            "Bytes of objects kept in the read cache (--cache).",
            one(f(v, &["read_cache", "bytes"])),
        );
        metric(
            "s3mount_read_cache_hit_bytes_total",
            "counter",
            "Bytes of reads served from the read cache.",
            one(f(v, &["read_cache", "hit_bytes"])),
        );
    }
    metric(
        "s3mount_reads_in_flight",
        "gauge",
        "Objects being read (GETs in flight).",
        one(count("reads")),
    );
    for (name, path, help) in [
        (
            "s3mount_memory_rss_bytes",
            ["memory", "rss_bytes"],
            "Resident memory of the process.",
        ),
        (
            "s3mount_memory_peak_rss_bytes",
            ["memory", "peak_rss_bytes"],
            "Peak resident memory of the process.",
        ),
        (
            "s3mount_buffer_bytes",
            ["memory", "buffers_bytes"],
            "Memory held by read and write buffers.",
        ),
        (
            "s3mount_buffer_limit_bytes",
            ["memory", "buffers_limit_bytes"],
            "The buffer memory budget (--max-memory).",
        ),
        (
            "s3mount_spool_bytes",
            ["disk", "spool_bytes"],
            "Disk taken by spool files and local copies.",
        ),
        (
            "s3mount_spool_free_bytes",
            ["disk", "free_bytes"],
            "Free space where the spool is.",
        ),
    ] {
        metric(name, "gauge", help, one(u(v, &path) as f64));
    }
    out
}

/// Rates between two snapshots, for the `--log-metrics` line.
pub struct MetricsLine {
    last: Option<(Instant, Value)>,
}

impl Default for MetricsLine {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsLine {
    pub fn new() -> Self {
        Self { last: None }
    }

    /// Logs one line: request and byte rates since the previous call, what is in flight.
    pub fn log(&mut self, now: Value) {
        let at = Instant::now();
        let (elapsed, before) = match &self.last {
            Some((t, v)) => (at.duration_since(*t).as_secs_f64().max(0.001), v.clone()),
            None => (f(&now, &["uptime_seconds"]).max(0.001), Value::Null),
        };
        let delta = |path: &[&str]| u(&now, path).saturating_sub(u(&before, path)) as f64;
        let per_s = |path: &[&str]| delta(path) / elapsed;
        let count = |key: &str| {
            now.get(key)
                .and_then(Value::as_array)
                .map_or(0, |a| a.len())
        };
        tracing::info!(
            requests_per_s = format!("{:.1}", per_s(&["totals", "requests"])),
            sent = %rate(per_s(&["totals", "bytes_sent"])),
            received = %rate(per_s(&["totals", "bytes_received"])),
            uploads_in_flight = count("uploads"),
            reads_in_flight = count("reads"),
            errors = u(&now, &["totals", "errors"]),
            new_errors = delta(&["totals", "errors"]) as u64,
            retries = u(&now, &["totals", "retries"]),
            new_retries = delta(&["totals", "retries"]) as u64,
            throttles = u(&now, &["totals", "throttles"]),
            rss = %bytes(u(&now, &["memory", "rss_bytes"])),
            "metrics"
        );
        self.last = Some((at, now));
    }
}

/// The stats line (every 60 s, at unmount and on SIGUSR1), and with `detail`, one line per
/// upload and read in flight.
pub fn log_stats(v: &Value, detail: bool) {
    let t = &v["totals"];
    tracing::info!(
        lookups = u(t, &["lookups"]),
        listings = u(t, &["listings"]),
        reads = u(t, &["reads"]),
        bytes_read = u(t, &["bytes_read"]),
        s3_requests = u(t, &["requests"]),
        s3_errors = u(t, &["errors"]),
        s3_retries = u(t, &["retries"]),
        s3_throttles = u(t, &["throttles"]),
        s3_bytes_received = u(t, &["bytes_received"]),
        s3_bytes_sent = u(t, &["bytes_sent"]),
        uploads_in_flight = v["uploads"].as_array().map_or(0, |a| a.len()),
        reads_in_flight = v["reads"].as_array().map_or(0, |a| a.len()),
        memory_in_use = u(v, &["memory", "buffers_bytes"]),
        rss = u(v, &["memory", "rss_bytes"]),
        spool_bytes = u(v, &["disk", "spool_bytes"]),
        "stats"
    );
    if !detail {
        return;
    }
    for up in v["uploads"].as_array().into_iter().flatten() {
        tracing::info!(
            path = s(up, "path"),
            bytes_written = u(up, &["bytes_written"]),
            bytes_stored = u(up, &["bytes_stored"]),
            parts_done = u(up, &["parts_done"]),
            parts_in_flight = u(up, &["parts_in_flight"]),
            rate = %rate(f(up, &["rate_bytes_per_second"])),
            retries = u(up, &["retries"]),
            "upload in flight"
        );
    }
    for r in v["reads"].as_array().into_iter().flatten() {
        tracing::info!(
            path = s(r, "path"),
            bytes = u(r, &["bytes"]),
            rate = %rate(f(r, &["rate_bytes_per_second"])),
            "read in flight"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        json!({
            "version": "0.1.0", "mountpoint": "/mnt/a \"b\"", "source": "b:p", "bucket": "b",
            "prefix": "p/", "endpoint": "http://e", "region": "r", "read_only": false,
            "pid": 7, "uid": 0, "started": "x", "uptime_seconds": 65.0,
            "uploads": [{"path": "/big", "key": "p/big", "bytes_written": 3 << 20,
                "bytes_stored": 1 << 20, "parts_done": 1, "parts_in_flight": 2,
                "rate_bytes_per_second": 1048576.0, "write_rate_bytes_per_second": 0.0,
                "retries": 1, "age_seconds": 3.0}],
            "reads": [],
            "totals": {"requests": 5, "requests_by_operation": {"PutObject": 2, "GetObject": 3},
                "bytes_sent": 10, "bytes_received": 20, "errors": 0, "retries": 1,
                "throttles": 0, "uploads_completed": 1, "uploads_failed": 0,
                "bytes_stored": 10, "bytes_written": 10, "lookups": 1, "listings": 1,
                "reads": 1, "bytes_read": 20},
            "memory": {"rss_bytes": 1, "peak_rss_bytes": 2, "buffers_bytes": 3,
                "buffers_limit_bytes": 4},
            "disk": {"spool_dir": "/tmp", "spool_bytes": 5, "free_bytes": 6},
        })
    }

    #[test]
    fn text_names_the_upload_and_totals() {
        let text = render_text(&sample());
        assert!(text.contains("up 1m05s"), "{text}");
        assert!(
            text.contains("/big  written 3.0 MiB  stored 1.0 MiB  parts 1 done, 2 in flight  1.0 MiB/s  retries 1"),
            "{text}"
        );
        assert!(
            text.contains("5 requests (PutObject 2, GetObject 3)")
                || text.contains("5 requests (GetObject 3, PutObject 2)"),
            "{text}"
        );
    }

    #[test]
    fn prometheus_labels_are_escaped() {
        let text = render_prometheus(&sample());
        assert!(text.contains("mountpoint=\"/mnt/a \\\"b\\\"\""), "{text}");
        assert!(text.contains("s3mount_s3_requests_total{operation=\"GetObject\"} 3"));
        assert!(text.contains("s3mount_uploads_in_flight 1"));
    }

    #[test]
    fn the_write_back_queue_shows_its_oldest_files_first() {
        let v = json!({"write_back": {
        "files": 2, "bytes": 3 << 20, "max_bytes": 10u64 << 30, "oldest_seconds": 75.0,
        "stored": 5, "conflicts": 1, "server_checks_conditions": false,
        "pending": [
            {"path": "/new", "bytes": 1 << 20, "age_seconds": 2.0, "failed_attempts": 0},
            {"path": "/old", "bytes": 2 << 20, "age_seconds": 75.0, "failed_attempts": 3},
        ]}});
        let text = render_write_back(&v);
        assert!(
            text.starts_with(
                "  write-back queue: 2 files, 3.0 MiB of 10.0 GiB  oldest 1m15s  stored 5  conflicts 1\n"
            ),
            "{text}"
        );
        let old = text
            .find("/old  2.0 MiB  waiting 1m15s  3 failed attempts")
            .unwrap();
        assert!(old < text.find("/new").unwrap(), "{text}");
        assert_eq!(render_write_back(&json!({"write_back": null})), "");
        assert!(render_prometheus(&v).contains("s3mount_write_back_pending_files 2"));
    }

    #[test]
    fn sizes_and_durations_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(duration(3725.0), "1h02m");
        assert_eq!(path_of("p/a/b", "p/"), "/a/b");
    }
}
