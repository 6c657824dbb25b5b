//! Sharing objects without sharing keys: presigned URLs (`s3mount presign`) and browser upload
//! forms (`s3mount post-policy`).
//!
//! Both are signed by `sigv4.rs` with the same credential chain a mount uses, so whatever a
//! mount can do with its profile, role or instance credentials, these can hand out for a
//! while. Temporary credentials carry their session token into the URL
//! (`X-Amz-Security-Token`) or the form (`x-amz-security-token`), and nothing signed with them
//! works after they expire: a URL asked to live longer says so on stderr.
//!
//! A path inside a mount is signed by that mount (through its control socket), with its
//! bucket, prefix, endpoint and current credentials; an `s3://bucket/key` is signed here, with
//! credentials found as a mount would find them.
//!
//! `--public-endpoint` signs for another URL than the one requests go to: the host is part of
//! what is signed, so a bucket served under its own domain (a proxy that keeps the `Host`
//! header, a CDN in front of MinIO) needs URLs signed for that domain.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::{json, Map, Value};

use crate::s3::credentials::format_time;
use crate::s3::sigv4::PostPolicy;
use crate::s3::{Auth, ClientConfig, S3Client};

/// What to sign a URL for.
#[derive(Debug, Clone)]
pub struct UrlRequest {
    pub key: String,
    pub method: String,
    pub expires: Duration,
    pub public_endpoint: Option<String>,
}

/// What an upload form allows.
#[derive(Debug, Clone)]
pub struct FormRequest {
    /// Keys must start with this.
    pub prefix: String,
    pub expires: Duration,
    pub max_size: Option<u64>,
    pub content_type: Option<String>,
    pub acl: Option<String>,
    pub public_endpoint: Option<String>,
}

fn client_for(cfg: &ClientConfig, public_endpoint: Option<&str>) -> Result<S3Client, String> {
    if matches!(cfg.auth, Auth::Anonymous) {
        return Err(
            "signing needs credentials; without them (--no-sign-request) there is nothing to sign with"
                .into(),
        );
    }
    let mut cfg = cfg.clone();
    if let Some(p) = public_endpoint {
        cfg.endpoint_url = Some(p.trim_end_matches('/').to_string());
    }
    S3Client::new(cfg).map_err(|e| e.to_string())
}

/// A warning when what is signed outlives the temporary credentials it is signed with.
fn expiry_warning(cfg: &ClientConfig, expires: Duration) -> Option<String> {
    let Auth::Chain(shared) = &cfg.auth else {
        return None;
    };
    let until = shared.snapshot().expires?;
    (SystemTime::now() + expires > until).then(|| {
        format!(
            "the credentials from {} expire at {}: what is signed with them stops working then",
            shared.provider_name(),
            format_time(until)
        )
    })
}

/// A presigned URL, and a warning if it will stop working early.
pub fn presign_url(
    cfg: &ClientConfig,
    req: &UrlRequest,
) -> Result<(String, Option<String>), String> {
    let method = req.method.to_ascii_uppercase();
    if !matches!(method.as_str(), "GET" | "PUT" | "HEAD" | "DELETE") {
        return Err(format!(
            "--method {} is not one of GET, PUT, HEAD, DELETE",
            req.method
        ));
    }
    if req.key.is_empty() {
        return Err("there is no key to sign for (give s3://BUCKET/KEY or a file)".into());
    }
    let client = client_for(cfg, req.public_endpoint.as_deref())?;
    let url = client
        .presigned_url(
            &method,
            &req.key,
            req.expires,
            time::OffsetDateTime::now_utc(),
        )
        .map_err(|e| e.to_string())?;
    Ok((url, expiry_warning(cfg, req.expires)))
}

/// The upload form: `{"url", "fields", "expires"}` (and `"warning"`).
pub fn post_form(cfg: &ClientConfig, req: &FormRequest) -> Result<Value, String> {
    let client = client_for(cfg, req.public_endpoint.as_deref())?;
    let now = time::OffsetDateTime::now_utc();
    let secs = i64::try_from(req.expires.as_secs()).unwrap_or(i64::MAX);
    if secs == 0 {
        return Err("--expires must be at least one second".into());
    }
    let expiration = now + time::Duration::seconds(secs.min(7 * 86_400 * 52));
    let mut policy = PostPolicy::new(expiration)
        .exact("bucket", &cfg.bucket)
        .starts_with("key", &req.prefix)
        .exact("success_action_status", "201");
    let mut fields = Map::new();
    fields.insert("key".into(), json!(format!("{}${{filename}}", req.prefix)));
    fields.insert("success_action_status".into(), json!("201"));
    if let Some(max) = req.max_size {
        policy = policy.content_length_range(0, max);
    }
    if let Some(ct) = &req.content_type {
        policy = policy.starts_with("Content-Type", ct);
        fields.insert("Content-Type".into(), json!(ct));
    }
    if let Some(acl) = &req.acl {
        policy = policy.exact("acl", acl);
        fields.insert("acl".into(), json!(acl));
    }
    let (url, signed) = client
        .post_policy_form(&policy, now)
        .ok_or("the credentials expired and could not be renewed; nothing to sign with")?;
    for (name, value) in signed.form_fields() {
        fields.insert(name.into(), json!(value));
    }
    let mut out = json!({
        "url": url,
        "fields": fields,
        "expires": format_time(SystemTime::from(expiration)),
    });
    if let Some(w) = expiry_warning(cfg, req.expires) {
        out["warning"] = json!(w);
    }
    Ok(out)
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A ready HTML page with the upload form.
pub fn html_form(form: &Value) -> String {
    let url = form["url"].as_str().unwrap_or("");
    let mut inputs = String::new();
    for (name, value) in form["fields"].as_object().into_iter().flatten() {
        let value = value.as_str().unwrap_or("");
        let kind = if name == "Content-Type" {
            "text"
        } else {
            "hidden"
        };
        let label = if kind == "text" {
            "<label>Content-Type (must start with the value shown) "
        } else {
            ""
        };
        inputs.push_str(&format!(
            "    {label}<input type=\"{kind}\" name=\"{}\" value=\"{}\">{}\n",
            html_escape(name),
            html_escape(value),
            if kind == "text" { "</label><br>" } else { "" }
        ));
    }
    format!(
        "<!DOCTYPE html>\n<html>\n<head><meta charset=\"utf-8\"><title>Upload</title></head>\n<body>\n\
         <!-- made by s3mount post-policy; valid until {} -->\n\
         <form action=\"{}\" method=\"post\" enctype=\"multipart/form-data\">\n{inputs}\
         \x20   <input type=\"file\" name=\"file\">\n    <input type=\"submit\" value=\"Upload\">\n\
         </form>\n</body>\n</html>\n",
        html_escape(form["expires"].as_str().unwrap_or("")),
        html_escape(url),
    )
}

/// `s3://bucket/key` split; the key may be empty.
pub fn parse_s3_url(s: &str) -> Option<(String, String)> {
    let rest = s.strip_prefix("s3://")?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    (!bucket.is_empty()).then(|| (bucket.to_string(), key.to_string()))
}

/// A path inside an s3mount mount: the mount point, and the path below it (`dir/file`).
pub fn locate_in_mount(path: &Path) -> Result<(crate::fusemount::MountEntry, String), String> {
    // A file to be uploaded with PUT need not exist yet: its directory must.
    let absolute = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(_) => {
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let name = path
                .file_name()
                .ok_or_else(|| format!("{} is not a file path", path.display()))?;
            std::fs::canonicalize(parent)
                .map_err(|e| format!("{}: {e}", parent.display()))?
                .join(name)
        }
    };
    let mount = crate::fusemount::mounts()
        .into_iter()
        .filter(|m| m.fstype == crate::fusemount::FSTYPE && absolute.starts_with(&m.mountpoint))
        .max_by_key(|m| m.mountpoint.as_os_str().len())
        .ok_or_else(|| {
            format!(
                "{} is not inside an s3mount mount; give s3://BUCKET/KEY instead",
                path.display()
            )
        })?;
    let rel: PathBuf = absolute
        .strip_prefix(&mount.mountpoint)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let rel = rel
        .to_str()
        .ok_or_else(|| format!("{} is not UTF-8, so it is no S3 key", path.display()))?
        .to_string();
    Ok((mount, rel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::Credentials;

    fn cfg(token: Option<&str>) -> ClientConfig {
        let mut c = ClientConfig::new(
            "bkt",
            "us-east-1",
            Auth::Signed(Credentials::new("AKIDEXAMPLE", "secret", token)),
        );
        c.endpoint_url = Some("http://127.0.0.1:9".into());
        c
    }

    #[test]
    fn temporary_credentials_put_the_token_in_url_and_form() {
        let req = UrlRequest {
            key: "a b.txt".into(),
            method: "get".into(),
            expires: Duration::from_secs(3600),
            public_endpoint: Some("https://files.example.com".into()),
        };
        let (url, _) = presign_url(&cfg(Some("TOKEN/x")), &req).unwrap();
        assert!(
            url.starts_with("https://files.example.com/bkt/a%20b.txt?"),
            "{url}"
        );
        assert!(url.contains("X-Amz-Security-Token=TOKEN%2Fx"), "{url}");
        assert!(url.contains("X-Amz-Expires=3600"), "{url}");
        assert!(!url.contains("secret"));
        let form = post_form(
            &cfg(Some("TOKEN")),
            &FormRequest {
                prefix: "up/".into(),
                expires: Duration::from_secs(600),
                max_size: Some(1000),
                content_type: Some("image/".into()),
                acl: Some("private".into()),
                public_endpoint: None,
            },
        )
        .unwrap();
        assert_eq!(form["fields"]["x-amz-security-token"], "TOKEN");
        assert_eq!(form["fields"]["key"], "up/${filename}");
        assert_eq!(form["url"], "http://127.0.0.1:9/bkt");
        let html = html_form(&form);
        assert!(
            html.contains("name=\"x-amz-security-token\" value=\"TOKEN\""),
            "{html}"
        );
        assert!(html.contains("action=\"http://127.0.0.1:9/bkt\""));
        let bad = UrlRequest {
            method: "POST".into(),
            ..req
        };
        assert!(presign_url(&cfg(None), &bad)
            .unwrap_err()
            .contains("--method"));
    }

    #[test]
    fn s3_urls_split_into_bucket_and_key() {
        assert_eq!(
            parse_s3_url("s3://b/dir/k"),
            Some(("b".into(), "dir/k".into()))
        );
        assert_eq!(parse_s3_url("s3://b"), Some(("b".into(), String::new())));
        assert_eq!(parse_s3_url("/mnt/x"), None);
    }
}
