//! Credentials and where they come from.
//!
//! The chain, first match wins: the `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
//! `AWS_SESSION_TOKEN` variables, then the profile (`--profile`, else `AWS_PROFILE`, else
//! `default`) of the shared credentials file (`~/.aws/credentials` or
//! `AWS_SHARED_CREDENTIALS_FILE`) and of the config file (`~/.aws/config` or `AWS_CONFIG_FILE`,
//! where sections are `[profile NAME]`). Anonymous access is an explicit choice, never a silent
//! fallback: a mount that finds no credentials says so instead of failing later with 403s.
//!
//! The config file also supplies `region` and `endpoint_url` for the profile; the environment
//! (`AWS_REGION`, `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`) overrides it.
//!
//! Secrets are wrapped in [`Secret`], whose `Debug` and `Display` print `******`, so no log line
//! or error message can carry one by accident.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

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
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    Signed(Credentials),
    /// Unsigned requests, for public buckets.
    Anonymous,
}

/// Settings read from the environment and the shared files, before command-line options
/// override them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProfileSettings {
    pub credentials: Option<Credentials>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    /// Where the credentials came from, for log lines ("environment", "profile dev in ...").
    pub source: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("profile '{profile}' was asked for but is in neither {credentials} nor {config}")]
    NoSuchProfile {
        profile: String,
        credentials: String,
        config: String,
    },
    #[error("profile '{profile}' in {file} has aws_access_key_id but no aws_secret_access_key")]
    IncompleteProfile { profile: String, file: String },
    #[error("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not (or the other way round)")]
    IncompleteEnvironment,
}

/// Where the environment lives, so tests can pass their own instead of mutating the process.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
    fn home(&self) -> Option<PathBuf>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }

    fn home(&self) -> Option<PathBuf> {
        self.var("HOME").map(PathBuf::from)
    }
}

/// Resolves credentials, region and endpoint. `profile` is the `--profile` option.
pub fn resolve(env: &dyn Env, profile: Option<&str>) -> Result<ProfileSettings, CredentialsError> {
    let explicit_profile = profile
        .map(str::to_string)
        .or_else(|| env.var("AWS_PROFILE"));
    let profile_name = explicit_profile
        .clone()
        .unwrap_or_else(|| "default".to_string());
    let home = env.home().unwrap_or_default();
    let credentials_path = env
        .var("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".aws/credentials"));
    let config_path = env
        .var("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".aws/config"));

    let credentials_file = read_ini(&credentials_path);
    let config_file = read_ini(&config_path);
    let from_credentials = credentials_file.get(&profile_name);
    let config_section = if profile_name == "default" {
        "default".to_string()
    } else {
        format!("profile {profile_name}")
    };
    let from_config = config_file.get(&config_section);

    if explicit_profile.is_some() && from_credentials.is_none() && from_config.is_none() {
        return Err(CredentialsError::NoSuchProfile {
            profile: profile_name,
            credentials: credentials_path.display().to_string(),
            config: config_path.display().to_string(),
        });
    }

    let mut settings = ProfileSettings::default();
    // A profile named on the command line wins over the key variables: asking for it is explicit.
    let env_first = profile.is_none();
    let env_credentials = match (
        env.var("AWS_ACCESS_KEY_ID"),
        env.var("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Some(id), Some(secret)) => Some(Credentials::new(
            &id,
            &secret,
            env.var("AWS_SESSION_TOKEN").as_deref(),
        )),
        (None, None) => None,
        _ => return Err(CredentialsError::IncompleteEnvironment),
    };
    let file_credentials = [
        (from_credentials, &credentials_path),
        (from_config, &config_path),
    ]
    .into_iter()
    .find_map(|(section, path)| section.map(|s| credentials_from_section(s, &profile_name, path)))
    .transpose()?
    .flatten();

    if env_first && env_credentials.is_some() {
        settings.credentials = env_credentials;
        settings.source = "environment".into();
    } else if let Some(c) = file_credentials {
        settings.credentials = Some(c);
        settings.source = format!("profile '{profile_name}'");
    } else if env_credentials.is_some() {
        settings.credentials = env_credentials;
        settings.source = "environment".into();
    }

    let section_value = |key: &str| {
        from_config
            .and_then(|s| s.get(key).cloned())
            .or_else(|| from_credentials.and_then(|s| s.get(key).cloned()))
    };
    settings.region = env
        .var("AWS_REGION")
        .or_else(|| env.var("AWS_DEFAULT_REGION"))
        .or_else(|| section_value("region"));
    settings.endpoint_url = env
        .var("AWS_ENDPOINT_URL_S3")
        .or_else(|| env.var("AWS_ENDPOINT_URL"))
        .or_else(|| section_value("endpoint_url"));
    Ok(settings)
}

fn credentials_from_section(
    section: &HashMap<String, String>,
    profile: &str,
    path: &Path,
) -> Result<Option<Credentials>, CredentialsError> {
    match (
        section.get("aws_access_key_id"),
        section.get("aws_secret_access_key"),
    ) {
        (Some(id), Some(secret)) => Ok(Some(Credentials::new(
            id,
            secret,
            section.get("aws_session_token").map(String::as_str),
        ))),
        (None, None) => Ok(None),
        _ => Err(CredentialsError::IncompleteProfile {
            profile: profile.to_string(),
            file: path.display().to_string(),
        }),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeEnv {
        vars: HashMap<String, String>,
        home: PathBuf,
    }

    impl Env for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.vars.get(name).cloned()
        }
        fn home(&self) -> Option<PathBuf> {
            Some(self.home.clone())
        }
    }

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
    const CONFIG: &str = "[default]\nregion = eu-west-1\n\n[profile dev]\nregion = eu-central-1\nendpoint_url = http://127.0.0.1:9000\n  s3 =\n    addressing_style = path\n";

    #[test]
    fn environment_wins_without_profile() {
        let (env, _d) = env_with(
            &[
                ("AWS_ACCESS_KEY_ID", "ENVKEY"),
                ("AWS_SECRET_ACCESS_KEY", "envsecret"),
            ],
            CREDS,
            CONFIG,
        );
        let s = resolve(&env, None).unwrap();
        assert_eq!(s.credentials.unwrap().access_key_id(), "ENVKEY");
        assert_eq!(s.region.as_deref(), Some("eu-west-1"));
    }

    #[test]
    fn named_profile_reads_both_files() {
        let (env, _d) = env_with(
            &[
                ("AWS_ACCESS_KEY_ID", "ENVKEY"),
                ("AWS_SECRET_ACCESS_KEY", "x"),
            ],
            CREDS,
            CONFIG,
        );
        let s = resolve(&env, Some("dev")).unwrap();
        let c = s.credentials.unwrap();
        assert_eq!(c.access_key_id(), "DEVKEY");
        assert_eq!(c.session_token(), Some("devtoken"));
        assert_eq!(s.region.as_deref(), Some("eu-central-1"));
        assert_eq!(s.endpoint_url.as_deref(), Some("http://127.0.0.1:9000"));
    }

    #[test]
    fn aws_profile_variable_and_region_override() {
        let (env, _d) = env_with(
            &[("AWS_PROFILE", "dev"), ("AWS_DEFAULT_REGION", "ap-south-1")],
            CREDS,
            CONFIG,
        );
        let s = resolve(&env, None).unwrap();
        assert_eq!(s.credentials.unwrap().access_key_id(), "DEVKEY");
        assert_eq!(s.region.as_deref(), Some("ap-south-1"));
    }

    #[test]
    fn missing_profile_is_an_error_and_none_is_not() {
        let (env, _d) = env_with(&[], CREDS, CONFIG);
        assert!(matches!(
            resolve(&env, Some("nope")),
            Err(CredentialsError::NoSuchProfile { .. })
        ));
        let (env, _d) = env_with(&[], "", "");
        assert_eq!(resolve(&env, None).unwrap().credentials, None);
    }

    #[test]
    fn half_set_environment_is_refused() {
        let (env, _d) = env_with(&[("AWS_ACCESS_KEY_ID", "K")], "", "");
        assert!(matches!(
            resolve(&env, None),
            Err(CredentialsError::IncompleteEnvironment)
        ));
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
