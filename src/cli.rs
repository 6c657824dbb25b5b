//! The command line: clap arguments, `-o` options in mount(8) style, and their validation into
//! the settings the rest of the program uses. Every rejection is one line that says what to fix.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::fs::AtimeMode;
use crate::s3::ChecksumChoice;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "s3mount",
    version,
    about = "Mount an S3 bucket as a directory",
    after_help = "Credentials come from the AWS CLI's chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN, \
                  web identity (AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN), the profile of ~/.aws/credentials and \
                  ~/.aws/config (AWS_PROFILE or --profile: keys, role_arn, SSO, credential_process), container \
                  credentials (ECS, EKS Pod Identity), then the EC2 instance metadata service. Temporary credentials \
                  are renewed while mounted. See docs/CONFIGURATION.md. \
                  Unmount with `umount MOUNTPOINT` or `fusermount3 -u MOUNTPOINT`. \
                  Other commands: `s3mount status [MOUNTPOINT] [--watch] [--json]`, \
                  `s3mount presign PATH|s3://BUCKET/KEY [--expires 1h] [--method GET|PUT]`, \
                  `s3mount post-policy s3://BUCKET/PREFIX/ [--max-size SIZE] [--html]` \
                  (each with --help)."
)]
pub struct Cli {
    /// The bucket, optionally with a key prefix to mount instead of the whole bucket.
    #[arg(value_name = "BUCKET[:PREFIX]")]
    pub bucket: String,

    /// An existing empty directory to mount on.
    pub mountpoint: PathBuf,

    /// S3 endpoint, e.g. http://127.0.0.1:9000 (default: AWS, or AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,

    /// Region to sign for (default: AWS_REGION, AWS_DEFAULT_REGION, the profile's, or us-east-1).
    #[arg(long)]
    pub region: Option<String>,

    /// Profile of ~/.aws/credentials and ~/.aws/config.
    #[arg(long)]
    pub profile: Option<String>,

    /// Address the bucket as endpoint/bucket/key instead of bucket.endpoint/key.
    #[arg(long)]
    pub force_path_style: bool,

    /// Send unsigned requests (public buckets); no credentials are looked for.
    #[arg(long)]
    pub no_sign_request: bool,

    /// How the bucket is addressed: auto (virtual-hosted for AWS, path-style for other
    /// endpoints), path (endpoint/bucket/key) or virtual (bucket.endpoint/key).
    #[arg(long, value_parser = parse_addressing_style, value_name = "STYLE")]
    pub addressing_style: Option<String>,

    /// Also trust the CA certificates of this PEM file (for the endpoint, STS and SSO);
    /// default: AWS_CA_BUNDLE.
    #[arg(long, value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,

    /// Do not check TLS certificates at all (for tests only; warned about at every mount).
    #[arg(long)]
    pub no_verify_tls: bool,

    /// Send every request through this proxy: http://, https://, socks5:// or socks5h:// URL
    /// (default: HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, minus NO_PROXY).
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,

    /// Server-side encryption of new objects: AES256, aws:kms or aws:kms:dsse.
    #[arg(long, value_parser = parse_sse, value_name = "ALGORITHM")]
    pub sse: Option<String>,

    /// The KMS key for --sse aws:kms or aws:kms:dsse (key id, ARN or alias/NAME; default:
    /// the bucket's or AWS's managed key).
    #[arg(long, value_name = "KEY")]
    pub sse_kms_key_id: Option<String>,

    /// Storage class of new objects, e.g. STANDARD_IA or INTELLIGENT_TIERING.
    #[arg(long, value_parser = parse_storage_class, value_name = "CLASS")]
    pub storage_class: Option<String>,

    /// Canned ACL of new objects, e.g. bucket-owner-full-control.
    #[arg(long, value_parser = parse_acl, value_name = "ACL")]
    pub acl: Option<String>,

    /// Accept the charges of a requester-pays bucket (x-amz-request-payer on every request).
    #[arg(long)]
    pub requester_pays: bool,

    /// What protects uploaded data on its way: crc32c (x-amz-checksum-crc32c, about a quarter
    /// of SHA-256's CPU; used once a probe at mount sees the server refuse a wrong one, else
    /// sha256), sha256 (signed), off (TLS only), or auto: crc32c over HTTPS or to this
    /// machine, sha256 over plain HTTP elsewhere.
    #[arg(long, value_parser = parse_checksums, default_value = "auto", value_name = "MODE")]
    pub upload_checksums: ChecksumChoice,

    /// Refuse to work on the bucket unless this 12-digit account owns it.
    #[arg(long, value_parser = parse_account_id, value_name = "ACCOUNT_ID")]
    pub expected_bucket_owner: Option<String>,

    /// Mount only keys under this prefix (same as BUCKET:PREFIX).
    #[arg(long)]
    pub prefix: Option<String>,

    /// Refuse every change with EROFS.
    #[arg(long)]
    pub read_only: bool,

    /// Let other users access the mount (needs user_allow_other in /etc/fuse.conf for non-root).
    #[arg(long)]
    pub allow_other: bool,

    /// Let root access the mount.
    #[arg(long)]
    pub allow_root: bool,

    /// Owner shown for every entry (default: x-amz-meta-uid, else the mounting user).
    #[arg(long)]
    pub uid: Option<u32>,

    /// Group shown for every entry (default: x-amz-meta-gid, else the mounting user's group).
    #[arg(long)]
    pub gid: Option<u32>,

    /// Permission bits shown for every file, in octal (default: x-amz-meta-mode, else 644).
    #[arg(long, value_parser = parse_mode, value_name = "OCT")]
    pub file_mode: Option<u16>,

    /// Permission bits shown for every directory, in octal (default: x-amz-meta-mode, else
    /// 755).
    #[arg(long, value_parser = parse_mode, value_name = "OCT")]
    pub dir_mode: Option<u16>,

    /// Permission bits cleared from every file and directory, in octal (e.g. 027).
    #[arg(long, value_parser = parse_mode, value_name = "OCT")]
    pub umask: Option<u16>,

    /// The AWS shared credentials file (default: AWS_SHARED_CREDENTIALS_FILE, else
    /// ~/.aws/credentials).
    #[arg(long, value_name = "FILE")]
    pub credentials_file: Option<PathBuf>,

    /// The AWS config file (default: AWS_CONFIG_FILE, else ~/.aws/config).
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,

    /// How long attributes, listings and negative lookups are cached, in seconds (0: never).
    #[arg(long, value_parser = parse_seconds, default_value = "1", value_name = "SECONDS")]
    pub metadata_ttl: Duration,

    /// Memory for read-ahead, write buffers and the connections of GETs together, e.g. 256M or 1G.
    #[arg(long, value_parser = parse_size, default_value = "256M", value_name = "SIZE")]
    pub max_memory: u64,

    /// Objects up to this size that are read at random are fetched whole, in the background,
    /// into a local temporary file that serves their reads until closed (0: never).
    #[arg(long, value_parser = parse_size, default_value = "2G", value_name = "SIZE")]
    pub local_copy_max: u64,

    /// Size of the first 1,000 parts of an upload (later parts grow), e.g. 8M.
    #[arg(long, value_parser = parse_size, default_value = "8M", value_name = "SIZE")]
    pub part_size: u64,

    /// Part uploads in flight per file, at most: a file starts with 2 and grows by half while
    /// that makes its writes at least a fifth faster (a fast, distant server), so a near one
    /// costs two parts of memory, not eight.
    #[arg(long, default_value = "8", value_name = "N")]
    pub upload_concurrency: usize,

    /// Where files being written are spooled (default: $TMPDIR, else /tmp); needs room for
    /// the files open for writing at once.
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,

    /// How long an upload interrupted by a failed close, a kill or a crash is kept in S3 for
    /// a later write of the same file (from its first byte) to resume, sending only the parts
    /// that S3 does not have with the same bytes; afterwards it is aborted. 0 aborts at once.
    /// E.g. 90s, 30m, 24h, 7d.
    #[arg(long, value_parser = parse_duration, default_value = "24h", value_name = "DURATION")]
    pub resume_window: Duration,

    /// Durable write-back: close() returns once the file and its attributes are synced to
    /// local disk in --cache-dir; uploads follow in the background, retried through outages
    /// and resumed by the next mount after a crash. fsync() still waits for S3.
    #[arg(long)]
    pub write_back: bool,

    /// Where --write-back keeps files until S3 has them (default: the state directory's
    /// write-back/, e.g. ~/.local/state/s3mount/write-back). One mount per bucket and prefix
    /// may use it at a time.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// The most --write-back keeps waiting for S3; a close that would pass it waits for room
    /// (a larger file is stored before its close returns). Default: half the cache
    /// directory's free space at mount, at most 10G.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub write_back_max_size: Option<u64>,

    /// A persistent read cache in DIR: blocks of objects read through the mount are kept on
    /// local disk, checked against the object's ETag, and serve later reads (also after a
    /// remount) without a GET. One mount per bucket and prefix may use a DIR at a time.
    #[arg(long = "cache", value_name = "DIR")]
    pub read_cache: Option<PathBuf>,

    /// The most the read cache (--cache) keeps; least recently used objects go first.
    /// Default: a quarter of DIR's free space at mount.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub max_cache_size: Option<u64>,

    /// Objects held whole in the read cache (--cache) are read by the kernel straight from
    /// the cache's file (FUSE passthrough; Linux 6.9+, as root): near the local disk's speed.
    /// While such a reader has a file open, opening it for writing fails with ETXTBSY, and a
    /// newer version of it cannot be opened (EBUSY) until those readers close.
    #[arg(long)]
    pub cache_passthrough: bool,

    /// How long --write-back waits after a file's last close before it uploads the file
    /// (default 2s): a burst of writes is not slowed by its own uploads, and a file renamed
    /// or written again meanwhile (rsync's temporary names, editors' saves) is sent once.
    /// 0 uploads at once. fsync() never waits for it.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub write_back_delay: Option<Duration>,

    /// When reads move atime: relatime (when atime is older than mtime or ctime, or a day
    /// old), strictatime (every open for reading) or noatime (never). Also `-o relatime`,
    /// `-o strictatime` (`-o atime`), `-o noatime`.
    #[arg(long, value_parser = parse_atime, default_value = "relatime", value_name = "MODE")]
    pub atime: AtimeMode,

    /// Content-Type of new files from their extension: a mime.types FILE instead of the
    /// built-in table, or `off` for none.
    #[arg(long, value_name = "FILE|off")]
    pub content_type_map: Option<PathBuf>,

    /// Attempts per S3 request before its error is returned (the first included).
    #[arg(long, default_value = "10", value_name = "N")]
    pub retry_attempts: u32,

    /// No retry of a request starts later than this after its first attempt, in seconds.
    #[arg(long, value_parser = parse_seconds, default_value = "30", value_name = "SECONDS")]
    pub retry_max_time: Duration,

    /// Longest wait for a connection to the endpoint, in seconds.
    #[arg(long, value_parser = parse_seconds, default_value = "5", value_name = "SECONDS")]
    pub connect_timeout: Duration,

    /// Longest wait for the answer to a request once it is sent, in seconds (server-side
    /// copies get 12 times as long).
    #[arg(long, value_parser = parse_seconds, default_value = "10", value_name = "SECONDS")]
    pub request_timeout: Duration,

    /// Longest time a request or response body may make no progress, in seconds; the request
    /// is then retried (a GET resumes where its body stopped).
    #[arg(long, value_parser = parse_seconds, default_value = "5", value_name = "SECONDS")]
    pub stall_timeout: Duration,

    /// Stay in the foreground (logs go to stderr).
    #[arg(short, long)]
    pub foreground: bool,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info")]
    pub log_level: String,

    /// Same as --log-level debug.
    #[arg(long)]
    pub debug: bool,

    /// Where logs go when in the background (default: one file per mount,
    /// BUCKET[-PREFIX]@MOUNTPOINT.log in $XDG_STATE_HOME/s3mount or ~/.local/state/s3mount;
    /// /var/log/s3mount for root without HOME).
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// Send logs to syslog (journald reads it too) through this socket instead of a file.
    #[arg(long, value_name = "SOCKET", num_args = 0..=1, require_equals = true,
          default_missing_value = "/dev/log")]
    pub log_syslog: Option<PathBuf>,

    /// Log a one-line summary with rates every SECONDS (default 10).
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds, num_args = 0..=1,
          require_equals = true, default_missing_value = "10")]
    pub log_metrics: Option<Duration>,

    /// Serve the status counters in the Prometheus text format at http://ADDR:PORT/metrics
    /// (off by default; give a loopback address unless the network may read them).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Do not execute programs stored in the mount.
    #[arg(long)]
    pub noexec: bool,

    /// Say what is being mounted, and how.
    #[arg(short = 'v', long)]
    pub verbose: bool,

    /// Mount helper: unknown -o options are warned about, not refused (mount -s).
    #[arg(short = 's', long, hide = true)]
    pub sloppy: bool,

    /// Mount helper: do everything but mount (mount -f; a helper's -f is this, not
    /// --foreground).
    #[arg(long, hide = true)]
    pub fake: bool,

    /// Mount helper: mount -n (no /etc/mtab entry); s3mount never writes one anyway.
    #[arg(short = 'n', hide = true)]
    pub no_mtab: bool,

    /// Mount helper: the filesystem type mount(8) names (fuse.s3mount, s3mount).
    #[arg(short = 't', hide = true, value_name = "TYPE")]
    pub fs_type: Option<String>,

    /// The source as given (`bucket:prefix`), which /proc/mounts shows; set by `resolve`.
    #[arg(skip)]
    pub source: Option<String>,

    /// Mount options, comma-separated, as mount(8) passes them: every long option above as
    /// name=value (underscores for dashes: endpoint_url=URL, part_size=16M, log_file=PATH) or
    /// name for a flag (allow_other, no_sign_request), plus ro, rw, umask=OCT,
    /// credentials_file=FILE, config_file=FILE. Options mount(8), fstab and systemd use
    /// (_netdev, nofail, noauto, user, users, x-systemd.*, ...) are accepted.
    #[arg(short = 'o', value_name = "OPTIONS", action = clap::ArgAction::Append)]
    pub options: Vec<String>,
}

/// `s3mount status [MOUNTPOINT]`
#[derive(Debug, Clone, Parser)]
#[command(
    name = "s3mount status",
    about = "Show what each s3mount mount on this machine is doing: uploads and reads in flight, \
             totals since it mounted, memory and disk use",
    after_help = "Each mount answers on its own control socket (in /run/s3mount for root, \
                  /run/user/UID/s3mount or /tmp/s3mount-UID for others), which only its owner \
                  and root may use. See docs/OPERATIONS.md for every field."
)]
pub struct StatusCli {
    /// Only this mount (default: every s3mount mount this user may ask).
    pub mountpoint: Option<PathBuf>,

    /// Redraw once a second until interrupted.
    #[arg(long)]
    pub watch: bool,

    /// Print the report as JSON: one object for MOUNTPOINT, else {"mounts": [...]}.
    #[arg(long)]
    pub json: bool,
}

/// `s3mount uploads [MOUNTPOINT] [--abort PATH | --abort-all]`
#[derive(Debug, Clone, Parser)]
#[command(
    name = "s3mount uploads",
    about = "List the interrupted uploads of each s3mount mount that a write of the same file \
             would resume (a failed close, a killed or crashed mount), or abort them",
    after_help = "An interrupted upload is kept in S3 for --resume-window (default 24h) after \
                  it stopped; writing the file again from its first byte (cp, rsync --inplace, \
                  dd) sends only what S3 does not have. See docs/SEMANTICS.md."
)]
pub struct UploadsCli {
    /// Only this mount (default: every s3mount mount this user may ask).
    pub mountpoint: Option<PathBuf>,

    /// Abort the resumable upload of this path inside the mount (e.g. /dir/big.iso); needs
    /// MOUNTPOINT.
    #[arg(long, value_name = "PATH", requires = "mountpoint")]
    pub abort: Option<String>,

    /// Abort every resumable upload.
    #[arg(long, conflicts_with = "abort")]
    pub abort_all: bool,

    /// Print the list as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How `presign` and `post-policy` reach a bucket given as `s3://`: the same as a mount's
/// options.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// S3 endpoint, e.g. http://127.0.0.1:9000 (default: AWS, or AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,

    /// Region to sign for.
    #[arg(long)]
    pub region: Option<String>,

    /// Profile of ~/.aws/credentials and ~/.aws/config.
    #[arg(long)]
    pub profile: Option<String>,

    /// The AWS shared credentials file.
    #[arg(long, value_name = "FILE")]
    pub credentials_file: Option<PathBuf>,

    /// The AWS config file.
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,

    /// auto, path or virtual.
    #[arg(long, value_parser = parse_addressing_style, value_name = "STYLE")]
    pub addressing_style: Option<String>,

    /// Same as --addressing-style path.
    #[arg(long)]
    pub force_path_style: bool,

    /// Also trust the CA certificates of this PEM file.
    #[arg(long, value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,

    /// Send the credential requests (STS, SSO, ...) through this proxy.
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,

    /// Sign for this URL instead of the endpoint (a bucket served under another domain).
    #[arg(long, value_name = "URL")]
    pub public_endpoint: Option<String>,
}

impl ConnectionArgs {
    /// Whether any option was given (they do not apply to a path inside a mount).
    pub fn any(&self) -> bool {
        self.endpoint_url.is_some()
            || self.region.is_some()
            || self.profile.is_some()
            || self.credentials_file.is_some()
            || self.config_file.is_some()
            || self.addressing_style.is_some()
            || self.force_path_style
            || self.ca_bundle.is_some()
            || self.proxy.is_some()
    }
}

/// `s3mount presign PATH|s3://BUCKET/KEY`
#[derive(Debug, Clone, Parser)]
#[command(
    name = "s3mount presign",
    about = "Print a presigned URL for one object: anyone holding it may make that one request \
             until it expires",
    after_help = "PATH is a file inside an s3mount mount: the mount signs with its own bucket, \
                  endpoint and credentials. s3://BUCKET/KEY is signed with credentials found as a \
                  mount finds them (the same options and variables). Temporary credentials put \
                  their session token in the URL, and the URL stops working when they expire."
)]
pub struct PresignCli {
    /// A file inside a mount, or s3://BUCKET/KEY.
    #[arg(value_name = "PATH|s3://BUCKET/KEY")]
    pub target: String,

    /// How long the URL works: 90s, 30m, 1h, 7d (at most 7 days).
    #[arg(long, value_parser = parse_duration, default_value = "1h", value_name = "DURATION")]
    pub expires: Duration,

    /// The request the URL allows: GET (download) or PUT (upload), also HEAD or DELETE.
    #[arg(long, default_value = "GET")]
    pub method: String,

    #[command(flatten)]
    pub connection: ConnectionArgs,
}

/// `s3mount post-policy s3://BUCKET/PREFIX/`
#[derive(Debug, Clone, Parser)]
#[command(
    name = "s3mount post-policy",
    about = "Print the fields of a browser upload form (an S3 POST policy) for keys under a \
             prefix, as JSON, or as a ready HTML page with --html",
    after_help = "The form's key is PREFIX${filename}: the uploaded file's own name under the \
                  prefix. S3 refuses uploads outside the prefix, over --max-size, of another \
                  --content-type, or after --expires."
)]
pub struct PostPolicyCli {
    /// s3://BUCKET/PREFIX/, or a directory inside a mount.
    #[arg(value_name = "s3://BUCKET/PREFIX/|DIR")]
    pub target: String,

    /// How long the form works: 90s, 30m, 1h, 7d.
    #[arg(long, value_parser = parse_duration, default_value = "1h", value_name = "DURATION")]
    pub expires: Duration,

    /// Largest file the form accepts, e.g. 10M.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub max_size: Option<u64>,

    /// The uploaded file's Content-Type must start with this, e.g. image/.
    #[arg(long, value_name = "PREFIX")]
    pub content_type: Option<String>,

    /// Canned ACL the uploaded object gets, e.g. private.
    #[arg(long, value_parser = parse_acl)]
    pub acl: Option<String>,

    /// Print an HTML page with the form instead of JSON.
    #[arg(long)]
    pub html: bool,

    #[command(flatten)]
    pub connection: ConnectionArgs,
}

pub fn parse_count(name: &str, s: &str) -> Result<usize, String> {
    s.parse().map_err(|_| format!("{name}={s} is not a number"))
}

pub fn parse_socket_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not an address like 127.0.0.1:9100"))
}

/// `90`, `90s`, `30m`, `1h`, `7d`: a duration for presigned URLs and policies.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 1h or 7d"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?} is not a duration like 90s, 30m, 1h or 7d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

pub fn parse_mode(s: &str) -> Result<u16, String> {
    u16::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?} is not an octal mode like 644"))
}

pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a number of seconds"))
}

pub fn parse_addressing_style(s: &str) -> Result<String, String> {
    match s {
        "auto" | "path" | "virtual" => Ok(s.to_string()),
        _ => Err(format!(
            "{s:?} is not an addressing style: use auto, path or virtual"
        )),
    }
}

pub fn parse_sse(s: &str) -> Result<String, String> {
    match s {
        "AES256" | "aws:kms" | "aws:kms:dsse" => Ok(s.to_string()),
        _ => Err(format!(
            "{s:?} is not an encryption: use AES256, aws:kms or aws:kms:dsse"
        )),
    }
}

const STORAGE_CLASSES: &[&str] = &[
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER",
    "DEEP_ARCHIVE",
    "GLACIER_IR",
    "OUTPOSTS",
    "SNOW",
    "EXPRESS_ONEZONE",
];

pub fn parse_checksums(s: &str) -> Result<ChecksumChoice, String> {
    ChecksumChoice::parse(s)
        .ok_or_else(|| format!("{s:?} is not a checksum mode: use auto, crc32c, sha256 or off"))
}

pub fn parse_storage_class(s: &str) -> Result<String, String> {
    if STORAGE_CLASSES.contains(&s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a storage class: use one of {}",
            STORAGE_CLASSES.join(", ")
        ))
    }
}

const CANNED_ACLS: &[&str] = &[
    "private",
    "public-read",
    "public-read-write",
    "authenticated-read",
    "aws-exec-read",
    "bucket-owner-read",
    "bucket-owner-full-control",
];

pub fn parse_acl(s: &str) -> Result<String, String> {
    if CANNED_ACLS.contains(&s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a canned ACL: use one of {}",
            CANNED_ACLS.join(", ")
        ))
    }
}

pub fn parse_account_id(s: &str) -> Result<String, String> {
    if s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit()) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not an AWS account id (12 digits)"))
    }
}

/// `1048576`, `512K`, `256M`, `1G`, `2GiB`, `64MB`: binary units throughout.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 256M"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("{s:?} has an unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `relatime`, `strictatime` (or `atime`), `noatime`: mount(8)'s names.
pub fn parse_atime(s: &str) -> Result<AtimeMode, String> {
    match s {
        "relatime" => Ok(AtimeMode::Relatime),
        "strictatime" | "atime" => Ok(AtimeMode::Strict),
        "noatime" => Ok(AtimeMode::Off),
        _ => Err(format!(
            "{s:?} is not an atime mode (relatime, strictatime or noatime)"
        )),
    }
}

impl Cli {
    /// Folds `-o` options and `BUCKET:PREFIX` into the fields. Options that mount(8) and
    /// fstab pass for every filesystem (`dev`, `exec`, `_netdev`, ...) are accepted and ignored.
    pub fn resolve(mut self) -> Result<Self, String> {
        self.source = Some(self.bucket.clone());
        for group in std::mem::take(&mut self.options) {
            for opt in group.split(',').filter(|o| !o.is_empty()) {
                let (name, value) = match opt.split_once('=') {
                    Some((n, v)) => (n, Some(v)),
                    None => (opt, None),
                };
                let need = || {
                    value.ok_or_else(|| format!("mount option {name} needs a value ({name}=...)"))
                };
                match name {
                    "ro" => self.read_only = true,
                    "rw" => self.read_only = false,
                    "allow_other" => self.allow_other = true,
                    "allow_root" => self.allow_root = true,
                    "force_path_style" => self.force_path_style = true,
                    "foreground" => self.foreground = true,
                    "uid" => {
                        self.uid = Some(need()?.parse().map_err(|_| {
                            format!("uid={} is not a number", need().unwrap_or_default())
                        })?)
                    }
                    "gid" => {
                        self.gid = Some(need()?.parse().map_err(|_| {
                            format!("gid={} is not a number", need().unwrap_or_default())
                        })?)
                    }
                    "file_mode" => self.file_mode = Some(parse_mode(need()?)?),
                    "dir_mode" => self.dir_mode = Some(parse_mode(need()?)?),
                    "endpoint_url" | "endpoint" => self.endpoint_url = Some(need()?.to_string()),
                    "region" => self.region = Some(need()?.to_string()),
                    "profile" => self.profile = Some(need()?.to_string()),
                    "prefix" => self.prefix = Some(need()?.to_string()),
                    "metadata_ttl" => self.metadata_ttl = parse_seconds(need()?)?,
                    "max_memory" => self.max_memory = parse_size(need()?)?,
                    "retry_attempts" | "retries" => {
                        self.retry_attempts = need()?.parse().map_err(|_| {
                            format!("{name}={} is not a number", need().unwrap_or_default())
                        })?
                    }
                    "retry_max_time" => self.retry_max_time = parse_seconds(need()?)?,
                    "connect_timeout" => self.connect_timeout = parse_seconds(need()?)?,
                    "request_timeout" => self.request_timeout = parse_seconds(need()?)?,
                    "stall_timeout" => self.stall_timeout = parse_seconds(need()?)?,
                    "spool_dir" => self.spool_dir = Some(PathBuf::from(need()?)),
                    "resume_window" => self.resume_window = parse_duration(need()?)?,
                    "write_back" => self.write_back = true,
                    "cache_dir" => self.cache_dir = Some(PathBuf::from(need()?)),
                    "write_back_max_size" => self.write_back_max_size = Some(parse_size(need()?)?),
                    "write_back_delay" => self.write_back_delay = Some(parse_duration(need()?)?),
                    "cache" => self.read_cache = Some(PathBuf::from(need()?)),
                    "max_cache_size" => self.max_cache_size = Some(parse_size(need()?)?),
                    "cache_passthrough" => self.cache_passthrough = true,
                    // mount(8)'s own names, or atime=MODE as --atime takes it.
                    "atime" | "strictatime" | "relatime" | "noatime" => {
                        self.atime = parse_atime(value.unwrap_or(name))?
                    }
                    "content_type_map" => self.content_type_map = Some(PathBuf::from(need()?)),
                    "addressing_style" => {
                        self.addressing_style = Some(parse_addressing_style(need()?)?)
                    }
                    "ca_bundle" => self.ca_bundle = Some(PathBuf::from(need()?)),
                    "no_verify_tls" => self.no_verify_tls = true,
                    "proxy" => self.proxy = Some(need()?.to_string()),
                    "sse" => self.sse = Some(parse_sse(need()?)?),
                    "sse_kms_key_id" => self.sse_kms_key_id = Some(need()?.to_string()),
                    "storage_class" => self.storage_class = Some(parse_storage_class(need()?)?),
                    "acl" => self.acl = Some(parse_acl(need()?)?),
                    "requester_pays" => self.requester_pays = true,
                    "upload_checksums" => self.upload_checksums = parse_checksums(need()?)?,
                    "expected_bucket_owner" => {
                        self.expected_bucket_owner = Some(parse_account_id(need()?)?)
                    }
                    "read_only" => self.read_only = true,
                    "no_sign_request" => self.no_sign_request = true,
                    "umask" => self.umask = Some(parse_mode(need()?)?),
                    "credentials_file" => self.credentials_file = Some(PathBuf::from(need()?)),
                    "config_file" => self.config_file = Some(PathBuf::from(need()?)),
                    "local_copy_max" => self.local_copy_max = parse_size(need()?)?,
                    "part_size" => self.part_size = parse_size(need()?)?,
                    "upload_concurrency" => self.upload_concurrency = parse_count(name, need()?)?,
                    "log_level" => self.log_level = need()?.to_string(),
                    "debug" => self.debug = true,
                    "log_file" => self.log_file = Some(PathBuf::from(need()?)),
                    "log_syslog" => {
                        self.log_syslog = Some(PathBuf::from(value.unwrap_or("/dev/log")))
                    }
                    "log_metrics" => self.log_metrics = Some(parse_seconds(value.unwrap_or("10"))?),
                    "metrics_addr" => self.metrics_addr = Some(parse_socket_addr(need()?)?),
                    "verbose" => self.verbose = true,
                    "exec" => self.noexec = false,
                    "noexec" => self.noexec = true,
                    // What mount(8), fstab and systemd use for every filesystem, and what FUSE
                    // mounts always are (nodev, nosuid): nothing for s3mount to do.
                    "dev" | "nodev" | "suid" | "nosuid" | "auto" | "noauto" | "user" | "nouser"
                    | "users" | "owner" | "group" | "_netdev" | "nofail" | "defaults"
                    | "norelatime" | "nostrictatime" | "lazytime" | "nolazytime" | "diratime"
                    | "nodiratime" | "async" | "sync" | "dirsync" | "silent" | "loud"
                    | "comment" => {}
                    _ if name.starts_with("x-") => {}
                    other if self.sloppy => {
                        eprintln!("s3mount: warning: ignoring unknown mount option {other:?} (-s)")
                    }
                    other => {
                        return Err(format!(
                            "unknown mount option {other:?} (see s3mount --help)"
                        ))
                    }
                }
            }
        }
        if let Some(rest) = self.bucket.clone().strip_prefix("s3://") {
            // s3://bucket/prefix is the same as bucket:prefix.
            self.bucket = match rest.split_once('/') {
                Some((bucket, prefix)) if !prefix.is_empty() => format!("{bucket}:{prefix}"),
                Some((bucket, _)) => bucket.to_string(),
                None => rest.to_string(),
            };
        }
        if let Some((bucket, prefix)) = self.bucket.clone().split_once(':') {
            if self.prefix.is_some() {
                return Err(
                    "give the prefix either as BUCKET:PREFIX or with --prefix, not both".into(),
                );
            }
            self.bucket = bucket.to_string();
            self.prefix = Some(prefix.to_string());
        }
        if let Some(p) = &mut self.prefix {
            let trimmed = p.trim_start_matches('/').to_string();
            *p = if trimmed.is_empty() || trimmed.ends_with('/') {
                trimmed
            } else {
                format!("{trimmed}/")
            };
        }
        if self.debug {
            self.log_level = "debug".into();
        }
        if self.part_size < 5 << 20 || self.part_size > 5 << 30 {
            return Err("--part-size must be between 5M and 5G (S3's limits for a part)".into());
        }
        if !self.write_back
            && (self.cache_dir.is_some()
                || self.write_back_max_size.is_some()
                || self.write_back_delay.is_some())
        {
            return Err(
                "--cache-dir, --write-back-max-size and --write-back-delay are \
                        settings of --write-back; add it"
                    .into(),
            );
        }
        if (self.max_cache_size.is_some() || self.cache_passthrough) && self.read_cache.is_none() {
            return Err(
                "--max-cache-size and --cache-passthrough are settings of --cache DIR; add it"
                    .into(),
            );
        }
        if self.max_cache_size == Some(0) {
            return Err(
                "--max-cache-size must be more than 0 (leave out --cache for no cache)".into(),
            );
        }
        if self.write_back && self.read_only {
            return Err("--write-back on a read-only mount has nothing to write".into());
        }
        if self.write_back_max_size == Some(0) {
            return Err("--write-back-max-size must be more than 0".into());
        }
        if self.upload_concurrency == 0 || self.retry_attempts == 0 {
            return Err("--upload-concurrency and --retry-attempts must be at least 1".into());
        }
        for (name, value) in [
            ("--connect-timeout", self.connect_timeout),
            ("--request-timeout", self.request_timeout),
            ("--stall-timeout", self.stall_timeout),
        ] {
            if value < Duration::from_millis(100) {
                return Err(format!("{name} must be at least 0.1 seconds"));
            }
        }
        if self.force_path_style
            && self
                .addressing_style
                .as_deref()
                .is_some_and(|s| s != "path")
        {
            return Err("--force-path-style contradicts --addressing-style; give only one".into());
        }
        if self.sse_kms_key_id.is_some()
            && !self
                .sse
                .as_deref()
                .is_some_and(|s| s.starts_with("aws:kms"))
        {
            return Err("--sse-kms-key-id needs --sse aws:kms or --sse aws:kms:dsse".into());
        }
        if self.bucket.is_empty() {
            return Err("the bucket name is empty; give BUCKET[:PREFIX]".into());
        }
        if self.allow_other && self.allow_root {
            return Err("--allow-other already includes root; give only one of --allow-other and --allow-root".into());
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Result<Cli, String> {
        let mut full = vec!["s3mount"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full)
            .map_err(|e| e.to_string())?
            .resolve()
    }

    #[test]
    fn bucket_prefix_and_options() {
        let c = cli(&[
            "b:data/x",
            "/mnt",
            "-o",
            "ro,uid=5,file_mode=600,max_memory=1G,_netdev",
            "-o",
            "metadata_ttl=0.5",
        ])
        .unwrap();
        assert_eq!(c.bucket, "b");
        assert_eq!(c.prefix.as_deref(), Some("data/x/"));
        assert!(c.read_only);
        assert_eq!(c.uid, Some(5));
        assert_eq!(c.file_mode, Some(0o600));
        assert_eq!(c.max_memory, 1 << 30);
        assert_eq!(c.metadata_ttl, Duration::from_millis(500));
    }

    #[test]
    fn bad_values_are_one_line_errors() {
        assert!(cli(&["b", "/m", "-o", "bogus"])
            .unwrap_err()
            .contains("unknown mount option"));
        assert!(cli(&["b", "/m", "-o", "uid"])
            .unwrap_err()
            .contains("needs a value"));
        assert!(cli(&["b:p", "/m", "--prefix", "q"])
            .unwrap_err()
            .contains("not both"));
        assert!(cli(&["b", "/m", "--file-mode", "999"]).is_err());
        assert!(cli(&["b", "/m", "--max-memory", "12Q"]).is_err());
    }

    #[test]
    fn production_and_transport_options() {
        let c = cli(&[
            "b",
            "/m",
            "-o",
            "sse=aws:kms,sse_kms_key_id=alias/k,storage_class=STANDARD_IA,acl=bucket-owner-full-control",
            "-o",
            "requester_pays,expected_bucket_owner=123456789012,addressing_style=virtual",
            "-o",
            "ca_bundle=/etc/ca.pem,proxy=socks5h://127.0.0.1:1080,no_verify_tls",
        ])
        .unwrap();
        assert_eq!(c.sse.as_deref(), Some("aws:kms"));
        assert_eq!(c.sse_kms_key_id.as_deref(), Some("alias/k"));
        assert_eq!(c.storage_class.as_deref(), Some("STANDARD_IA"));
        assert_eq!(c.acl.as_deref(), Some("bucket-owner-full-control"));
        assert!(c.requester_pays && c.no_verify_tls);
        assert_eq!(c.expected_bucket_owner.as_deref(), Some("123456789012"));
        assert_eq!(c.addressing_style.as_deref(), Some("virtual"));
        assert_eq!(c.ca_bundle, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(c.proxy.as_deref(), Some("socks5h://127.0.0.1:1080"));
        let flags = cli(&[
            "b",
            "/m",
            "--sse",
            "AES256",
            "--acl",
            "private",
            "--addressing-style",
            "path",
        ])
        .unwrap();
        assert_eq!(flags.sse.as_deref(), Some("AES256"));

        for (args, want) in [
            (vec!["--sse", "aes"], "AES256, aws:kms or aws:kms:dsse"),
            (vec!["--sse-kms-key-id", "k"], "needs --sse aws:kms"),
            (
                vec!["--sse", "AES256", "--sse-kms-key-id", "k"],
                "needs --sse aws:kms",
            ),
            (vec!["--storage-class", "COLD"], "not a storage class"),
            (vec!["--acl", "everyone"], "not a canned ACL"),
            (vec!["--expected-bucket-owner", "12"], "12 digits"),
            (vec!["--addressing-style", "dns"], "auto, path or virtual"),
            (
                vec!["--force-path-style", "--addressing-style", "virtual"],
                "contradicts",
            ),
        ] {
            let mut full = vec!["b", "/m"];
            full.extend(args.iter());
            let e = cli(&full).unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
        }
        assert!(cli(&["b", "/m", "-o", "sse=none"])
            .unwrap_err()
            .contains("AES256"));
    }

    /// A value the option accepts, by its value name.
    fn sample(arg: &clap::Arg) -> &'static str {
        let name = arg
            .get_value_names()
            .and_then(|v| v.first().map(|s| s.to_string()))
            .unwrap_or_default();
        match (arg.get_id().as_str(), name.as_str()) {
            ("log_level", _) => "debug",
            ("region", _) | ("profile", _) | ("prefix", _) => "p1",
            (_, "SECONDS") => "7",
            (_, "SIZE") => "16M",
            (_, "N") => "3",
            (_, "OCT") => "640",
            (_, "URL") => "http://127.0.0.1:9",
            (_, "FILE") | (_, "PATH") | (_, "DIR") | (_, "SOCKET") => "/tmp/x",
            (_, "STYLE") => "path",
            (_, "ALGORITHM") => "aws:kms",
            (_, "KEY") => "alias/k",
            (_, "CLASS") => "STANDARD_IA",
            (_, "ACL") => "private",
            (_, "ACCOUNT_ID") => "123456789012",
            (_, "ADDR:PORT") => "127.0.0.1:9100",
            (_, "TYPE") => "fuse.s3mount",
            ("atime", _) => "noatime",
            ("content_type_map", _) => "off",
            ("upload_checksums", _) => "crc32c",
            _ => "7",
        }
    }

    #[test]
    fn every_option_has_an_o_form_that_means_the_same() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let mut checked = 0;
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version" | "fake" | "sloppy") || arg.is_hide_set() {
                continue;
            }
            let flag = matches!(arg.get_action(), clap::ArgAction::SetTrue);
            let o_name = long.replace('-', "_");
            let (long_form, o_form) = if flag {
                (vec![format!("--{long}")], o_name)
            } else {
                let v = sample(arg);
                (vec![format!("--{long}={v}")], format!("{o_name}={v}"))
            };
            // sse_kms_key_id needs an sse, the cache settings write-back, the read cache's
            // size the read cache; give both forms the same.
            let extra = match long {
                "sse-kms-key-id" => vec!["--sse".to_string(), "aws:kms".to_string()],
                "max-cache-size" | "cache-passthrough" => {
                    vec!["--cache".to_string(), "/c".to_string()]
                }
                "cache-dir" | "write-back-max-size" | "write-back-delay" => {
                    vec!["--write-back".to_string()]
                }
                _ => vec![],
            };
            let mut a: Vec<String> = vec!["b".into(), "/m".into()];
            a.extend(extra.clone());
            a.extend(long_form);
            let mut b: Vec<String> = vec!["b".into(), "/m".into()];
            b.extend(extra);
            b.extend(["-o".to_string(), o_form.clone()]);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            let b: Vec<&str> = b.iter().map(String::as_str).collect();
            let by_flag = cli(&a).unwrap_or_else(|e| panic!("--{long}: {e}"));
            let by_o = cli(&b).unwrap_or_else(|e| panic!("-o {o_form}: {e}"));
            assert_eq!(
                format!("{by_flag:?}"),
                format!("{by_o:?}"),
                "-o {o_form} differs from --{long}"
            );
            checked += 1;
        }
        assert!(checked >= 45, "only {checked} options checked");
    }

    #[test]
    fn fstab_and_systemd_options_are_accepted() {
        let c = cli(&[
            "b:p",
            "/m",
            "-o",
            "_netdev,nofail,noauto,user,users,defaults,x-systemd.automount,x-systemd.idle-timeout=60,x-systemd.requires=network-online.target,comment=systemd.automount,noexec,umask=027,credentials_file=/etc/s3/creds,config_file=/etc/s3/config",
        ])
        .unwrap();
        assert!(c.noexec);
        assert_eq!(c.umask, Some(0o027));
        assert_eq!(c.credentials_file, Some(PathBuf::from("/etc/s3/creds")));
        assert_eq!(c.config_file, Some(PathBuf::from("/etc/s3/config")));
        assert_eq!(c.source.as_deref(), Some("b:p"));
        let s3 = cli(&["s3://bkt/some/prefix", "/m"]).unwrap();
        assert_eq!(
            (s3.bucket.as_str(), s3.prefix.as_deref()),
            ("bkt", Some("some/prefix/"))
        );
        assert!(cli(&["b", "/m", "-o", "x_systemd"])
            .unwrap_err()
            .contains("unknown mount option"));
        assert!(cli(&["b", "/m", "-s", "-o", "whatever"]).is_ok());
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("1w").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("100"), Ok(100));
    }
}
