//! Container credentials: the ECS agent (`AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`, under
//! `http://169.254.170.2`) and any agent named by `AWS_CONTAINER_CREDENTIALS_FULL_URI` (EKS Pod
//! Identity's `http://169.254.170.23/v1/credentials`, a local one). A full URI must be https, or
//! http to a loopback address, 169.254.170.2, 169.254.170.23 or fd00:ec2::23, as the SDKs
//! require: the request carries a bearer token. The token is `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`'s
//! content (read at every renewal: the agent rotates it), else `AWS_CONTAINER_AUTHORIZATION_TOKEN`.
//! The answer is the JSON `{AccessKeyId, SecretAccessKey, Token, Expiration}`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{credentials_from_json, Context, Env, Fetched, Provider, ProviderError};

const ECS_HOST: &str = "http://169.254.170.2";

pub struct Container {
    /// `None` when neither variable is set.
    url: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
}

impl Container {
    pub fn from_env(env: &dyn Env) -> Result<Self, String> {
        let url = match (
            env.var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"),
            env.var("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
        ) {
            (Some(rel), _) => Some(format!("{ECS_HOST}{rel}")),
            (None, Some(full)) => {
                check_full_uri(&full)?;
                Some(full)
            }
            (None, None) => None,
        };
        Ok(Self {
            url,
            token: env.var("AWS_CONTAINER_AUTHORIZATION_TOKEN"),
            token_file: env
                .var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
                .map(PathBuf::from),
        })
    }

    async fn get(&self, ctx: &Context) -> Result<Fetched, ProviderError> {
        let Some(url) = &self.url else {
            return Err(ProviderError::Absent(
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI and AWS_CONTAINER_CREDENTIALS_FULL_URI are not set".into(),
            ));
        };
        let failed = |what: String| ProviderError::Failed(format!("{url}: {what}"));
        let token = match &self.token_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| {
                        failed(format!(
                            "cannot read AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE {}: {e}",
                            f.display()
                        ))
                    })?
                    .trim()
                    .to_string(),
            ),
            None => self.token.clone(),
        };
        let http = ctx.http(Duration::from_secs(5))?;
        let mut req = http.get(url.as_str());
        if let Some(t) = &token {
            req = req.header("authorization", t.as_str());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| failed(crate::s3::transport::describe_error(&e)))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| failed(e.to_string()))?;
        if !status.is_success() {
            let detail: String = text.chars().take(200).collect();
            return Err(failed(format!("HTTP {}: {detail}", status.as_u16())));
        }
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| failed(format!("the answer is not JSON: {e}")))?;
        let mut fetched = credentials_from_json(&value, "Token").map_err(failed)?;
        if let Some(f) = &self.token_file {
            fetched.watch.push(f.clone());
        }
        Ok(fetched)
    }
}

/// The SDKs' rule for `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
fn check_full_uri(full: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(full)
        .map_err(|_| format!("AWS_CONTAINER_CREDENTIALS_FULL_URI {full:?} is not a URL"))?;
    if url.scheme() == "https" {
        return Ok(());
    }
    let host = url
        .host_str()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let allowed = host == "localhost"
        || match host.parse::<IpAddr>() {
            Ok(ip) => {
                ip.is_loopback()
                    || ["169.254.170.2", "169.254.170.23", "fd00:ec2::23"]
                        .iter()
                        .any(|a| a.parse::<IpAddr>().ok() == Some(ip))
            }
            Err(_) => false,
        };
    if url.scheme() == "http" && allowed {
        Ok(())
    } else {
        Err(format!(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI {full:?} must be https, or http to a loopback address, 169.254.170.2, 169.254.170.23 or fd00:ec2::23"
        ))
    }
}

impl Provider for Container {
    fn name(&self) -> String {
        match &self.url {
            Some(u) => format!("container credentials at {u}"),
            None => "container credentials".to_string(),
        }
    }

    fn fetch<'a>(&'a self, ctx: &'a Context) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        Box::pin(self.get(ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_uri_rules() {
        assert!(check_full_uri("http://127.0.0.1:8080/creds").is_ok());
        assert!(check_full_uri("http://169.254.170.23/v1/credentials").is_ok());
        assert!(check_full_uri("http://[fd00:ec2::23]/v1/credentials").is_ok());
        assert!(check_full_uri("http://[::1]:80/").is_ok());
        assert!(check_full_uri("https://creds.example.com/").is_ok());
        assert!(check_full_uri("http://creds.example.com/").is_err());
        assert!(check_full_uri("http://10.0.0.1/").is_err());
        assert!(check_full_uri("nope").is_err());
    }
}
