//! Web identity: an OIDC token in a file (EKS IRSA, GitHub Actions, ...) exchanged for role
//! credentials with STS `AssumeRoleWithWebIdentity`. Configured by `AWS_WEB_IDENTITY_TOKEN_FILE`
//! and `AWS_ROLE_ARN` (optionally `AWS_ROLE_SESSION_NAME`), or by a profile's
//! `web_identity_token_file` and `role_arn` (with `role_session_name`, `duration_seconds`). The
//! token file is read at every renewal: its owner rotates it.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{Context, Env, Fetched, Provider, ProviderError};
use crate::s3::sts::{self, RoleRequest};

pub struct WebIdentity {
    /// Where the settings came from, for messages: `environment` or `profile 'x'`.
    pub origin: String,
    pub token_file: PathBuf,
    pub role: RoleRequest,
}

impl WebIdentity {
    /// From the environment variables, if both are set; one without the other is an error.
    pub fn from_env(env: &dyn Env) -> Result<Option<Self>, String> {
        match (
            env.var("AWS_WEB_IDENTITY_TOKEN_FILE"),
            env.var("AWS_ROLE_ARN"),
        ) {
            (Some(file), Some(role_arn)) => Ok(Some(Self {
                origin: "environment".to_string(),
                token_file: PathBuf::from(file),
                role: RoleRequest {
                    role_arn,
                    session_name: env
                        .var("AWS_ROLE_SESSION_NAME")
                        .unwrap_or_else(sts::default_session_name),
                    ..Default::default()
                },
            })),
            (Some(_), None) => {
                Err("AWS_WEB_IDENTITY_TOKEN_FILE is set but AWS_ROLE_ARN is not".into())
            }
            _ => Ok(None),
        }
    }

    pub async fn assume(&self, ctx: &Context) -> Result<Fetched, ProviderError> {
        let token = std::fs::read_to_string(&self.token_file).map_err(|e| {
            ProviderError::Failed(format!(
                "cannot read the web identity token file {}: {e}",
                self.token_file.display()
            ))
        })?;
        let http = ctx.http(Duration::from_secs(20))?;
        let mut fetched =
            sts::assume_role_with_web_identity(&http, &ctx.sts, token.trim(), &self.role)
                .await
                .map_err(|e| ProviderError::Failed(format!("role {}: {e}", self.role.role_arn)))?;
        fetched.watch.push(self.token_file.clone());
        Ok(fetched)
    }
}

impl Provider for WebIdentity {
    fn name(&self) -> String {
        format!(
            "web identity ({}: role {}, token {})",
            self.origin,
            self.role.role_arn,
            self.token_file.display()
        )
    }

    fn fetch<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        Box::pin(self.assume(ctx))
    }
}

/// Stands in the chain when the variables are not set, so the mount-time error can say so.
pub struct NoWebIdentity;

impl Provider for NoWebIdentity {
    fn name(&self) -> String {
        "web identity".to_string()
    }

    fn fetch<'a>(&'a self, _ctx: &'a Context) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        Box::pin(async {
            Err(ProviderError::Absent(
                "AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN are not set".into(),
            ))
        })
    }
}
