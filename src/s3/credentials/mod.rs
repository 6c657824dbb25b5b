//! Credentials: where they come from, and how they stay fresh.
//!
//! The chain follows the AWS CLI, first match wins (see `docs/CONFIGURATION.md`):
//! 1. the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`);
//! 2. web identity from the environment (`AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`), through
//!    STS `AssumeRoleWithWebIdentity`;
//! 3. the profile (`--profile`, else `AWS_PROFILE`, else `default`) of the shared files: a role
//!    (`role_arn` with `source_profile`, `credential_source` or `web_identity_token_file`), SSO,
//!    static keys, `credential_process`;
//! 4. container credentials (ECS, EKS Pod Identity);
//! 5. the EC2 instance metadata service (IMDSv2).
//!
//! A profile named with `--profile` is the whole chain: nothing else is tried, so a profile
//! that cannot give credentials is an error naming it, never a silent fall-back to other keys.
//!
//! Each source is a [`Provider`] (one small module each); [`chain::Chain`] asks them in order
//! and keeps the first answer in a [`refresh::SharedCredentials`], which requests read one
//! snapshot at a time and a background task renews before expiry. Nothing here speaks S3: STS
//! is in [`super::sts`], the HTTP client set-up (trust roots, proxies) in [`super::transport`].
//!
//! Secrets are wrapped in [`Secret`], whose `Debug` and `Display` print `******`, so no log line
//! or error message can carry one by accident.

pub mod chain;
pub mod container;
pub mod environment;
pub mod imds;
pub mod process;
pub mod profile;
pub mod refresh;
pub mod sso;
pub mod web_identity;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;

use super::transport::TransportConfig;

pub use chain::{Chain, ChainError};
pub use refresh::SharedCredentials;

/// A string that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the signer only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("******")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("******")
    }
}

/// An access key id (public: it appears in every signed request) with its secret and optional
/// session token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    access_key_id: String,
    secret_access_key: Secret,
    session_token: Option<Secret>,
}

impl Credentials {
    pub fn new(access_key_id: &str, secret_access_key: &str, session_token: Option<&str>) -> Self {
        Self {
            access_key_id: access_key_id.to_string(),
            secret_access_key: Secret::new(secret_access_key),
            session_token: session_token.map(Secret::new),
        }
    }

    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    pub fn secret_access_key(&self) -> &str {
        self.secret_access_key.expose()
    }

    pub fn session_token(&self) -> Option<&str> {
        self.session_token.as_ref().map(Secret::expose)
    }
}

/// How requests are authenticated.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Fixed keys, as given.
    Signed(Credentials),
    /// Keys from the credential chain, renewed while the mount runs.
    Chain(Arc<SharedCredentials>),
    /// Unsigned requests, for public buckets.
    Anonymous,
}

impl PartialEq for Auth {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Auth::Signed(a), Auth::Signed(b)) => a == b,
            (Auth::Chain(a), Auth::Chain(b)) => Arc::ptr_eq(a, b),
            (Auth::Anonymous, Auth::Anonymous) => true,
            _ => false,
        }
    }
}

impl Auth {
    /// The access key id requests are signed with now, for messages (it is not secret).
    pub fn access_key_id(&self) -> String {
        match self {
            Auth::Signed(c) => c.access_key_id().to_string(),
            Auth::Chain(shared) => shared.snapshot().credentials.access_key_id().to_string(),
            Auth::Anonymous => "(anonymous)".to_string(),
        }
    }
}

/// What a provider found: the keys, when they stop working (temporary credentials), and the
/// files whose change means they should be read again.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub credentials: Credentials,
    pub expires: Option<SystemTime>,
    pub watch: Vec<PathBuf>,
}

impl Fetched {
    pub fn new(credentials: Credentials, expires: Option<SystemTime>) -> Self {
        Self {
            credentials,
            expires,
            watch: Vec::new(),
        }
    }

    /// Credentials that have already expired are an error of their source (a stale
    /// `credential_process` cache, an old `AWS_CREDENTIAL_EXPIRATION`), not something to sign
    /// with or to renew in a loop.
    pub fn unexpired(self) -> Result<Self, ProviderError> {
        match self.expires {
            Some(t) if t <= SystemTime::now() => Err(ProviderError::Failed(format!(
                "the credentials it gave expired at {}",
                format_time(t)
            ))),
            _ => Ok(self),
        }
    }
}

/// Why a provider gave nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderError {
    /// This source is not set up here (no variable, no such file, no metadata service): the
    /// chain goes on to the next one.
    Absent(String),
    /// This source is set up but failed: the chain stops, since using other keys would
    /// surprise the user.
    Failed(String),
}

impl ProviderError {
    pub fn message(&self) -> &str {
        match self {
            ProviderError::Absent(m) | ProviderError::Failed(m) => m,
        }
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// What every provider may need to make a request: how to build an HTTP client and where
/// STS is.
#[derive(Debug, Clone)]
pub struct Context {
    pub transport: TransportConfig,
    pub sts: super::sts::StsEndpoint,
}

impl Context {
    /// A client for one credential request. Built per use: credentials are fetched rarely,
    /// and a client made in the start-up runtime must not be used from the mount's runtime.
    pub fn http(&self, timeout: Duration) -> Result<reqwest::Client, ProviderError> {
        super::transport::builder(&self.transport)
            .and_then(|b| {
                b.timeout(timeout)
                    .build()
                    .map_err(|e| super::transport::TransportError(e.to_string()))
            })
            .map_err(|e| ProviderError::Failed(format!("cannot build an HTTP client: {e}")))
    }
}

/// One source of credentials.
pub trait Provider: Send + Sync {
    /// How a user would name this source in a log line: `environment`, `profile 'ci'
    /// (role_arn ...)`, `IMDSv2 at http://169.254.169.254`.
    fn name(&self) -> String;

    fn fetch<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<Fetched, ProviderError>>;
}

/// Where the environment lives, so tests can pass their own instead of mutating the process.
pub trait Env: Send + Sync {
    fn var(&self, name: &str) -> Option<String>;
    fn home(&self) -> Option<PathBuf>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }

    /// `HOME`, else the user's home directory from the password database: mount(8) and
    /// systemd run mount helpers without `HOME`, and root's `~/.aws` is still `/root/.aws`.
    fn home(&self) -> Option<PathBuf> {
        self.var("HOME").map(PathBuf::from).or_else(passwd_home)
    }
}

/// The home directory of the effective user, from `getpwuid_r`.
fn passwd_home() -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: zeroed passwd for getpwuid_r to fill; buf outlives the call and the result
    // points into it; geteuid cannot fail.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let r = unsafe {
        libc::getpwuid_r(
            libc::geteuid(),
            &mut pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if r != 0 || result.is_null() || pw.pw_dir.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r succeeded, so pw_dir is a NUL-terminated string inside buf.
    let dir = unsafe { std::ffi::CStr::from_ptr(pw.pw_dir) };
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes()));
    path.is_absolute().then_some(path)
}

/// An environment with some variables set over another: `--credentials-file` and
/// `--config-file` are `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE` this way, without
/// changing the process's own environment.
pub struct OverlayEnv<E: Env> {
    base: E,
    vars: Vec<(String, String)>,
}

impl<E: Env> OverlayEnv<E> {
    pub fn new(base: E, vars: Vec<(String, String)>) -> Self {
        Self { base, vars }
    }
}

impl<E: Env> Env for OverlayEnv<E> {
    fn var(&self, name: &str) -> Option<String> {
        match self.vars.iter().find(|(k, _)| k == name) {
            Some((_, v)) => Some(v.clone()).filter(|v| !v.is_empty()),
            None => self.base.var(name),
        }
    }

    fn home(&self) -> Option<PathBuf> {
        self.base.home()
    }
}

/// A variable that reads as true (`true`, `1`, `yes`, any case).
pub fn env_flag(env: &dyn Env, name: &str) -> bool {
    env.var(name)
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialsError {
    #[error("profile '{profile}' was asked for but is in neither {credentials} nor {config}")]
    NoSuchProfile {
        profile: String,
        credentials: String,
        config: String,
    },
    #[error("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not (or the other way round)")]
    IncompleteEnvironment,
    #[error("{0}")]
    Invalid(String),
}

/// The two shared files, read together.
#[derive(Debug, Clone, Default)]
pub struct SharedFiles {
    pub credentials_path: PathBuf,
    pub config_path: PathBuf,
    credentials: Ini,
    config: Ini,
}

impl SharedFiles {
    /// Where the files are for this environment; nothing is read yet.
    pub fn locate(env: &dyn Env) -> Self {
        let home = env.home().unwrap_or_default();
        Self {
            credentials_path: env
                .var("AWS_SHARED_CREDENTIALS_FILE")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".aws/credentials")),
            config_path: env
                .var("AWS_CONFIG_FILE")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".aws/config")),
            ..Default::default()
        }
    }

    /// Reads both files (a missing file is an empty one).
    pub fn load(mut self) -> Self {
        self.credentials = read_ini(&self.credentials_path);
        self.config = read_ini(&self.config_path);
        self
    }

    /// The settings of profile `name`: the config file's `[profile name]` (`[default]` for
    /// the default profile) with the credentials file's `[name]` over it, as the CLI does.
    pub fn profile(&self, name: &str) -> Option<HashMap<String, String>> {
        let section = if name == "default" {
            "default".to_string()
        } else {
            format!("profile {name}")
        };
        let from_config = self.config.get(&section);
        let from_credentials = self.credentials.get(name);
        if from_config.is_none() && from_credentials.is_none() {
            return None;
        }
        let mut merged = from_config.cloned().unwrap_or_default();
        if let Some(c) = from_credentials {
            merged.extend(c.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        Some(merged)
    }

    /// Whether the key `key` of profile `name` comes from the credentials file (for messages).
    pub fn file_of(&self, name: &str, key: &str) -> &Path {
        if self
            .credentials
            .get(name)
            .is_some_and(|s| s.contains_key(key))
        {
            &self.credentials_path
        } else {
            &self.config_path
        }
    }

    /// A `[sso-session NAME]` section of the config file.
    pub fn sso_session(&self, name: &str) -> Option<&HashMap<String, String>> {
        self.config.get(&format!("sso-session {name}"))
    }

    pub fn paths(&self) -> Vec<PathBuf> {
        vec![self.credentials_path.clone(), self.config_path.clone()]
    }

    fn no_such_profile(&self, profile: &str) -> CredentialsError {
        CredentialsError::NoSuchProfile {
            profile: profile.to_string(),
            credentials: self.credentials_path.display().to_string(),
            config: self.config_path.display().to_string(),
        }
    }
}

/// Region and endpoint from the environment and the profile, before command-line options
/// override them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

/// The profile in use: `--profile`, else `AWS_PROFILE`, else `default`; and whether it was
/// chosen on the command line.
pub fn profile_name(env: &dyn Env, cli_profile: Option<&str>) -> (String, bool) {
    match cli_profile {
        Some(p) => (p.to_string(), true),
        None => (
            env.var("AWS_PROFILE")
                .unwrap_or_else(|| "default".to_string()),
            false,
        ),
    }
}

/// Region and endpoint: the environment (`AWS_REGION`, `AWS_DEFAULT_REGION`,
/// `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`) over the profile's `region` and `endpoint_url`.
pub fn settings(env: &dyn Env, cli_profile: Option<&str>) -> Settings {
    let (name, _) = profile_name(env, cli_profile);
    let profile = SharedFiles::locate(env).load().profile(&name);
    let value = |key: &str| profile.as_ref().and_then(|p| p.get(key).cloned());
    Settings {
        region: env
            .var("AWS_REGION")
            .or_else(|| env.var("AWS_DEFAULT_REGION"))
            .or_else(|| value("region")),
        endpoint_url: env
            .var("AWS_ENDPOINT_URL_S3")
            .or_else(|| env.var("AWS_ENDPOINT_URL"))
            .or_else(|| value("endpoint_url")),
    }
}

/// An RFC 3339 time (`2024-05-01T12:00:00Z`), as STS, IMDS and credential_process write it.
pub fn parse_time(text: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// An expiry for messages: `2024-05-01T12:00:00Z`.
pub fn format_time(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "?".to_string())
}

/// `{"AccessKeyId": ..., "SecretAccessKey": ..., "Token"/"SessionToken": ..., "Expiration": ...}`,
/// the JSON that IMDS, the container endpoint and credential_process answer with.
pub fn credentials_from_json(
    value: &serde_json::Value,
    token_field: &str,
) -> Result<Fetched, String> {
    let field = |name: &str| value.get(name).and_then(|v| v.as_str());
    let (Some(id), Some(secret)) = (field("AccessKeyId"), field("SecretAccessKey")) else {
        return Err("the answer has no AccessKeyId and SecretAccessKey".to_string());
    };
    let expires = match field("Expiration") {
        Some(t) => {
            Some(parse_time(t).ok_or_else(|| format!("Expiration {t:?} is not an RFC 3339 time"))?)
        }
        None => None,
    };
    Ok(Fetched::new(
        Credentials::new(id, secret, field(token_field)),
        expires,
    ))
}

type Ini = HashMap<String, HashMap<String, String>>;

fn read_ini(path: &Path) -> Ini {
    std::fs::read_to_string(path)
        .map(|text| parse_ini(&text))
        .unwrap_or_default()
}

/// The shared-file format: `[section]` headers, `key = value` lines, `#` and `;` comments.
/// Indented lines belong to nested blocks (`s3 =` sub-settings), which we do not use.
pub fn parse_ini(text: &str) -> Ini {
    let mut out: Ini = HashMap::new();
    let mut current: Option<String> = None;
    for raw in text.lines() {
        if raw.starts_with([' ', '\t']) {
            continue;
        }
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            out.entry(name.clone()).or_default();
            current = Some(name);
        } else if let (Some(section), Some((k, v))) = (&current, line.split_once('=')) {
            out.entry(section.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    out
}

/// An environment made by a unit test.
#[cfg(test)]
pub(crate) struct FakeEnv {
    pub vars: HashMap<String, String>,
    pub home: PathBuf,
}

#[cfg(test)]
impl FakeEnv {
    /// These variables, and a home where nothing is.
    pub fn with(vars: &[(&str, &str)]) -> Self {
        Self {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            home: "/nonexistent".into(),
        }
    }
}

#[cfg(test)]
impl Env for FakeEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.vars.get(name).cloned()
    }
    fn home(&self) -> Option<PathBuf> {
        Some(self.home.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_with(
        vars: &[(&str, &str)],
        credentials: &str,
        config: &str,
    ) -> (FakeEnv, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".aws")).unwrap();
        std::fs::write(dir.path().join(".aws/credentials"), credentials).unwrap();
        std::fs::write(dir.path().join(".aws/config"), config).unwrap();
        let env = FakeEnv {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            home: dir.path().to_path_buf(),
        };
        (env, dir)
    }

    const CREDS: &str = "[default]\naws_access_key_id = DEFKEY\naws_secret_access_key = defsecret\n\n[dev]\naws_access_key_id=DEVKEY\naws_secret_access_key=devsecret\naws_session_token = devtoken\n";
    const CONFIG: &str = "[default]\nregion = eu-west-1\n\n[profile dev]\nregion = eu-central-1\nendpoint_url = http://127.0.0.1:9000\nrole_arn = in-config\n  s3 =\n    addressing_style = path\n[sso-session corp]\nsso_region = eu-west-1\n";

    #[test]
    fn profile_merges_both_files_credentials_over_config() {
        let (env, _d) = env_with(&[], CREDS, CONFIG);
        let files = SharedFiles::locate(&env).load();
        let dev = files.profile("dev").unwrap();
        assert_eq!(dev["aws_access_key_id"], "DEVKEY");
        assert_eq!(dev["region"], "eu-central-1");
        assert_eq!(dev["role_arn"], "in-config");
        assert!(
            !dev.contains_key("s3"),
            "nested blocks are skipped: {dev:?}"
        );
        assert!(files.profile("nope").is_none());
        assert_eq!(
            files.sso_session("corp").unwrap()["sso_region"],
            "eu-west-1"
        );
        assert_eq!(
            files.file_of("dev", "aws_access_key_id"),
            files.credentials_path
        );
        assert_eq!(files.file_of("dev", "role_arn"), files.config_path);
    }

    #[test]
    fn region_and_endpoint_environment_over_profile() {
        let (env, _d) = env_with(&[], CREDS, CONFIG);
        let s = settings(&env, Some("dev"));
        assert_eq!(s.region.as_deref(), Some("eu-central-1"));
        assert_eq!(s.endpoint_url.as_deref(), Some("http://127.0.0.1:9000"));
        let (env, _d) = env_with(
            &[("AWS_PROFILE", "dev"), ("AWS_DEFAULT_REGION", "ap-south-1")],
            CREDS,
            CONFIG,
        );
        assert_eq!(settings(&env, None).region.as_deref(), Some("ap-south-1"));
        assert_eq!(profile_name(&env, None), ("dev".to_string(), false));
        assert_eq!(profile_name(&env, Some("x")), ("x".to_string(), true));
    }

    #[test]
    fn json_credentials_and_times() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"Code":"Success","AccessKeyId":"ASIA1","SecretAccessKey":"s","Token":"t","Expiration":"2030-01-02T03:04:05Z"}"#,
        )
        .unwrap();
        let f = credentials_from_json(&v, "Token").unwrap();
        assert_eq!(f.credentials.access_key_id(), "ASIA1");
        assert_eq!(f.credentials.session_token(), Some("t"));
        assert_eq!(format_time(f.expires.unwrap()), "2030-01-02T03:04:05Z");
        let bad: serde_json::Value = serde_json::from_str(r#"{"AccessKeyId":"A"}"#).unwrap();
        assert!(credentials_from_json(&bad, "Token").is_err());
        let bad_time: serde_json::Value = serde_json::from_str(
            r#"{"AccessKeyId":"A","SecretAccessKey":"s","Expiration":"soon"}"#,
        )
        .unwrap();
        assert!(credentials_from_json(&bad_time, "Token")
            .unwrap_err()
            .contains("soon"));
        assert!(parse_time("2011-07-15T23:28:33.359Z").is_some());
    }

    #[test]
    fn secrets_never_print() {
        let c = Credentials::new("AKID", "topsecret", Some("tokentoken"));
        let shown = format!("{c:?} {}", Secret::new("topsecret"));
        assert!(!shown.contains("topsecret"), "{shown}");
        assert!(!shown.contains("tokentoken"), "{shown}");
        assert!(shown.contains("AKID"));
    }
}
