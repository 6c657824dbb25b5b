//! [`Chain`]: the providers in the AWS CLI's order, asked one after the other at mount time.
//!
//! A provider that is not set up here (`Absent`) lets the chain go on; one that is set up but
//! fails stops it, since taking other keys would surprise the user. With `--profile`, the
//! profile is the whole chain; with `AWS_PROFILE`, the environment's keys still come first (as
//! in the CLI) but container and instance credentials are not tried. The error when nothing
//! gave credentials lists every provider with its reason.

use std::fmt;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::container::Container;
use super::environment::Environment;
use super::imds::Imds;
use super::profile::{Profile, Sources};
use super::web_identity::WebIdentity;
use super::{
    profile_name, Context, CredentialsError, Env, Fetched, Provider, ProviderError,
    SharedCredentials, SharedFiles,
};

/// A provider that can only say why it gives nothing (a source not set up, or set up wrong).
struct Unavailable {
    name: String,
    error: ProviderError,
}

impl Provider for Unavailable {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn fetch<'a>(&'a self, _ctx: &'a Context) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        let e = self.error.clone();
        Box::pin(async move { Err(e) })
    }
}

pub struct Chain {
    providers: Vec<Arc<dyn Provider>>,
    ctx: Context,
    imds: Arc<Imds>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainError {
    /// Each provider that gave nothing, with why.
    pub tried: Vec<(String, String)>,
    /// The provider that failed, with its error; `None` when all were absent.
    pub failed: Option<(String, String)>,
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line, as every start-up error: each provider with why it gave nothing.
        let tried = self
            .tried
            .iter()
            .map(|(n, w)| format!("{n}: {w}"))
            .collect::<Vec<_>>()
            .join("; ");
        match &self.failed {
            Some((name, why)) if tried.is_empty() => {
                write!(f, "cannot get credentials from {name}: {why}")
            }
            Some((name, why)) => write!(
                f,
                "cannot get credentials from {name}: {why} (tried before it: {tried})"
            ),
            None => write!(
                f,
                "no AWS credentials found (tried {tried}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
                 configure a profile in ~/.aws (see docs/CONFIGURATION.md), or pass --no-sign-request for a public bucket"
            ),
        }
    }
}

impl Chain {
    /// The providers for this environment and `--profile`; reads the shared files, no network.
    pub fn build(
        env: &dyn Env,
        cli_profile: Option<&str>,
        ctx: Context,
    ) -> Result<Self, CredentialsError> {
        let (name, explicit) = profile_name(env, cli_profile);
        let named = explicit || env.var("AWS_PROFILE").is_some();
        let files = SharedFiles::locate(env);
        let loaded = files.clone().load();
        if named && loaded.profile(&name).is_none() {
            return Err(loaded.no_such_profile(&name));
        }
        let environment = Arc::new(Environment::from_env(env)?);
        let container: Arc<dyn Provider> = match Container::from_env(env) {
            Ok(c) => Arc::new(c),
            Err(e) => Arc::new(Unavailable {
                name: "container credentials".into(),
                error: ProviderError::Failed(e),
            }),
        };
        let imds = Arc::new(Imds::from_env(env));
        let sources = Arc::new(Sources {
            environment: environment.clone(),
            container: container.clone(),
            imds: imds.clone(),
        });
        let mut providers: Vec<Arc<dyn Provider>> = Vec::new();
        if !explicit {
            providers.push(environment);
            providers.push(match WebIdentity::from_env(env) {
                Ok(Some(w)) => Arc::new(w),
                Ok(None) => Arc::new(Unavailable {
                    name: "web identity".into(),
                    error: ProviderError::Absent(
                        "AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN are not set".into(),
                    ),
                }),
                Err(e) => Arc::new(Unavailable {
                    name: "web identity".into(),
                    error: ProviderError::Failed(e),
                }),
            });
        }
        let home = env.home().unwrap_or_default();
        providers.push(Arc::new(Profile {
            name,
            named,
            files,
            sso_cache_dir: home.join(".aws/sso/cache"),
            sso_portal: env.var("AWS_ENDPOINT_URL_SSO"),
            sources,
        }));
        if !named {
            providers.push(container);
            providers.push(imds.clone());
        }
        Ok(Self {
            providers,
            ctx,
            imds,
        })
    }

    /// The names of the providers, in order (for tests and debug logs).
    pub fn names(&self) -> Vec<String> {
        self.providers.iter().map(|p| p.name()).collect()
    }

    pub fn imds(&self) -> &Imds {
        &self.imds
    }

    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Asks the providers in order; the first that answers keeps the credentials fresh.
    pub async fn resolve(&self) -> Result<Arc<SharedCredentials>, ChainError> {
        let mut tried = Vec::new();
        for p in &self.providers {
            match p.fetch(&self.ctx).await.and_then(Fetched::unexpired) {
                Ok(f) => return Ok(SharedCredentials::new(p.clone(), self.ctx.clone(), f)),
                Err(ProviderError::Absent(why)) => tried.push((p.name(), why)),
                Err(ProviderError::Failed(why)) => {
                    return Err(ChainError {
                        tried,
                        failed: Some((p.name(), why)),
                    })
                }
            }
        }
        Err(ChainError {
            tried,
            failed: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::credentials::FakeEnv;
    use crate::s3::sts::StsEndpoint;
    use crate::s3::transport::TransportConfig;
    use std::collections::HashMap;

    fn ctx() -> Context {
        Context {
            transport: TransportConfig::default(),
            sts: StsEndpoint {
                url: "http://127.0.0.1:9".into(),
                region: "us-east-1".into(),
            },
        }
    }

    fn env(vars: &[(&str, &str)], credentials: &str, config: &str) -> (FakeEnv, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".aws")).unwrap();
        std::fs::write(dir.path().join(".aws/credentials"), credentials).unwrap();
        std::fs::write(dir.path().join(".aws/config"), config).unwrap();
        let mut vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // Never reach for a real metadata service from a unit test.
        vars.entry("AWS_EC2_METADATA_DISABLED".into())
            .or_insert_with(|| "true".into());
        (
            FakeEnv {
                vars,
                home: dir.path().to_path_buf(),
            },
            dir,
        )
    }

    fn resolve(env: &FakeEnv, profile: Option<&str>) -> Result<Arc<SharedCredentials>, String> {
        let chain = Chain::build(env, profile, ctx()).map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(chain.resolve()).map_err(|e| e.to_string())
    }

    const CREDS: &str = "[default]\naws_access_key_id = DEFKEY\naws_secret_access_key = defsecret\n\n[dev]\naws_access_key_id=DEVKEY\naws_secret_access_key=devsecret\naws_session_token = devtoken\n[half]\naws_access_key_id = X\n";
    const ENV_KEYS: &[(&str, &str)] = &[
        ("AWS_ACCESS_KEY_ID", "ENVKEY"),
        ("AWS_SECRET_ACCESS_KEY", "envsecret"),
    ];

    fn key_of(s: &SharedCredentials) -> String {
        s.snapshot().credentials.access_key_id().to_string()
    }

    #[test]
    fn order_follows_the_cli() {
        let (e, _d) = env(&[], "", "");
        let names = Chain::build(&e, None, ctx()).unwrap().names();
        assert_eq!(names[0], "environment");
        assert_eq!(names[1], "web identity");
        assert_eq!(names[2], "profile 'default'");
        assert_eq!(names[3], "container credentials");
        assert!(names[4].starts_with("IMDSv2"), "{names:?}");
        let (e, _d) = env(&[], CREDS, "");
        assert_eq!(
            Chain::build(&e, Some("dev"), ctx()).unwrap().names(),
            ["profile 'dev'"]
        );
    }

    #[test]
    fn environment_first_without_profile() {
        let (e, _d) = env(ENV_KEYS, CREDS, "");
        let s = resolve(&e, None).unwrap();
        assert_eq!(key_of(&s), "ENVKEY");
        assert_eq!(s.provider_name(), "environment");
        let (e, _d) = env(&[], CREDS, "");
        assert_eq!(key_of(&resolve(&e, None).unwrap()), "DEFKEY");
    }

    #[test]
    fn named_profile_never_falls_back_to_the_environment() {
        let (e, _d) = env(ENV_KEYS, CREDS, "[profile norole]\nregion = eu-west-1\n");
        let s = resolve(&e, Some("dev")).unwrap();
        assert_eq!(key_of(&s), "DEVKEY");
        assert_eq!(s.snapshot().credentials.session_token(), Some("devtoken"));
        let err = resolve(&e, Some("norole")).unwrap_err();
        assert!(
            err.contains("profile 'norole'") && err.contains("no credentials"),
            "{err}"
        );
        assert!(!err.contains("ENVKEY"));
        let err = resolve(&e, Some("nope")).unwrap_err();
        assert!(err.contains("'nope'") && err.contains("neither"), "{err}");
        let err = resolve(&e, Some("half")).unwrap_err();
        assert!(
            err.contains("no aws_secret_access_key") && err.contains("credentials"),
            "{err}"
        );
    }

    #[test]
    fn aws_profile_keeps_environment_first() {
        let mut vars = ENV_KEYS.to_vec();
        vars.push(("AWS_PROFILE", "dev"));
        let (e, _d) = env(&vars, CREDS, "");
        assert_eq!(key_of(&resolve(&e, None).unwrap()), "ENVKEY");
        let (e, _d) = env(&[("AWS_PROFILE", "dev")], CREDS, "");
        assert_eq!(key_of(&resolve(&e, None).unwrap()), "DEVKEY");
        let (e, _d) = env(&[("AWS_PROFILE", "gone")], CREDS, "");
        assert!(resolve(&e, None).unwrap_err().contains("'gone'"));
    }

    #[test]
    fn nothing_found_lists_every_provider() {
        let (e, _d) = env(&[], "", "");
        let err = resolve(&e, None).unwrap_err();
        assert!(err.starts_with("no AWS credentials found"), "{err}");
        for want in [
            "environment: AWS_ACCESS_KEY_ID",
            "web identity: AWS_WEB_IDENTITY_TOKEN_FILE",
            "profile 'default'",
            "container credentials: AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_EC2_METADATA_DISABLED",
            "--no-sign-request",
        ] {
            assert!(err.contains(want), "{want} missing in: {err}");
        }
    }

    #[test]
    fn role_profiles_are_checked_before_any_request() {
        let config = "[profile mfa]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = dev\nmfa_serial = arn:aws:iam::1:mfa/me\n\
                      [profile loop-a]\nrole_arn = arn:aws:iam::1:role/a\nsource_profile = loop-b\n\
                      [profile loop-b]\nrole_arn = arn:aws:iam::1:role/b\nsource_profile = loop-a\n\
                      [profile orphan]\nrole_arn = arn:aws:iam::1:role/o\n\
                      [profile badsource]\nrole_arn = arn:aws:iam::1:role/o\ncredential_source = Somewhere\n\
                      [profile missing-source]\nrole_arn = arn:aws:iam::1:role/o\nsource_profile = ghost\n\
                      [profile badduration]\nrole_arn = arn:aws:iam::1:role/o\nsource_profile = dev\nduration_seconds = 1h\n";
        let (e, _d) = env(ENV_KEYS, CREDS, config);
        let err = resolve(&e, Some("mfa")).unwrap_err();
        assert!(
            err.contains("mfa_serial") && err.contains("profile 'mfa'"),
            "{err}"
        );
        let err = resolve(&e, Some("loop-a")).unwrap_err();
        assert!(
            err.contains("loops: 'loop-a' -> 'loop-b' -> 'loop-a'"),
            "{err}"
        );
        let err = resolve(&e, Some("orphan")).unwrap_err();
        assert!(err.contains("no source_profile"), "{err}");
        let err = resolve(&e, Some("badsource")).unwrap_err();
        assert!(err.contains("credential_source = Somewhere"), "{err}");
        let err = resolve(&e, Some("missing-source")).unwrap_err();
        assert!(
            err.contains("source_profile 'ghost', which is not in"),
            "{err}"
        );
        let err = resolve(&e, Some("badduration")).unwrap_err();
        assert!(err.contains("duration_seconds = 1h"), "{err}");
    }

    #[test]
    fn expired_credentials_are_refused_at_mount() {
        let mut vars = ENV_KEYS.to_vec();
        vars.push(("AWS_CREDENTIAL_EXPIRATION", "2020-01-01T00:00:00Z"));
        let (e, _d) = env(&vars, "", "");
        let err = resolve(&e, None).unwrap_err();
        assert_eq!(
            err,
            "cannot get credentials from environment: the credentials it gave expired at 2020-01-01T00:00:00Z"
        );
    }

    #[test]
    fn credential_process_profile() {
        let config = "[profile proc]\ncredential_process = echo '{\"Version\": 1, \"AccessKeyId\": \"PROCKEY\", \"SecretAccessKey\": \"s\"}'\n";
        let (e, _d) = env(&[], "", config);
        let s = resolve(&e, Some("proc")).unwrap();
        assert_eq!(key_of(&s), "PROCKEY");
        assert_eq!(s.provider_name(), "profile 'proc'");
    }
}
