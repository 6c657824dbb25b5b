//! The command line: clap arguments, `-o` options in mount(8) style, and their validation into
//! the settings the rest of the program uses. Every rejection is one line that says what to fix.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

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
                  Unmount with `umount MOUNTPOINT` or `fusermount3 -u MOUNTPOINT`."
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

    /// Owner of files without s3fs-style x-amz-meta-uid (default: the mounting user).
    #[arg(long)]
    pub uid: Option<u32>,

    /// Group of files without x-amz-meta-gid (default: the mounting user's group).
    #[arg(long)]
    pub gid: Option<u32>,

    /// Permission bits of files without x-amz-meta-mode, in octal.
    #[arg(long, value_parser = parse_mode, default_value = "644")]
    pub file_mode: u16,

    /// Permission bits of directories, in octal.
    #[arg(long, value_parser = parse_mode, default_value = "755")]
    pub dir_mode: u16,

    /// How long attributes, listings and negative lookups are cached, in seconds (0: never).
    #[arg(long, value_parser = parse_seconds, default_value = "1", value_name = "SECONDS")]
    pub metadata_ttl: Duration,

    /// Memory for read-ahead and write buffers together, e.g. 256M or 1G.
    #[arg(long, value_parser = parse_size, default_value = "256M", value_name = "SIZE")]
    pub max_memory: u64,

    /// Objects up to this size that are read at random are fetched whole, in the background,
    /// into a local temporary file that serves their reads until closed (0: never).
    #[arg(long, value_parser = parse_size, default_value = "2G", value_name = "SIZE")]
    pub local_copy_max: u64,

    /// Size of the first 1,000 parts of an upload (later parts grow), e.g. 8M.
    #[arg(long, value_parser = parse_size, default_value = "8M", value_name = "SIZE")]
    pub part_size: u64,

    /// Part uploads in flight per file.
    #[arg(long, default_value = "8", value_name = "N")]
    pub upload_concurrency: usize,

    /// Where files being written are spooled (default: $TMPDIR, else /tmp); needs room for
    /// the files open for writing at once.
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,

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

    /// Where logs go when in the background (default: $XDG_STATE_HOME or ~/.local/state,
    /// s3mount/BUCKET.log).
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// Mount options, comma-separated, as mount(8) passes them: ro, rw, allow_other,
    /// allow_root, uid=N, gid=N, file_mode=OCT, dir_mode=OCT, endpoint_url=URL, region=R,
    /// profile=P, prefix=P, force_path_style, metadata_ttl=S, max_memory=SIZE, foreground,
    /// retry_attempts=N, retry_max_time=S, connect_timeout=S, request_timeout=S,
    /// stall_timeout=S, spool_dir=DIR, addressing_style=S, ca_bundle=FILE, no_verify_tls,
    /// proxy=URL, sse=ALG, sse_kms_key_id=KEY, storage_class=C, acl=ACL, requester_pays,
    /// expected_bucket_owner=ID.
    #[arg(short = 'o', value_name = "OPTIONS", action = clap::ArgAction::Append)]
    pub options: Vec<String>,
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

impl Cli {
    /// Folds `-o` options and `BUCKET:PREFIX` into the fields. Options that mount(8) and
    /// fstab pass for every filesystem (`dev`, `exec`, `_netdev`, ...) are accepted and ignored.
    pub fn resolve(mut self) -> Result<Self, String> {
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
                    "file_mode" => self.file_mode = parse_mode(need()?)?,
                    "dir_mode" => self.dir_mode = parse_mode(need()?)?,
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
                    "expected_bucket_owner" => {
                        self.expected_bucket_owner = Some(parse_account_id(need()?)?)
                    }
                    "dev" | "nodev" | "suid" | "nosuid" | "exec" | "noexec" | "auto" | "noauto"
                    | "user" | "nouser" | "users" | "_netdev" | "nofail" | "defaults" | "atime"
                    | "noatime" | "relatime" | "async" => {}
                    other => {
                        return Err(format!(
                            "unknown mount option {other:?} (see s3mount --help)"
                        ))
                    }
                }
            }
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
        assert_eq!(c.file_mode, 0o600);
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

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("100"), Ok(100));
    }
}
