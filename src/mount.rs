//! From a parsed command line to a running mount.
//!
//! Order matters: every check a user can fail (credentials found, endpoint reachable, bucket
//! exists and is readable with these keys, mount point usable, `fusermount3` installed) runs
//! first, in the foreground, and fails with one line that says what to fix. Only then does the
//! process go to the background: the parent forks, the child mounts and reports back through a
//! pipe, and the parent exits 0 only once the mount is really there (or prints the child's
//! error and exits 1). SIGINT and SIGTERM unmount cleanly; `umount` and `fusermount3 -u` end the
//! process too.
//!
//! The same path serves mount(8): `mount.fuse.s3mount SOURCE DIR -o OPTIONS` is this program
//! under another name (see `main.rs`), run with no `PATH` and no `HOME`, so nothing here may
//! depend on either: credentials can come from `-o credentials_file=`, logs and the upload
//! journal go under `/var/log/s3mount` and `/var/lib/s3mount` for root without `HOME`. Mounting
//! itself is `fusemount.rs`; what the running mount does besides FUSE (signals, the control
//! socket, metrics) is `service.rs`.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::activity::{Activity, Observed};
use crate::cli::Cli;
use crate::fs::content_type::ContentTypes;
use crate::fs::disk_cache::DiskCache;
use crate::fs::writeback::Queue;
use crate::fs::{FsConfig, S3Filesystem};
use crate::fuse::{FuseAdapter, Ownership};
use crate::fusemount::{self, MountSpec};
use crate::logging::{self, Logging, Target};
use crate::s3::credentials::{self, Auth, Chain, Context, Env, OverlayEnv, ProcessEnv};
use crate::s3::sts::StsEndpoint;
use crate::s3::transport::{self, TransportConfig};
use crate::s3::{
    Addressing, ClientConfig, ClientError, ErrorKind, ListRequest, ObjectClient, RetryPolicy,
    S3Client, ServerSideEncryption, WriteDefaults,
};
use crate::status::{MountInfo, MountState};

/// A fatal start-up problem: one line for the user.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn fail<T>(msg: impl Into<String>) -> Result<T, StartError> {
    Err(StartError(msg.into()))
}

/// Everything the mount needs, resolved and checked.
pub struct MountPlan {
    pub client: ClientConfig,
    pub fs: FsConfig,
    pub mountpoint: PathBuf,
    pub allow_other: bool,
    pub allow_root: bool,
    pub foreground: bool,
    pub log_level: String,
    pub log_file: Option<PathBuf>,
    pub source: String,
    /// What every entry shows as owner and mode, whatever S3's metadata says.
    pub ownership: Ownership,
    pub noexec: bool,
    pub log_syslog: Option<PathBuf>,
    pub log_metrics: Option<Duration>,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub verbose: bool,
}

/// Where the bucket is and how to reach it: what a mount, `presign` and `post-policy` share.
#[derive(Debug, Clone, Default)]
pub struct Connect {
    pub bucket: String,
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub profile: Option<String>,
    pub credentials_file: Option<PathBuf>,
    pub config_file: Option<PathBuf>,
    pub addressing_style: Option<String>,
    pub force_path_style: bool,
    pub ca_bundle: Option<PathBuf>,
    pub proxy: Option<String>,
    pub no_verify_tls: bool,
    pub no_sign_request: bool,
}

impl Connect {
    pub fn of(cli: &Cli) -> Self {
        Self {
            bucket: cli.bucket.clone(),
            endpoint_url: cli.endpoint_url.clone(),
            region: cli.region.clone(),
            profile: cli.profile.clone(),
            credentials_file: cli.credentials_file.clone(),
            config_file: cli.config_file.clone(),
            addressing_style: cli.addressing_style.clone(),
            force_path_style: cli.force_path_style,
            ca_bundle: cli.ca_bundle.clone(),
            proxy: cli.proxy.clone(),
            no_verify_tls: cli.no_verify_tls,
            no_sign_request: cli.no_sign_request,
        }
    }

    /// The process environment, with `--credentials-file` and `--config-file` standing in for
    /// `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE`.
    fn env(&self) -> OverlayEnv<ProcessEnv> {
        let mut vars = Vec::new();
        if let Some(f) = &self.credentials_file {
            vars.push((
                "AWS_SHARED_CREDENTIALS_FILE".to_string(),
                f.to_string_lossy().into_owned(),
            ));
        }
        if let Some(f) = &self.config_file {
            vars.push((
                "AWS_CONFIG_FILE".to_string(),
                f.to_string_lossy().into_owned(),
            ));
        }
        OverlayEnv::new(ProcessEnv, vars)
    }
}

/// Resolves credentials (asking the chain's providers, which may mean STS, SSO, container or
/// instance metadata requests), region and endpoint, and checks the mount point.
pub fn plan(cli: Cli) -> Result<MountPlan, StartError> {
    // First what needs no network: the credential chain may take seconds (STS, IMDS).
    check_mountpoint(&cli.mountpoint)?;
    let mut client = client_config(&Connect::of(&cli))?;
    plan_with(cli, &mut client)
}

/// Credentials (asking the chain's providers, which may mean STS, SSO, container or instance
/// metadata requests), region, endpoint, addressing and transport of `connect`.
pub fn client_config(connect: &Connect) -> Result<ClientConfig, StartError> {
    let cli = connect;
    let env = connect.env();
    let env: &dyn Env = &env;
    let settings = credentials::settings(env, cli.profile.as_deref());
    let transport = TransportConfig::from_options(
        env,
        cli.ca_bundle.clone(),
        cli.proxy.clone(),
        cli.no_verify_tls,
    )
    .map_err(|e| StartError(e.to_string()))?;
    if cli.no_verify_tls {
        eprintln!("s3mount: warning: {NO_VERIFY_WARNING}");
    }
    let configured_region = cli.region.clone().or(settings.region);
    let endpoint_url = cli.endpoint_url.clone().or(settings.endpoint_url);
    let (auth, region) = if cli.no_sign_request {
        (
            Auth::Anonymous,
            configured_region.unwrap_or_else(|| "us-east-1".to_string()),
        )
    } else {
        let sts_region = configured_region
            .clone()
            .unwrap_or_else(|| "us-east-1".to_string());
        let ctx = Context {
            transport: transport.clone(),
            sts: StsEndpoint::from_env(env, &sts_region),
        };
        let chain = Chain::build(env, cli.profile.as_deref(), ctx)
            .map_err(|e| StartError(e.to_string()))?;
        // Its own runtime, dropped before any fork (see `run`).
        let rt = runtime()?;
        rt.block_on(async {
            let shared = chain
                .resolve()
                .await
                .map_err(|e| StartError(e.to_string()))?;
            let region = match configured_region {
                Some(r) => r,
                // On EC2 with nothing configured, the instance knows its region.
                None if endpoint_url.is_none() || shared.provider_name().starts_with("IMDS") => {
                    chain
                        .imds()
                        .region(chain.context())
                        .await
                        .unwrap_or_else(|| "us-east-1".to_string())
                }
                None => "us-east-1".to_string(),
            };
            Ok::<_, StartError>((Auth::Chain(shared), region))
        })?
    };
    let mut client = ClientConfig::new(&cli.bucket, &region, auth);
    client.endpoint_url = endpoint_url;
    client.addressing = match cli.addressing_style.as_deref() {
        Some("path") => Addressing::Path,
        Some("virtual") => Addressing::VirtualHosted,
        _ if cli.force_path_style => Addressing::Path,
        _ => Addressing::Auto,
    };
    client.transport = transport;
    Ok(client)
}

/// `--content-type-map`: the built-in table, none (`off`) or a mime.types file.
fn content_types(map: Option<&Path>) -> Result<ContentTypes, StartError> {
    match map {
        None => Ok(ContentTypes::BuiltIn),
        Some(p) if p == Path::new("off") => Ok(ContentTypes::Off),
        Some(p) => {
            let text = std::fs::read_to_string(p).or_else(|e| {
                fail(format!(
                    "cannot read --content-type-map {}: {e}",
                    p.display()
                ))
            })?;
            ContentTypes::parse_map(&text)
                .or_else(|e| fail(format!("--content-type-map {}: {e}", p.display())))
        }
    }
}

/// The rest of the plan, once `client` knows where the bucket is and how to reach it.
fn plan_with(cli: Cli, client: &mut ClientConfig) -> Result<MountPlan, StartError> {
    client.write = WriteDefaults {
        sse: match cli.sse.as_deref() {
            Some("AES256") => Some(ServerSideEncryption::S3Managed),
            Some("aws:kms") => Some(ServerSideEncryption::Kms {
                key_id: cli.sse_kms_key_id.clone(),
            }),
            Some("aws:kms:dsse") => Some(ServerSideEncryption::KmsDsse {
                key_id: cli.sse_kms_key_id.clone(),
            }),
            _ => None,
        },
        storage_class: cli.storage_class.clone(),
        acl: cli.acl.clone(),
    };
    client.request_payer = cli.requester_pays;
    client.upload_checksums = cli.upload_checksums;
    client.expected_bucket_owner = cli.expected_bucket_owner.clone();
    client.max_idle_connections = 128;
    client.max_read_connections = crate::fs::get::read_connections(cli.max_memory);
    client.retry.max_attempts = cli.retry_attempts;
    client.retry.max_elapsed = cli.retry_max_time;
    client.connect_timeout = cli.connect_timeout;
    client.request_timeout = cli.request_timeout;
    client.stall_timeout = cli.stall_timeout;

    // SAFETY: getuid/getgid cannot fail and have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let fs = FsConfig {
        prefix: cli.prefix.clone().unwrap_or_default(),
        read_only: cli.read_only,
        uid: cli.uid.unwrap_or(uid),
        gid: cli.gid.unwrap_or(gid),
        file_mode: cli.file_mode.unwrap_or(0o644),
        dir_mode: cli.dir_mode.unwrap_or(0o755),
        metadata_ttl: cli.metadata_ttl,
        max_memory: cli.max_memory,
        read: crate::fs::read::ReadConfig {
            local_copy_max: cli.local_copy_max,
            ..Default::default()
        },
        write: crate::fs::write::WriteConfig {
            part_size: cli.part_size,
            upload_concurrency: cli.upload_concurrency,
            spool_dir: cli.spool_dir.clone(),
            resume_window: cli.resume_window,
            ..Default::default()
        },
        journal_dir: Some(journal_dir(
            &cli.bucket,
            cli.prefix.as_deref().unwrap_or(""),
        )),
        content_types: content_types(cli.content_type_map.as_deref())?,
        atime: cli.atime,
        write_back: cli.write_back.then(|| {
            let dir = cli
                .cache_dir
                .clone()
                .unwrap_or_else(|| state_dir().join("write-back"));
            let max_bytes = cli.write_back_max_size.unwrap_or_else(|| {
                free_share(&dir, DEFAULT_WRITE_BACK_MAX, |free| {
                    (free / 2).clamp(1 << 30, DEFAULT_WRITE_BACK_MAX)
                })
            });
            crate::fs::writeback::WriteBackConfig {
                dir,
                max_bytes,
                delay: cli.write_back_delay.unwrap_or(DEFAULT_WRITE_BACK_DELAY),
            }
        }),
        read_cache: cli.read_cache.clone().map(|dir| {
            let max_bytes = cli
                .max_cache_size
                .unwrap_or_else(|| free_share(&dir, DEFAULT_READ_CACHE, |free| (free / 4).max(1)));
            crate::fs::disk_cache::DiskCacheConfig {
                dir,
                max_bytes,
                passthrough: cli.cache_passthrough,
            }
        }),
    };
    Ok(MountPlan {
        source: cli
            .source
            .clone()
            .unwrap_or_else(|| format!("{}:{}", cli.bucket, fs.prefix)),
        client: client.clone(),
        fs,
        mountpoint: fusemount::canonical(&cli.mountpoint),
        allow_other: cli.allow_other,
        allow_root: cli.allow_root,
        foreground: cli.foreground,
        log_level: cli.log_level,
        log_file: cli.log_file,
        ownership: Ownership {
            uid: cli.uid,
            gid: cli.gid,
            file_mode: cli.file_mode,
            dir_mode: cli.dir_mode,
            umask: cli.umask,
        },
        noexec: cli.noexec,
        log_syslog: cli.log_syslog,
        log_metrics: cli.log_metrics,
        metrics_addr: cli.metrics_addr,
        verbose: cli.verbose,
    })
}

/// Checks the mount point without triggering an automount on it (`x-systemd.automount` makes
/// it an autofs trigger whose mount is the one being made).
pub fn check_mountpoint(path: &Path) -> Result<(), StartError> {
    match fusemount::stat_no_automount(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fail(format!(
            "mount point {} does not exist; create it with mkdir first",
            path.display()
        )),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => fail(format!(
            "{0} is a dead FUSE mount (its process ended); free it with `fusermount3 -u -z {0}` (or `umount -l {0}`) and mount again",
            path.display()
        )),
        Err(e) => fail(format!("cannot use mount point {}: {e}", path.display())),
        Ok(st) if st.st_mode & libc::S_IFMT != libc::S_IFDIR => {
            fail(format!("mount point {} is not a directory", path.display()))
        }
        Ok(_) => {
            let canonical = fusemount::canonical(path);
            if let Some(top) = mount_taken(&fusemount::mounts(), &canonical) {
                return fail(format!(
                    "{} is already a FUSE mount ({} from {}); unmount it first",
                    path.display(),
                    top.fstype,
                    top.source
                ));
            }
            // Root mounts with mount(2); everyone else needs the setuid helper.
            // SAFETY: geteuid cannot fail.
            if unsafe { libc::geteuid() } != 0 && fusemount::find_fusermount().is_none() {
                return fail(
                    "fusermount3 was not found: install the fuse3 package (apt-get install fuse3)",
                );
            }
            Ok(())
        }
    }
}

/// The FUSE mount on top at `path`, if the topmost mount there is one. Any other mount under
/// it (an autofs trigger of `x-systemd.automount`, a bind mount) is mounted over as usual.
pub fn mount_taken(mounts: &[fusemount::MountEntry], path: &Path) -> Option<fusemount::MountEntry> {
    mounts
        .iter()
        .rev()
        .find(|m| m.mountpoint == path)
        .filter(|m| m.fstype == "fuse" || m.fstype.starts_with("fuse."))
        .cloned()
}

const NO_VERIFY_WARNING: &str = "--no-verify-tls: TLS certificates are not checked, so anyone on the network path can read and change this mount's traffic";

/// What a failed bucket check means, in words a user can act on.
pub fn explain(e: &ClientError, cfg: &ClientConfig) -> String {
    let endpoint = cfg
        .endpoint_url
        .clone()
        .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", cfg.region));
    let key_id = cfg.auth.access_key_id();
    let bucket = &cfg.bucket;
    // What the server itself said, for every case where it said something.
    let said = if e.status.is_some() {
        format!(
            " (the server says {}{})",
            e.kind,
            if e.message.is_empty() {
                String::new()
            } else {
                format!(": {}", e.message)
            }
        )
    } else {
        String::new()
    };
    let proxy = reqwest::Url::parse(&endpoint)
        .ok()
        .and_then(|u| cfg.transport.proxy.proxy_for(&u).cloned());
    if e.kind == ErrorKind::Connect && transport::is_untrusted_certificate(&e.message) {
        return transport::untrusted_message(&endpoint, &e.message);
    }
    if let (ErrorKind::Connect | ErrorKind::Timeout, Some(p)) = (&e.kind, &proxy) {
        return format!(
            "cannot reach {endpoint} through the proxy {} (from {}): {}; check that the proxy runs and can reach the endpoint",
            p.display(),
            p.source,
            short(&e.message)
        );
    }
    if is_clock_skew(e) {
        return format!(
            "{endpoint} refuses the requests because this machine's clock is wrong{said}; S3 accepts signatures made within 15 minutes of its own time: set the clock (timedatectl set-ntp true, or chrony/ntpd) and mount again"
        );
    }
    match &e.kind {
        ErrorKind::Connect => format!("cannot reach the S3 endpoint {endpoint}: {}; check --endpoint-url and that the server is running", short(&e.message)),
        ErrorKind::Timeout => format!("the S3 endpoint {endpoint} did not answer in time ({}); check --endpoint-url and the network", e.message),
        ErrorKind::NotS3 => format!("{endpoint} is not an S3 endpoint: {}", e.message),
        ErrorKind::InvalidResponse => format!("{endpoint} answered something that is not S3's answer ({}); check --endpoint-url", e.message),
        ErrorKind::NoSuchBucket => format!("bucket '{bucket}' does not exist at {endpoint}; check the bucket name (and --region){said}"),
        ErrorKind::SignatureDoesNotMatch => format!("the secret access key for access key id {key_id} is wrong{said}"),
        ErrorKind::InvalidAccessKeyId => format!("access key id {key_id} is not known to {endpoint}; check AWS_ACCESS_KEY_ID or the profile{said}"),
        ErrorKind::AccessDenied => format!("access to bucket '{bucket}' is denied for access key id {key_id}; it needs permission to list the bucket{said}"),
        ErrorKind::WrongRegion => format!("bucket '{bucket}' is in another region: {}", e.message),
        _ => format!("checking bucket '{bucket}' at {endpoint} failed: {e}"),
    }
}

/// S3's RequestTimeTooSkewed, or what other stores say for it (Garage: "Date is too old").
fn is_clock_skew(e: &ClientError) -> bool {
    matches!(&e.kind, ErrorKind::Other(code) if code == "RequestTimeTooSkewed")
        || (e.status.is_some_and(|s| s == 400 || s == 403)
            && ["too old", "in the future", "too skewed"]
                .iter()
                .any(|m| e.message.to_ascii_lowercase().contains(m)))
}

fn short(message: &str) -> String {
    // reqwest's chain ends with the OS error ("Connection refused (os error 111)"): the useful bit.
    message.rsplit(": ").next().unwrap_or(message).to_string()
}

/// Lists one key of the mount's prefix with a short retry budget: proves the endpoint answers,
/// the bucket exists and the credentials may read it.
pub async fn check_bucket(cfg: &ClientConfig, prefix: &str) -> Result<(), StartError> {
    let mut quick = cfg.clone();
    quick.retry = RetryPolicy {
        max_attempts: 3,
        max_elapsed: Duration::from_secs(15),
        ..RetryPolicy::default()
    };
    let client = S3Client::new(quick).map_err(|e| StartError(e.to_string()))?;
    let listing = ListRequest {
        prefix,
        max_keys: Some(1),
        ..Default::default()
    };
    client
        .list_objects(&listing)
        .await
        .map(drop)
        .map_err(|e| StartError(explain(&e, cfg)))
}

/// `--write-back-max-size` when not given, at most.
const DEFAULT_WRITE_BACK_MAX: u64 = 10 << 30;
/// The read cache's size when `--max-cache-size` is not given and the directory's free space
/// (of which it takes a quarter) cannot be read.
const DEFAULT_READ_CACHE: u64 = 1 << 30;
/// How long write-back waits after a last close before it uploads (`--write-back-delay`).
const DEFAULT_WRITE_BACK_DELAY: Duration = Duration::from_secs(2);

fn state_dir() -> PathBuf {
    state_dir_for(
        std::env::var_os("XDG_STATE_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
        // SAFETY: geteuid cannot fail.
        unsafe { libc::geteuid() },
        "/var/lib/s3mount",
    )
}

/// `$XDG_STATE_HOME/s3mount`, else `~/.local/state/s3mount`; without either (mount(8) and
/// systemd run helpers with no environment), `system` for root and `/tmp/s3mount-UID` for
/// others.
fn state_dir_for(xdg: Option<PathBuf>, home: Option<PathBuf>, uid: u32, system: &str) -> PathBuf {
    let xdg = xdg.filter(|p| p.is_absolute());
    let home = home.filter(|p| p.is_absolute() && p != Path::new("/"));
    match (xdg, home) {
        (Some(x), _) => x.join("s3mount"),
        (None, Some(h)) => h.join(".local/state/s3mount"),
        (None, None) if uid == 0 => PathBuf::from(system),
        (None, None) => PathBuf::from(format!("/tmp/s3mount-{uid}")),
    }
}

/// One log file per mount: `BUCKET[-PREFIX]@MOUNTPOINT.log`, so two mounts of one bucket never
/// share one.
pub fn default_log_file(bucket: &str, prefix: &str, mountpoint: &Path) -> PathBuf {
    let dir = state_dir_for(
        std::env::var_os("XDG_STATE_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
        // SAFETY: geteuid cannot fail.
        unsafe { libc::geteuid() },
        "/var/log/s3mount",
    );
    dir.join(log_file_name(bucket, prefix, mountpoint))
}

fn log_file_name(bucket: &str, prefix: &str, mountpoint: &Path) -> String {
    let clean = |s: &str| -> String {
        s.trim_matches('/')
            .chars()
            .map(|c| match c {
                '/' => '-',
                c if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') => c,
                _ => '_',
            })
            .collect()
    };
    let mut name = clean(bucket);
    let prefix = clean(prefix);
    if !prefix.is_empty() {
        name.push('-');
        name.push_str(&prefix);
    }
    name.push('@');
    let at = clean(&mountpoint.to_string_lossy());
    name.push_str(if at.is_empty() { "-" } else { &at });
    if name.len() > 200 {
        // Names stay under the file system's 255 bytes; the hash keeps them apart.
        let tag = hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(name.as_bytes())[..6]);
        name.truncate(180);
        name.push('~');
        name.push_str(&tag);
    }
    name.push_str(".log");
    name
}

/// Where a mount's logs go: `--log-syslog`, else `--log-file`, else stderr in the foreground;
/// in the background, syslog when systemd runs it (its journal then has the lines), else the
/// mount's own file.
pub fn log_target(plan: &MountPlan, journal: bool) -> Target {
    let tag = format!(
        "{}:{} on {}: ",
        plan.client.bucket,
        plan.fs.prefix,
        plan.mountpoint.display()
    );
    if let Some(socket) = &plan.log_syslog {
        return Target::Syslog {
            socket: socket.clone(),
            tag,
        };
    }
    if let Some(file) = &plan.log_file {
        return Target::File(file.clone());
    }
    if plan.foreground {
        return Target::Stderr;
    }
    if journal {
        return Target::Syslog {
            socket: PathBuf::from("/dev/log"),
            tag,
        };
    }
    Target::File(default_log_file(
        &plan.client.bucket,
        &plan.fs.prefix,
        &plan.mountpoint,
    ))
}

/// A default size taken from the free space of `dir` (made first, so it can be asked), or
/// `otherwise` where that cannot be read.
fn free_share(dir: &Path, otherwise: u64, share: impl FnOnce(u64) -> u64) -> u64 {
    let _ = std::fs::create_dir_all(dir);
    crate::status::free_bytes(dir).map_or(otherwise, share)
}

/// The upload journal of one bucket and prefix.
fn journal_dir(bucket: &str, prefix: &str) -> PathBuf {
    crate::fs::bucket_dir(&state_dir().join("uploads"), bucket, prefix)
}

fn runtime() -> Result<tokio::runtime::Runtime, StartError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        // Blocking work (hashing parts, spool and local-copy I/O) is bounded by the memory
        // budget anyway; more threads would only add stacks and allocator arenas.
        .max_blocking_threads(32)
        .thread_name("s3mount-worker")
        .enable_all()
        .build()
        .map_err(|e| StartError(format!("cannot start the async runtime: {e}")))
}

/// Large buffers (read segments, part buffers) are allocated by one thread and freed by
/// another; glibc's default raises its mmap threshold after the first such free and then serves
/// them from per-thread arenas that fragment and never shrink (measured: peak RSS 260 MiB for
/// a 2 GiB copy with 90 MiB of buffers live). A fixed 1 MiB threshold maps and unmaps them, so
/// RSS follows the memory budget.
fn bound_allocator() {
    // SAFETY: mallopt only changes allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        // One arena per thread (glibc's default, up to 8 per core) keeps freed memory of each
        // thread's own; a few shared ones hold less of it (measured with 16 readers and 16
        // writers).
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

/// Runs the whole program; returns when the mount ends.
pub fn run(cli: Cli) -> Result<(), StartError> {
    bound_allocator();
    if cli.fake {
        // mount -f: everything but the mount, and nothing that needs the network.
        check_mountpoint(&cli.mountpoint)?;
        if cli.verbose {
            eprintln!(
                "s3mount: -f: would mount {} on {}",
                cli.source.as_deref().unwrap_or(&cli.bucket),
                cli.mountpoint.display()
            );
        }
        return Ok(());
    }
    let plan = plan(cli)?;
    {
        // The checks use their own runtime, dropped before forking: a process must not fork
        // with runtime threads alive.
        let rt = runtime()?;
        rt.block_on(check_bucket(&plan.client, &plan.fs.prefix))?;
    }
    // Run by systemd with its journal on stderr: the journal (through syslog) gets the lines.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some() && Path::new("/dev/log").exists();
    let target = log_target(&plan, journal);
    if plan.verbose {
        eprintln!(
            "s3mount: mounting s3://{}/{} from {} on {} (region {}, credentials: {}); logs: {}",
            plan.client.bucket,
            plan.fs.prefix,
            plan.client.endpoint_url.as_deref().unwrap_or("AWS"),
            plan.mountpoint.display(),
            plan.client.region,
            match &plan.client.auth {
                Auth::Chain(shared) => shared.provider_name().to_string(),
                Auth::Signed(_) => "the given keys".to_string(),
                Auth::Anonymous => "none (unsigned requests)".to_string(),
            },
            match &target {
                Target::Stderr => "stderr".to_string(),
                Target::File(p) => p.display().to_string(),
                Target::Syslog { socket, .. } => format!("syslog at {}", socket.display()),
            }
        );
    }
    if plan.foreground {
        let logging = logging::init(&plan.log_level, &target).map_err(StartError)?;
        return mount_and_serve(&plan, &target, logging, |_| {});
    }
    daemonize(|report| {
        let logging = match logging::init(&plan.log_level, &target) {
            Ok(l) => l,
            Err(e) => {
                report(Err(e.clone()));
                return Err(StartError(e));
            }
        };
        mount_and_serve(&plan, &target, logging, report)
    })
}

/// Forks; the child runs `child` and reports whether the mount came up through a pipe; the
/// parent waits for that report and exits accordingly.
fn daemonize(
    child: impl FnOnce(&mut dyn FnMut(Result<(), String>)) -> Result<(), StartError>,
) -> Result<(), StartError> {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two ints for pipe2(2) to fill.
    // Close-on-exec: fusermount3, which the child runs to mount, must not hold the write end.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return fail(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe(2) succeeded, so both descriptors are open and owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other threads run at this point (the check runtime was dropped).
    match unsafe { libc::fork() } {
        -1 => fail(format!("fork: {}", std::io::Error::last_os_error())),
        0 => {
            drop(read_end);
            // SAFETY: setsid has no preconditions in a freshly forked child.
            unsafe { libc::setsid() };
            redirect_stdio();
            let mut pipe = Some(std::fs::File::from(write_end));
            let mut report = |result: Result<(), String>| {
                if let Some(mut p) = pipe.take() {
                    let msg = match result {
                        Ok(()) => "OK".to_string(),
                        Err(e) => e,
                    };
                    let _ = p.write_all(msg.as_bytes());
                }
            };
            let outcome = child(&mut report);
            if let Err(e) = &outcome {
                report(Err(e.0.clone()));
                tracing::error!("{e}");
            }
            std::process::exit(if outcome.is_ok() { 0 } else { 1 });
        }
        _parent => {
            drop(write_end);
            let mut msg = String::new();
            let _ = std::fs::File::from(read_end).read_to_string(&mut msg);
            match msg.as_str() {
                "OK" => Ok(()),
                "" => fail("the background process ended before mounting; see its log file"),
                other => fail(other.to_string()),
            }
        }
    }
}

fn redirect_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors, which this process owns.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// Finds out, before the mount serves, whether the server checks CRC32C checksums; if it does
/// not, uploads carry their signed SHA-256 (see `--upload-checksums`).
fn probe_checksums(
    rt: &tokio::runtime::Runtime,
    s3: S3Client,
    prefix: &str,
    asked: crate::s3::ChecksumChoice,
) {
    let key = format!("{prefix}.s3mount-probe-{:016x}", fastrand::u64(..));
    // Before the mount serves: its upload is gone before anyone can list uploads, and no
    // fault of a file's own requests can be taken for the probe's.
    rt.block_on(async move {
        let probed = tokio::time::timeout(Duration::from_secs(10), s3.probe_crc32c(&key))
            .await
            .unwrap_or_else(|_| Err("no answer within 10 s".into()));
        match probed {
            Ok(()) => tracing::info!("uploads carry CRC32C checksums, which the server checks"),
            Err(why) if asked == crate::s3::ChecksumChoice::Crc32c => tracing::warn!(
                "uploads carry their signed SHA-256 instead of CRC32C: the server does not check CRC32C ({why})"
            ),
            Err(why) => tracing::info!(
                "uploads carry their signed SHA-256: the server does not check CRC32C ({why})"
            ),
        }
    });
}

fn mount_and_serve(
    plan: &MountPlan,
    target: &Target,
    logging: Arc<Logging>,
    mut mounted: impl FnMut(Result<(), String>),
) -> Result<(), StartError> {
    let rt = runtime()?;
    let entered = rt.enter();
    let activity = Activity::new();
    let s3 = S3Client::new(plan.client.clone()).map_err(|e| StartError(e.to_string()))?;
    let endpoint = s3.bucket_url();
    if !plan.fs.read_only && s3.wants_crc32c() {
        probe_checksums(
            &rt,
            s3.clone(),
            &plan.fs.prefix,
            plan.client.upload_checksums,
        );
    }
    let client = Arc::new(Observed::new(s3, activity.clone()));
    let mut report = |msg: String| {
        mounted(Err(msg.clone()));
        fail::<()>(msg)
    };
    let mut fs = S3Filesystem::new(client.clone(), plan.fs.clone());
    if let Some(cfg) = &plan.fs.write_back {
        // Each file waiting in the queue keeps its spool open.
        raise_open_file_limit();
        match Queue::open(cfg, &plan.client.bucket, &plan.fs.prefix) {
            Ok(q) => fs = fs.with_write_back(q),
            Err(e) => return report(e),
        }
    }
    if let Some(cfg) = &plan.fs.read_cache {
        let block = plan.fs.read.block_size;
        match DiskCache::open(cfg, &plan.client.bucket, &plan.fs.prefix, block) {
            Ok(cache) => {
                tracing::info!(dir = %cache.dir().display(), max_bytes = cfg.max_bytes, "read cache");
                fs = fs.with_read_cache(cache);
            }
            Err(e) => return report(e),
        }
    }
    let fs = Arc::new(fs);
    if plan.fs.write_back.is_some() {
        // Before the mount serves: files a crashed mount left are there from the first look.
        rt.block_on(async {
            fs.probe_conditional_writes().await;
            fs.recover_write_back().await;
        });
    }
    let adapter = FuseAdapter::new(fs.clone(), rt.handle().clone())
        .with_ownership(plan.ownership)
        .with_activity(activity);
    // What can fail for reasons of this machine comes before the mount: a taken port.
    let metrics = match plan.metrics_addr {
        Some(addr) => match rt.block_on(crate::service::bind_metrics(addr)) {
            Ok(l) => Some(l),
            Err(e) => return report(e),
        },
        None => None,
    };
    let metrics_url = metrics
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| format!("http://{a}/metrics"));

    let state = Arc::new(MountState {
        info: MountInfo {
            mountpoint: plan.mountpoint.clone(),
            source: plan.source.clone(),
            bucket: plan.client.bucket.clone(),
            prefix: plan.fs.prefix.clone(),
            endpoint,
            region: plan.client.region.clone(),
            read_only: plan.fs.read_only,
            spool_dir: plan
                .fs
                .write
                .spool_dir
                .clone()
                .unwrap_or_else(std::env::temp_dir),
            metrics_url: metrics_url.clone(),
        },
        fs: fs.clone(),
        client: client.clone(),
        started: std::time::Instant::now(),
        started_at: std::time::SystemTime::now(),
    });
    let spec = MountSpec {
        source: &plan.source,
        mountpoint: &plan.mountpoint,
        read_only: plan.fs.read_only,
        noexec: plan.noexec,
        allow_other: plan.allow_other || plan.allow_root,
    };
    let (fd, mount) = match fusemount::mount(&spec) {
        Ok(m) => m,
        Err(e) => {
            return report(format!(
                "cannot mount on {}: {e}",
                plan.mountpoint.display()
            ))
        }
    };
    let mount = Arc::new(mount);
    let acl = if plan.allow_other {
        fuser::SessionACL::All
    } else if plan.allow_root {
        fuser::SessionACL::RootAndOwner
    } else {
        fuser::SessionACL::Owner
    };
    let mut config = fuser::Config::default();
    config.acl = acl;
    config.n_threads = Some(2);
    config.clone_fd = true;
    let session = match fuser::Session::from_fd(adapter, fd, acl, config) {
        Ok(s) => s,
        Err(e) => {
            let _ = mount.unmount();
            return report(format!(
                "cannot start the FUSE session on {}: {e}",
                plan.mountpoint.display()
            ));
        }
    };
    let control = match crate::control::serve(
        &plan.mountpoint,
        Arc::new(crate::service::Control {
            state: state.clone(),
        }),
    ) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("no control socket, so `s3mount status` cannot reach this mount: {e}");
            None
        }
    };
    // Whatever ends this process, the mount does not outlive it.
    let log_path = match target {
        Target::File(p) => Some(p.as_path()),
        _ => None,
    };
    let _watchdog = match mount.start_watchdog(log_path) {
        Ok(pipe) => Some(pipe),
        Err(e) => {
            tracing::warn!("no watchdog (a killed s3mount would leave a dead mount): {e}");
            None
        }
    };
    tracing::info!(source = %plan.source, mountpoint = %plan.mountpoint.display(),
        device = %mount.device, control = ?control.as_ref().map(|c| c.path().to_path_buf()),
        metrics = metrics_url.as_deref().unwrap_or("off"), "mounted");
    if plan.client.transport.no_verify_tls {
        tracing::warn!("{NO_VERIFY_WARNING}");
    }
    if let Auth::Chain(shared) = &plan.client.auth {
        let snap = shared.snapshot();
        tracing::info!(
            provider = %shared.provider_name(),
            access_key_id = %snap.credentials.access_key_id(),
            expires = %snap.expires.map_or_else(|| "never".to_string(), credentials::format_time),
            "credentials"
        );
        rt.spawn(shared.clone().keep_fresh());
    }
    raise_kernel_readahead(&mount.device);
    crate::service::handle_signals(state.clone(), logging, mount.clone());
    if let Some(listener) = metrics {
        crate::service::serve_metrics(listener, state.clone());
    }
    crate::service::log_periodically(state.clone(), plan.log_metrics);
    mounted(Ok(()));
    // Interrupted uploads (of an earlier s3mount, or failed closes) wait for a write to
    // resume them; those past the resume window are aborted while the mount serves, at once
    // and from time to time.
    let recovering = fs.clone();
    let every =
        (plan.fs.write.resume_window / 4).clamp(Duration::from_secs(1), Duration::from_secs(300));
    rt.spawn(async move {
        let mut first = true;
        loop {
            let recovered = recovering.recover_uploads().await;
            if recovered > 0 {
                tracing::info!(
                    recovered,
                    "cleaned up interrupted multipart uploads that were not resumed in time"
                );
            }
            let resumable = recovering.resumable_uploads().len();
            if first && resumable > 0 {
                tracing::info!(
                    resumable,
                    "interrupted uploads wait to be resumed (s3mount uploads lists them)"
                );
            }
            first = false;
            tokio::time::sleep(every).await;
        }
    });
    // Deferred attribute changes of closed files (chmod, utimens) go to S3 shortly after.
    fs.start_deferred_store(rt.handle());
    fs.start_memory_trim(rt.handle());
    fs.start_write_back(rt.handle());
    // Ends when the kernel lets go of the connection: an unmount, or after a detach, the
    // last open file closed.
    let result = session.run().or_else(|e| {
        // The kernel tears the connection down when the mount ends (an unmount, or after a
        // detach the last close); a read of /dev/fuse that meets that teardown fails with
        // ECONNABORTED rather than ENODEV, and fuser takes only ENODEV for the end.
        if e.raw_os_error() == Some(libc::ECONNABORTED) {
            tracing::info!("the kernel ended the FUSE connection ({e})");
            Ok(())
        } else {
            Err(e)
        }
    });
    // What is still deferred goes now, before the process ends.
    rt.block_on(fs.unmounting());
    crate::status::log_stats(&crate::status::snapshot(&state), false);
    drop(control);
    tracing::info!("unmounted");
    drop(entered);
    leave_runtime(rt);
    result.map_err(|e| StartError(format!("the FUSE session ended with an error: {e}")))
}

/// Ends the mount's runtime without shutting its timers down: the process ends right after
/// (whatever had to reach S3 was awaited by `unmounting`). Dropping the runtime would stop its
/// timer driver while a task may still run in a blocking section (`local_io`'s
/// `block_in_place`, which tokio cannot cancel); that task's next timer would then panic
/// ("the runtime is being shut down", seen once in CI after a failed close).
fn leave_runtime(rt: tokio::runtime::Runtime) {
    std::mem::forget(rt);
}

/// Raises the soft limit of open descriptors to the hard one (as Go programs do at start).
fn raise_open_file_limit() {
    // SAFETY: getrlimit/setrlimit with a valid struct for this process.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::debug!("could not raise the open file limit");
            }
        }
    }
}

/// The kernel sends FUSE reads no larger than the mount's readahead window, 128 KiB by default,
/// and fuser cannot ask for more at init. Each read costs a round trip through the kernel, so
/// raise the window to 1 MiB through the mount's backing-device entry in sysfs (root only;
/// without it reads still work, in smaller pieces).
fn raise_kernel_readahead(device: &str) {
    let path = format!("/sys/class/bdi/{device}/read_ahead_kb");
    match std::fs::write(&path, "1024") {
        Ok(()) => tracing::debug!(path, "kernel readahead raised to 1 MiB"),
        Err(e) => tracing::info!(
            path,
            "cannot raise the kernel readahead ({e}); reads go in 128 KiB pieces"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fusemount::parse_mountinfo;

    #[test]
    fn an_automount_trigger_is_not_a_taken_mount_point() {
        // x-systemd.automount: systemd's autofs mount is on top until s3mount mounts over it.
        let autofs = parse_mountinfo(
            "27 1 254:0 / / rw - ext4 /dev/vda rw\n\
             51 27 0:53 / /mnt/s3 rw,relatime - autofs systemd-1 rw,fd=48,pgrp=1,timeout=0\n",
        );
        assert_eq!(mount_taken(&autofs, Path::new("/mnt/s3")), None);
        let fuse = parse_mountinfo(
            "27 1 254:0 / / rw - ext4 /dev/vda rw\n\
             51 27 0:53 / /mnt/s3 rw,relatime - autofs systemd-1 rw,fd=48,pgrp=1,timeout=0\n\
             52 51 0:54 / /mnt/s3 rw,nosuid,nodev - fuse.s3mount b:p rw,user_id=0,group_id=0\n",
        );
        let taken = mount_taken(&fuse, Path::new("/mnt/s3")).expect("taken");
        assert_eq!(
            (taken.fstype.as_str(), taken.source.as_str()),
            ("fuse.s3mount", "b:p")
        );
        assert_eq!(mount_taken(&fuse, Path::new("/mnt")), None);
    }

    #[test]
    fn a_wrong_clock_is_named_as_such() {
        let cfg = ClientConfig::new("b", "us-east-1", Auth::Anonymous);
        let aws = ClientError::new(
            crate::s3::Operation::ListObjectsV2,
            "b",
            None,
            ErrorKind::from_code("RequestTimeTooSkewed"),
        )
        .with_status(403)
        .with_message("The difference between the request time and the current time is too large.");
        let garage = ClientError::new(
            crate::s3::Operation::ListObjectsV2,
            "b",
            None,
            ErrorKind::from_code("InvalidRequest"),
        )
        .with_status(400)
        .with_message("Bad request: Date is too old");
        for e in [aws, garage] {
            let text = explain(&e, &cfg);
            assert!(text.contains("clock is wrong"), "{text}");
            assert!(text.contains("timedatectl"), "{text}");
        }
    }

    #[test]
    fn state_and_logs_need_no_environment() {
        let root = |xdg: Option<&str>, home: Option<&str>, uid| {
            state_dir_for(
                xdg.map(PathBuf::from),
                home.map(PathBuf::from),
                uid,
                "/var/log/s3mount",
            )
        };
        assert_eq!(root(None, None, 0), PathBuf::from("/var/log/s3mount"));
        assert_eq!(root(None, None, 1000), PathBuf::from("/tmp/s3mount-1000"));
        assert_eq!(root(None, Some("/"), 0), PathBuf::from("/var/log/s3mount"));
        assert_eq!(
            root(None, Some("/home/u"), 1000),
            PathBuf::from("/home/u/.local/state/s3mount")
        );
        assert_eq!(
            root(Some("/x/state"), Some("/home/u"), 1000),
            PathBuf::from("/x/state/s3mount")
        );
        assert_eq!(
            root(Some("relative"), None, 0),
            PathBuf::from("/var/log/s3mount")
        );
    }

    #[test]
    fn every_mount_has_a_log_file_of_its_own() {
        assert_eq!(
            log_file_name("b", "data/x/", Path::new("/mnt/s3")),
            "b-data-x@mnt-s3.log"
        );
        assert_eq!(log_file_name("b", "", Path::new("/")), "b@-.log");
        assert_ne!(
            log_file_name("b", "", Path::new("/mnt/a")),
            log_file_name("b", "", Path::new("/mnt/b"))
        );
        let long = "d/".repeat(200);
        let a = log_file_name("b", &long, Path::new("/mnt/a"));
        let b = log_file_name("b", &long, Path::new("/mnt/b"));
        assert!(a.len() < 255 && a != b, "{a} {b}");
        assert_eq!(
            log_file_name("b", "sp ace", Path::new("/m")),
            "b-sp_ace@m.log"
        );
    }
}
