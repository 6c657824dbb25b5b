//! IAM Identity Center (SSO): the access token that `aws sso login` cached in
//! `~/.aws/sso/cache/SHA1.json` is exchanged for role credentials with the portal's
//! GetRoleCredentials (`GET /federation/credentials?account_id=..&role_name=..` with header
//! `x-amz-sso_bearer_token`). We never log in ourselves: an expired or missing token is an
//! error that says to run `aws sso login`.
//!
//! A profile names `sso_account_id` and `sso_role_name`, and either `sso_session = NAME` (a
//! `[sso-session NAME]` section with `sso_start_url` and `sso_region`; the cache file is the
//! SHA-1 of NAME) or, in the legacy form, `sso_start_url` and `sso_region` itself (the cache
//! file is the SHA-1 of the URL). The portal is `https://portal.sso.REGION.amazonaws.com`,
//! or `AWS_ENDPOINT_URL_SSO`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha1::{Digest, Sha1};

use super::{parse_time, Context, Credentials, Fetched, ProviderError, SharedFiles};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SsoSettings {
    pub start_url: String,
    pub region: String,
    pub account_id: String,
    pub role_name: String,
    /// What the cache file is named after: the session name, or the start URL.
    pub cache_key: String,
    pub session: Option<String>,
}

/// The SSO settings of a profile; a key that is missing is named in the error.
pub fn settings(
    profile: &str,
    section: &HashMap<String, String>,
    files: &SharedFiles,
) -> Result<SsoSettings, String> {
    let get = |s: &HashMap<String, String>, k: &str, whose: &str| {
        s.get(k)
            .cloned()
            .ok_or_else(|| format!("{whose} has no {k}"))
    };
    let whose = format!("profile '{profile}'");
    let account_id = get(section, "sso_account_id", &whose)?;
    let role_name = get(section, "sso_role_name", &whose)?;
    match section.get("sso_session") {
        Some(name) => {
            let session = files.sso_session(name).ok_or_else(|| {
                format!(
                    "{whose} names sso_session '{name}', but {} has no [sso-session {name}]",
                    files.config_path.display()
                )
            })?;
            let whose = format!("[sso-session {name}]");
            Ok(SsoSettings {
                start_url: get(session, "sso_start_url", &whose)?,
                region: get(session, "sso_region", &whose)?,
                account_id,
                role_name,
                cache_key: name.clone(),
                session: Some(name.clone()),
            })
        }
        None => {
            let start_url = get(section, "sso_start_url", &whose)?;
            Ok(SsoSettings {
                region: get(section, "sso_region", &whose)?,
                account_id,
                role_name,
                cache_key: start_url.clone(),
                start_url,
                session: None,
            })
        }
    }
}

pub fn cache_file(cache_dir: &Path, key: &str) -> PathBuf {
    cache_dir.join(format!(
        "{}.json",
        hex::encode(Sha1::digest(key.as_bytes()))
    ))
}

/// The access token and its expiry from a cache file.
pub fn parse_cache(text: &str) -> Result<(String, SystemTime), String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("is not JSON ({e})"))?;
    let token = v
        .get("accessToken")
        .and_then(|t| t.as_str())
        .ok_or("has no accessToken")?;
    let expires = v
        .get("expiresAt")
        .and_then(|t| t.as_str())
        .ok_or("has no expiresAt")?;
    // Old CLI versions wrote `2019-11-14T04:05:45UTC`.
    let normalized = match expires.strip_suffix("UTC") {
        Some(t) => format!("{t}Z"),
        None => expires.to_string(),
    };
    let at =
        parse_time(&normalized).ok_or_else(|| format!("has expiresAt {expires:?}, not a time"))?;
    Ok((token.to_string(), at))
}

/// GetRoleCredentials' answer: `{"roleCredentials": {accessKeyId, secretAccessKey,
/// sessionToken, expiration (milliseconds since the epoch)}}`.
pub fn parse_role_credentials(text: &str) -> Result<Fetched, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("the answer is not JSON ({e})"))?;
    let rc = v
        .get("roleCredentials")
        .ok_or("the answer has no roleCredentials")?;
    let field = |k: &str| rc.get(k).and_then(|x| x.as_str());
    let (Some(id), Some(secret)) = (field("accessKeyId"), field("secretAccessKey")) else {
        return Err("the answer has no accessKeyId and secretAccessKey".into());
    };
    let expires = rc
        .get("expiration")
        .and_then(|x| x.as_u64())
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
    Ok(Fetched::new(
        Credentials::new(id, secret, field("sessionToken")),
        expires,
    ))
}

pub async fn fetch(
    s: &SsoSettings,
    cache_dir: &Path,
    portal: Option<&str>,
    ctx: &Context,
    origin: &str,
) -> Result<Fetched, ProviderError> {
    let login = match &s.session {
        Some(name) => format!("aws sso login --sso-session {name}"),
        None => "aws sso login".to_string(),
    };
    let failed = |what: String| ProviderError::Failed(format!("{origin} (SSO): {what}"));
    let file = cache_file(cache_dir, &s.cache_key);
    let text = std::fs::read_to_string(&file).map_err(|e| {
        failed(format!(
            "no cached SSO token at {} ({e}); run `{login}`",
            file.display()
        ))
    })?;
    let (token, token_expires) = parse_cache(&text)
        .map_err(|e| failed(format!("the SSO cache file {} {e}", file.display())))?;
    if token_expires <= SystemTime::now() {
        return Err(failed(format!(
            "the SSO token expired at {}; run `{login}`",
            super::format_time(token_expires)
        )));
    }
    let base = portal
        .map(|p| p.trim_end_matches('/').to_string())
        .unwrap_or_else(|| format!("https://portal.sso.{}.amazonaws.com", s.region));
    let url = format!("{base}/federation/credentials");
    let http = ctx.http(Duration::from_secs(20))?;
    let resp = http
        .get(&url)
        .query(&[("account_id", &s.account_id), ("role_name", &s.role_name)])
        .header("x-amz-sso_bearer_token", token)
        .send()
        .await
        .map_err(|e| {
            failed(format!(
                "{url}: {}",
                crate::s3::transport::describe_error(&e)
            ))
        })?;
    let status = resp.status();
    let body = resp
        .text()
        .await
        .map_err(|e| failed(format!("{url}: {e}")))?;
    if status.as_u16() == 401 || status.as_u16() == 403 {
        return Err(failed(format!(
            "the portal refused the cached token (HTTP {}); run `{login}`",
            status.as_u16()
        )));
    }
    if !status.is_success() {
        let detail: String = body.chars().take(200).collect();
        return Err(failed(format!("{url}: HTTP {}: {detail}", status.as_u16())));
    }
    let mut fetched = parse_role_credentials(&body).map_err(|e| failed(format!("{url}: {e}")))?;
    fetched.watch.push(file);
    Ok(fetched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_names_and_contents() {
        // SHA-1 of "my-sso", as the CLI names the file.
        let f = cache_file(Path::new("/c"), "my-sso");
        assert_eq!(
            f,
            Path::new("/c").join(format!("{}.json", hex::encode(Sha1::digest(b"my-sso"))))
        );
        assert_eq!(
            cache_file(Path::new("/c"), "abc"),
            Path::new("/c/a9993e364706816aba3e25717850c26c9cd0d89d.json")
        );
        let (t, _) = parse_cache(
            r#"{"accessToken":"tok","expiresAt":"2030-01-01T00:00:00Z","region":"eu-west-1"}"#,
        )
        .unwrap();
        assert_eq!(t, "tok");
        assert!(
            parse_cache(r#"{"accessToken":"tok","expiresAt":"2030-01-01T00:00:00UTC"}"#).is_ok()
        );
        assert!(parse_cache(r#"{"expiresAt":"2030-01-01T00:00:00Z"}"#).is_err());
    }

    #[test]
    fn role_credentials() {
        let f = parse_role_credentials(r#"{"roleCredentials":{"accessKeyId":"ASIA","secretAccessKey":"s","sessionToken":"t","expiration":1893456000000}}"#).unwrap();
        assert_eq!(f.credentials.access_key_id(), "ASIA");
        assert_eq!(
            super::super::format_time(f.expires.unwrap()),
            "2030-01-01T00:00:00Z"
        );
        assert!(parse_role_credentials("{}").is_err());
    }

    #[test]
    fn settings_of_both_forms() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        std::fs::write(&config, "[profile a]\nsso_session = corp\nsso_account_id = 111\nsso_role_name = R\n[sso-session corp]\nsso_start_url = https://corp.awsapps.com/start\nsso_region = eu-west-1\n[profile b]\nsso_start_url = https://old/start\nsso_region = us-east-1\nsso_account_id = 222\nsso_role_name = R\n[profile c]\nsso_session = nope\nsso_account_id = 1\nsso_role_name = R\n").unwrap();
        let files = SharedFiles {
            credentials_path: dir.path().join("credentials"),
            config_path: config,
            ..Default::default()
        }
        .load();
        let a = settings("a", &files.profile("a").unwrap(), &files).unwrap();
        assert_eq!(
            (a.cache_key.as_str(), a.region.as_str()),
            ("corp", "eu-west-1")
        );
        let b = settings("b", &files.profile("b").unwrap(), &files).unwrap();
        assert_eq!(b.cache_key, "https://old/start");
        let c = settings("c", &files.profile("c").unwrap(), &files).unwrap_err();
        assert!(c.contains("sso-session nope"), "{c}");
    }
}
