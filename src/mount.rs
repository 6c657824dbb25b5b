//! From a parsed command line to a running mount.
//!
//! Order matters: every check a user can fail (credentials found, endpoint reachable, bucket
//! exists and is readable with these keys, mount point usable, `fusermount3` installed) runs
//! first, in the foreground, and fails with one line that says what to fix. Only then does the
//! process go to the background: the parent forks, the child mounts and reports back through a
//! pipe, and the parent exits 0 only once the mount is really there (or prints the child's
//! error and exits 1). SIGINT and SIGTERM unmount cleanly; `umount` and `fusermount3 -u` end the
//! process too.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::cli::Cli;
use crate::fs::{FsConfig, S3Filesystem};
use crate::fuse::FuseAdapter;
use crate::s3::credentials::{self, Auth, Chain, Context, ProcessEnv};
use crate::s3::sts::StsEndpoint;
use crate::s3::transport::{self, TransportConfig};
use crate::s3::{
    Addressing, ClientConfig, ClientError, ErrorKind, ListRequest, ObjectClient, RetryPolicy,
    S3Client, ServerSideEncryption, WriteDefaults,
};

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
}

/// Resolves credentials (asking the chain's providers, which may mean STS, SSO, container or
/// instance metadata requests), region and endpoint, and checks the mount point.
pub fn plan(cli: Cli) -> Result<MountPlan, StartError> {
    // First what needs no network: the credential chain may take seconds (STS, IMDS).
    check_mountpoint(&cli.mountpoint)?;
    let env = ProcessEnv;
    let settings = credentials::settings(&env, cli.profile.as_deref());
    let transport = TransportConfig::from_options(
        &env,
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
            sts: StsEndpoint::from_env(&env, &sts_region),
        };
        let chain = Chain::build(&env, cli.profile.as_deref(), ctx)
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
    client.expected_bucket_owner = cli.expected_bucket_owner.clone();
    client.max_idle_connections = 128;
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
        file_mode: cli.file_mode,
        dir_mode: cli.dir_mode,
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
        },
        journal_dir: Some(journal_dir(
            &cli.bucket,
            cli.prefix.as_deref().unwrap_or(""),
        )),
    };
    Ok(MountPlan {
        source: format!("s3://{}/{}", cli.bucket, fs.prefix),
        client,
        fs,
        mountpoint: cli.mountpoint,
        allow_other: cli.allow_other,
        allow_root: cli.allow_root,
        foreground: cli.foreground,
        log_level: cli.log_level,
        log_file: cli.log_file,
    })
}

fn check_mountpoint(path: &Path) -> Result<(), StartError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fail(format!(
            "mount point {} does not exist; create it with mkdir first",
            path.display()
        )),
        Err(e) => fail(format!("cannot use mount point {}: {e}", path.display())),
        Ok(m) if !m.is_dir() => fail(format!("mount point {} is not a directory", path.display())),
        Ok(_) => {
            let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
            let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            let taken = mounts.lines().any(|l| {
                l.split(' ').nth(1).map(unescape_mount_path).as_deref()
                    == Some(canonical.to_string_lossy().as_ref())
                    && l.split(' ').nth(2).is_some_and(|t| t.starts_with("fuse"))
            });
            if taken {
                return fail(format!(
                    "{} is already a FUSE mount; unmount it first",
                    path.display()
                ));
            }
            if !fusermount_installed() {
                return fail(
                    "fusermount3 was not found: install the fuse3 package (apt-get install fuse3)",
                );
            }
            Ok(())
        }
    }
}

fn unescape_mount_path(p: &str) -> String {
    p.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn fusermount_installed() -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .any(|dir| dir.join("fusermount3").is_file() || dir.join("fusermount").is_file())
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

fn init_logging(level: &str, file: Option<&Path>) -> Result<(), StartError> {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| format!("warn,s3mount={level}"));
    let builder =
        tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(filter));
    match file {
        Some(path) => {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| StartError(format!("cannot open log file {}: {e}", path.display())))?;
            builder.with_ansi(false).with_writer(Arc::new(f)).init();
        }
        None => {
            // Colours only on a terminal: a redirected log stays plain text.
            use std::io::IsTerminal;
            builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .init()
        }
    }
    // A panic is a bug: say so in the log (in the background stderr goes nowhere), with where
    // it happened. The FUSE request it was serving is answered EIO by fuser.
    std::panic::set_hook(Box::new(|info| {
        let backtrace = std::backtrace::Backtrace::capture();
        tracing::error!("bug: {info}\n{backtrace}");
    }));
    Ok(())
}

fn state_dir() -> PathBuf {
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("s3mount")
}

fn default_log_file(bucket: &str) -> PathBuf {
    state_dir().join(format!("{bucket}.log"))
}

/// The upload journal of one bucket and prefix.
fn journal_dir(bucket: &str, prefix: &str) -> PathBuf {
    let tag = hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(prefix.as_bytes())[..8]);
    state_dir().join("uploads").join(format!("{bucket}-{tag}"))
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
    let plan = plan(cli)?;
    {
        // The checks use their own runtime, dropped before forking: a process must not fork
        // with runtime threads alive.
        let rt = runtime()?;
        rt.block_on(check_bucket(&plan.client, &plan.fs.prefix))?;
    }
    if plan.foreground {
        init_logging(&plan.log_level, plan.log_file.as_deref())?;
        return mount_and_serve(&plan, |_| {});
    }
    let log_file = plan
        .log_file
        .clone()
        .unwrap_or_else(|| default_log_file(&plan.client.bucket));
    daemonize(|report| {
        if let Err(e) = init_logging(&plan.log_level, Some(&log_file)) {
            report(Err(e.0.clone()));
            return Err(e);
        }
        mount_and_serve(&plan, report)
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

fn mount_and_serve(
    plan: &MountPlan,
    mut mounted: impl FnMut(Result<(), String>),
) -> Result<(), StartError> {
    let rt = runtime()?;
    let client =
        Arc::new(S3Client::new(plan.client.clone()).map_err(|e| StartError(e.to_string()))?);
    let fs = Arc::new(S3Filesystem::new(client.clone(), plan.fs.clone()));
    let adapter = FuseAdapter::new(fs.clone(), rt.handle().clone());

    let mut options = vec![
        fuser::MountOption::FSName(plan.source.clone()),
        fuser::MountOption::Subtype("s3mount".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    if plan.fs.read_only {
        options.push(fuser::MountOption::RO);
    }
    let mut config = fuser::Config::default();
    config.mount_options = options;
    config.acl = if plan.allow_other {
        fuser::SessionACL::All
    } else if plan.allow_root {
        fuser::SessionACL::RootAndOwner
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(2);
    config.clone_fd = true;

    let mut session = match fuser::Session::new(adapter, &plan.mountpoint, &config) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("cannot mount on {}: {e}", plan.mountpoint.display());
            mounted(Err(msg.clone()));
            return fail(msg);
        }
    };
    tracing::info!(source = %plan.source, mountpoint = %plan.mountpoint.display(), "mounted");
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
    raise_kernel_readahead(&plan.mountpoint);
    mounted(Ok(()));
    // Uploads an earlier s3mount left behind are cleaned up while the mount serves.
    let recovering = fs.clone();
    rt.spawn(async move {
        let recovered = recovering.recover_uploads().await;
        if recovered > 0 {
            tracing::info!(
                recovered,
                "cleaned up multipart uploads an earlier s3mount left unfinished"
            );
        }
    });

    let mut unmounter = session.unmount_callable();
    let mountpoint = plan.mountpoint.clone();
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!(mountpoint = %mountpoint.display(), "signal received, unmounting");
        if let Err(e) = unmounter.unmount() {
            tracing::error!("unmount failed: {e}");
        }
    });
    fs.start_deferred_store(rt.handle());
    let stats_fs = fs.clone();
    let stats_client = client.clone();
    rt.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.tick().await;
        loop {
            tick.tick().await;
            log_stats(&stats_fs, &stats_client);
        }
    });
    let result = session.run();
    rt.block_on(fs.unmounting());
    log_stats(&fs, &client);
    tracing::info!("unmounted");
    result.map_err(|e| StartError(format!("the FUSE session ended with an error: {e}")))
}

/// The kernel sends FUSE reads no larger than the mount's readahead window, 128 KiB by default,
/// and fuser cannot ask for more at init. Each read costs a round trip through the kernel, so
/// raise the window to 1 MiB through the mount's backing-device entry in sysfs (root only;
/// without it reads still work, in smaller pieces).
fn raise_kernel_readahead(mountpoint: &Path) {
    // The device number comes from mountinfo: stat() on the mount point would ask this very
    // process, whose session loop is not running yet.
    let Some(dev) = mount_device(mountpoint) else {
        tracing::info!("cannot find the mount in /proc/self/mountinfo; reads go in 128 KiB pieces");
        return;
    };
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&path, "1024") {
        Ok(()) => tracing::debug!(path, "kernel readahead raised to 1 MiB"),
        Err(e) => tracing::info!(
            path,
            "cannot raise the kernel readahead ({e}); reads go in 128 KiB pieces"
        ),
    }
}

/// `major:minor` of the mount at `mountpoint`, from the last matching line of mountinfo.
fn mount_device(mountpoint: &Path) -> Option<String> {
    let canonical = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let wanted = canonical.to_string_lossy();
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        (fields.len() > 4 && unescape_mount_path(fields[4]) == wanted)
            .then(|| fields[2].to_string())
    })
}

fn log_stats(fs: &S3Filesystem<S3Client>, client: &S3Client) {
    use std::sync::atomic::Ordering::Relaxed;
    let (f, c) = (fs.stats(), client.stats());
    tracing::info!(
        lookups = f.lookups.load(Relaxed),
        listings = f.listings.load(Relaxed),
        reads = f.reads.load(Relaxed),
        bytes_read = f.bytes_read.load(Relaxed),
        s3_requests = c.requests.load(Relaxed),
        s3_retries = c.retries.load(Relaxed),
        s3_bytes_received = c.bytes_received.load(Relaxed),
        s3_bytes_sent = c.bytes_sent.load(Relaxed),
        memory_in_use = fs.memory_in_use(),
        "stats"
    );
}
