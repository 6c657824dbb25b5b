//! A profile of the shared files, resolved as the CLI does. The files are read again at every
//! fetch, so an edited profile (new static keys, another role) takes effect at the next
//! renewal, which a change of either file triggers.
//!
//! Inside one profile, first match wins:
//! 1. `role_arn`: refused with `mfa_serial` (a mount cannot ask for a code); with
//!    `web_identity_token_file`, STS `AssumeRoleWithWebIdentity`; otherwise STS `AssumeRole`
//!    (`external_id`, `role_session_name`, `duration_seconds`) signed with the credentials of
//!    `source_profile` (itself any kind of profile, so chains of roles work; a loop is refused;
//!    a profile may name itself to use its own static keys) or of `credential_source`
//!    (`Environment`, `Ec2InstanceMetadata`, `EcsContainer`);
//! 2. SSO (`sso_session`, or the legacy `sso_start_url`);
//! 3. static keys (`aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`);
//! 4. `credential_process`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::environment::Environment;
use super::imds::Imds;
use super::web_identity::WebIdentity;
use super::{process, sso, Context, Credentials, Fetched, Provider, ProviderError, SharedFiles};
use crate::s3::sts::{self, RoleRequest};

/// The providers `credential_source` may name.
pub struct Sources {
    pub environment: Arc<Environment>,
    pub container: Arc<dyn Provider>,
    pub imds: Arc<Imds>,
}

pub struct Profile {
    pub name: String,
    /// Chosen by `--profile` or `AWS_PROFILE`: a profile without credentials is then an error.
    pub named: bool,
    pub files: SharedFiles,
    pub sso_cache_dir: PathBuf,
    pub sso_portal: Option<String>,
    pub sources: Arc<Sources>,
}

impl Provider for Profile {
    fn name(&self) -> String {
        format!("profile '{}'", self.name)
    }

    fn fetch<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        Box::pin(async move {
            let files = self.files.clone().load();
            match self.resolve(&files, &self.name, Vec::new(), ctx).await {
                Err(ProviderError::Absent(why)) if self.named => Err(ProviderError::Failed(why)),
                other => other,
            }
        })
    }
}

fn failed(s: String) -> ProviderError {
    ProviderError::Failed(s)
}

impl Profile {
    fn resolve<'a>(
        &'a self,
        files: &'a SharedFiles,
        name: &'a str,
        visited: Vec<String>,
        ctx: &'a Context,
    ) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        Box::pin(async move {
            let origin = format!("profile '{name}'");
            let Some(section) = files.profile(name) else {
                let where_ = format!(
                    "{} or {}",
                    files.credentials_path.display(),
                    files.config_path.display()
                );
                return Err(match visited.last() {
                    Some(prev) => failed(format!(
                        "profile '{prev}' names source_profile '{name}', which is not in {where_}"
                    )),
                    None => ProviderError::Absent(format!("not in {where_}")),
                });
            };
            let mut fetched = if let Some(role_arn) = section.get("role_arn") {
                self.assume_role(files, name, &section, role_arn, visited, ctx)
                    .await?
            } else if section.contains_key("sso_session") || section.contains_key("sso_start_url") {
                let settings = sso::settings(name, &section, files).map_err(failed)?;
                sso::fetch(
                    &settings,
                    &self.sso_cache_dir,
                    self.sso_portal.as_deref(),
                    ctx,
                    &origin,
                )
                .await?
            } else if let Some(c) = static_keys(files, name, &section)? {
                Fetched::new(c, None)
            } else if let Some(command) = section.get("credential_process") {
                process::run(command, &origin).await?
            } else {
                return Err(ProviderError::Absent(
                    "no credentials: none of aws_access_key_id, role_arn, sso_session, sso_start_url, credential_process".into(),
                ));
            };
            fetched.watch.extend(files.paths());
            Ok(fetched)
        })
    }

    async fn assume_role(
        &self,
        files: &SharedFiles,
        name: &str,
        section: &HashMap<String, String>,
        role_arn: &str,
        mut visited: Vec<String>,
        ctx: &Context,
    ) -> Result<Fetched, ProviderError> {
        let origin = format!("profile '{name}' (role_arn {role_arn})");
        if let Some(mfa) = section.get("mfa_serial") {
            return Err(failed(format!(
                "profile '{name}' has mfa_serial = {mfa}: a mount runs unattended and cannot ask for an MFA code; \
                 use a role without MFA, or put the keys of `aws sts get-session-token` in the environment"
            )));
        }
        let duration_seconds = match section.get("duration_seconds") {
            Some(d) => Some(d.parse::<u32>().map_err(|_| {
                failed(format!(
                    "profile '{name}' has duration_seconds = {d}, not a number of seconds"
                ))
            })?),
            None => None,
        };
        let role = RoleRequest {
            role_arn: role_arn.to_string(),
            session_name: section
                .get("role_session_name")
                .cloned()
                .unwrap_or_else(sts::default_session_name),
            external_id: section.get("external_id").cloned(),
            duration_seconds,
        };
        if let Some(token_file) = section.get("web_identity_token_file") {
            let w = WebIdentity {
                origin: format!("profile '{name}'"),
                token_file: PathBuf::from(token_file),
                role,
            };
            return w
                .assume(ctx)
                .await
                .map_err(|e| failed(format!("profile '{name}': {e}")));
        }
        let source = match (section.get("source_profile"), section.get("credential_source")) {
            (Some(_), Some(_)) => {
                return Err(failed(format!(
                    "profile '{name}' has both source_profile and credential_source; keep one"
                )))
            }
            (Some(src), None) if src == name => {
                let c = static_keys(files, name, section)?.ok_or_else(|| {
                    failed(format!(
                        "profile '{name}' names itself as source_profile but has no aws_access_key_id"
                    ))
                })?;
                Fetched::new(c, None)
            }
            (Some(src), None) => {
                visited.push(name.to_string());
                if visited.iter().any(|v| v == src) {
                    visited.push(src.clone());
                    return Err(failed(format!(
                        "the source_profile chain loops: {}",
                        visited
                            .iter()
                            .map(|v| format!("'{v}'"))
                            .collect::<Vec<_>>()
                            .join(" -> ")
                    )));
                }
                self.resolve(files, src, visited, ctx)
                    .await
                    .map_err(|e| match e {
                        ProviderError::Absent(why) => failed(format!(
                            "profile '{name}' takes source_profile '{src}', which gives no credentials: {why}"
                        )),
                        f => f,
                    })?
            }
            (None, Some(cs)) => {
                let provider: &dyn Provider = match cs.as_str() {
                    "Environment" => self.sources.environment.as_ref(),
                    "Ec2InstanceMetadata" => self.sources.imds.as_ref(),
                    "EcsContainer" => self.sources.container.as_ref(),
                    other => {
                        return Err(failed(format!(
                            "profile '{name}' has credential_source = {other}; use Environment, Ec2InstanceMetadata or EcsContainer"
                        )))
                    }
                };
                provider.fetch(ctx).await.map_err(|e| {
                    failed(format!(
                        "profile '{name}' takes credential_source = {cs}, which gives no credentials: {e}"
                    ))
                })?
            }
            (None, None) => {
                return Err(failed(format!(
                    "profile '{name}' has role_arn but no source_profile, credential_source or web_identity_token_file"
                )))
            }
        };
        let http = ctx.http(std::time::Duration::from_secs(20))?;
        let mut fetched = sts::assume_role(&http, &ctx.sts, &source.credentials, &role)
            .await
            .map_err(|e| failed(format!("{origin}: {e}")))?;
        fetched.watch.extend(source.watch);
        Ok(fetched)
    }
}

/// The static keys of a profile; one without the other is an error naming the file.
fn static_keys(
    files: &SharedFiles,
    name: &str,
    section: &HashMap<String, String>,
) -> Result<Option<Credentials>, ProviderError> {
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
        (Some(_), None) => Err(failed(format!(
            "profile '{name}' in {} has aws_access_key_id but no aws_secret_access_key",
            files.file_of(name, "aws_access_key_id").display()
        ))),
        (None, Some(_)) => Err(failed(format!(
            "profile '{name}' in {} has aws_secret_access_key but no aws_access_key_id",
            files.file_of(name, "aws_secret_access_key").display()
        ))),
    }
}
