//! The EC2 instance metadata service, version 2 only: a session token from
//! `PUT /latest/api/token` (header `x-aws-ec2-metadata-token-ttl-seconds`), sent as
//! `x-aws-ec2-metadata-token` with `GET /latest/meta-data/iam/security-credentials/` (the role
//! name) and `GET .../security-credentials/ROLE` (the JSON keys). The same service gives the
//! region (`/latest/meta-data/placement/region`) when none is configured.
//!
//! Settings, as the CLI names them: `AWS_EC2_METADATA_SERVICE_ENDPOINT` (default
//! `http://169.254.169.254`, or `http://[fd00:ec2::254]` with
//! `AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6`), `AWS_EC2_METADATA_DISABLED=true`,
//! `AWS_METADATA_SERVICE_TIMEOUT` (seconds, default 1) and `AWS_METADATA_SERVICE_NUM_ATTEMPTS`
//! (default 1). Off EC2 nothing answers, so a failure to connect means "not here", and the
//! chain goes on.

use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{credentials_from_json, env_flag, Context, Env, Fetched, Provider, ProviderError};

const TOKEN_TTL_SECONDS: &str = "21600";

#[derive(Debug, Clone)]
pub struct Imds {
    pub endpoint: String,
    pub disabled: bool,
    pub timeout: Duration,
    pub attempts: u32,
}

impl Imds {
    pub fn from_env(env: &dyn Env) -> Self {
        let ipv6 = env
            .var("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE")
            .is_some_and(|m| m.eq_ignore_ascii_case("ipv6"));
        let default = if ipv6 {
            "http://[fd00:ec2::254]"
        } else {
            "http://169.254.169.254"
        };
        Self {
            endpoint: env
                .var("AWS_EC2_METADATA_SERVICE_ENDPOINT")
                .unwrap_or_else(|| default.to_string())
                .trim_end_matches('/')
                .to_string(),
            disabled: env_flag(env, "AWS_EC2_METADATA_DISABLED"),
            timeout: env
                .var("AWS_METADATA_SERVICE_TIMEOUT")
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v > 0.0)
                .map_or(Duration::from_secs(1), Duration::from_secs_f64),
            attempts: env
                .var("AWS_METADATA_SERVICE_NUM_ATTEMPTS")
                .and_then(|v| v.parse().ok())
                .filter(|n| *n >= 1)
                .unwrap_or(1),
        }
    }

    /// A session token, or why there is none (`Absent` when nothing answers).
    async fn token(&self, http: &reqwest::Client) -> Result<String, ProviderError> {
        let url = format!("{}/latest/api/token", self.endpoint);
        let mut last = String::new();
        for _ in 0..self.attempts {
            match http
                .put(&url)
                .header("x-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECONDS)
                .send()
                .await
            {
                Ok(resp) if resp.status().is_success() => {
                    return resp
                        .text()
                        .await
                        .map(|t| t.trim().to_string())
                        .map_err(|e| ProviderError::Failed(format!("{url}: {e}")));
                }
                Ok(resp) => {
                    return Err(ProviderError::Absent(format!(
                        "{url} answered HTTP {} to the IMDSv2 token request",
                        resp.status().as_u16()
                    )))
                }
                Err(e) => last = crate::s3::transport::describe_error(&e),
            }
        }
        Err(ProviderError::Absent(format!(
            "no instance metadata service at {} ({last})",
            self.endpoint
        )))
    }

    async fn get(
        &self,
        http: &reqwest::Client,
        token: &str,
        path: &str,
    ) -> Result<(u16, String), ProviderError> {
        let url = format!("{}{path}", self.endpoint);
        let resp = http
            .get(&url)
            .header("x-aws-ec2-metadata-token", token)
            .send()
            .await
            .map_err(|e| {
                ProviderError::Failed(format!(
                    "{url}: {}",
                    crate::s3::transport::describe_error(&e)
                ))
            })?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| ProviderError::Failed(format!("{url}: {e}")))?;
        Ok((status, text))
    }

    async fn credentials(&self, ctx: &Context) -> Result<Fetched, ProviderError> {
        if self.disabled {
            return Err(ProviderError::Absent(
                "AWS_EC2_METADATA_DISABLED is set".into(),
            ));
        }
        let http = ctx.http(self.timeout)?;
        let token = self.token(&http).await?;
        const ROLES: &str = "/latest/meta-data/iam/security-credentials/";
        let (status, roles) = self.get(&http, &token, ROLES).await?;
        if status == 404 {
            return Err(ProviderError::Absent(
                "the instance has no IAM role (instance profile)".into(),
            ));
        }
        if status != 200 {
            return Err(ProviderError::Failed(format!(
                "{}{ROLES} answered HTTP {status}",
                self.endpoint
            )));
        }
        let Some(role) = roles.lines().map(str::trim).find(|l| !l.is_empty()) else {
            return Err(ProviderError::Absent(
                "the instance has no IAM role (instance profile)".into(),
            ));
        };
        let path = format!("{ROLES}{role}");
        let (status, text) = self.get(&http, &token, &path).await?;
        let failed =
            |what: String| ProviderError::Failed(format!("{}{path}: {what}", self.endpoint));
        if status != 200 {
            return Err(failed(format!("HTTP {status}")));
        }
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| failed(format!("not JSON: {e}")))?;
        if let Some(code) = value.get("Code").and_then(|c| c.as_str()) {
            if code != "Success" {
                return Err(failed(format!("Code {code}")));
            }
        }
        credentials_from_json(&value, "Token").map_err(failed)
    }

    /// The instance's region, or `None` when there is no metadata service.
    pub async fn region(&self, ctx: &Context) -> Option<String> {
        if self.disabled {
            return None;
        }
        let http = ctx.http(self.timeout).ok()?;
        let token = self.token(&http).await.ok()?;
        match self
            .get(&http, &token, "/latest/meta-data/placement/region")
            .await
        {
            Ok((200, region)) if !region.trim().is_empty() => Some(region.trim().to_string()),
            _ => None,
        }
    }
}

impl Provider for Imds {
    fn name(&self) -> String {
        format!("IMDSv2 at {}", self.endpoint)
    }

    fn fetch<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        Box::pin(self.credentials(ctx))
    }
}
