//! The two STS calls the credential chain needs, `AssumeRole` and
//! `AssumeRoleWithWebIdentity`, written on our signer and reqwest (no AWS SDK).
//!
//! Where STS is: `AWS_ENDPOINT_URL_STS` when set; otherwise the regional endpoint
//! `https://sts.REGION.amazonaws.com`, or the global `https://sts.amazonaws.com` (signed for
//! us-east-1) when `AWS_STS_REGIONAL_ENDPOINTS=legacy` and the region is one of those the
//! global endpoint served. Requests are form-encoded POSTs to `/`; `AssumeRole` is signed with
//! the source credentials by [`super::sigv4`], `AssumeRoleWithWebIdentity` is unsigned (the
//! token is the proof). Answers are XML, read with [`super::xml`].

use std::time::{Duration, SystemTime};

use time::OffsetDateTime;

use super::credentials::{parse_time, Credentials, Env, Fetched};
use super::sigv4::{self, SigningContext};
use super::xml;

/// The regions the global endpoint answered for before regional endpoints became the default.
const LEGACY_GLOBAL_REGIONS: &[&str] = &[
    "ap-northeast-1",
    "ap-south-1",
    "ap-southeast-1",
    "ap-southeast-2",
    "aws-global",
    "ca-central-1",
    "eu-central-1",
    "eu-north-1",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "sa-east-1",
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
];

/// Where STS requests go and the region they are signed for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsEndpoint {
    pub url: String,
    pub region: String,
}

impl StsEndpoint {
    /// The endpoint for `region` under this environment.
    pub fn from_env(env: &dyn Env, region: &str) -> Self {
        if let Some(url) = env.var("AWS_ENDPOINT_URL_STS") {
            return Self {
                url,
                region: region.to_string(),
            };
        }
        let legacy = env
            .var("AWS_STS_REGIONAL_ENDPOINTS")
            .is_some_and(|v| v.eq_ignore_ascii_case("legacy"));
        if legacy && LEGACY_GLOBAL_REGIONS.contains(&region) {
            return Self {
                url: "https://sts.amazonaws.com".to_string(),
                region: "us-east-1".to_string(),
            };
        }
        let domain = if region.starts_with("cn-") {
            "amazonaws.com.cn"
        } else {
            "amazonaws.com"
        };
        Self {
            url: format!("https://sts.{region}.{domain}"),
            region: region.to_string(),
        }
    }
}

/// The parameters of `AssumeRole` (and of `AssumeRoleWithWebIdentity`, which has no external
/// id).
#[derive(Debug, Clone, Default)]
pub struct RoleRequest {
    pub role_arn: String,
    pub session_name: String,
    pub external_id: Option<String>,
    pub duration_seconds: Option<u32>,
}

/// A session name for a role assumed without `role_session_name`.
pub fn default_session_name() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("s3mount-{secs}")
}

const TIMEOUT: Duration = Duration::from_secs(15);

/// `AssumeRole`, signed with `source`.
pub async fn assume_role(
    http: &reqwest::Client,
    sts: &StsEndpoint,
    source: &Credentials,
    role: &RoleRequest,
) -> Result<Fetched, String> {
    let mut form = vec![
        ("Action", "AssumeRole".to_string()),
        ("Version", "2011-06-15".to_string()),
        ("RoleArn", role.role_arn.clone()),
        ("RoleSessionName", role.session_name.clone()),
    ];
    if let Some(id) = &role.external_id {
        form.push(("ExternalId", id.clone()));
    }
    if let Some(d) = role.duration_seconds {
        form.push(("DurationSeconds", d.to_string()));
    }
    call(http, sts, "AssumeRole", &form, Some(source)).await
}

/// `AssumeRoleWithWebIdentity` with the OIDC `token`.
pub async fn assume_role_with_web_identity(
    http: &reqwest::Client,
    sts: &StsEndpoint,
    token: &str,
    role: &RoleRequest,
) -> Result<Fetched, String> {
    let mut form = vec![
        ("Action", "AssumeRoleWithWebIdentity".to_string()),
        ("Version", "2011-06-15".to_string()),
        ("RoleArn", role.role_arn.clone()),
        ("RoleSessionName", role.session_name.clone()),
        ("WebIdentityToken", token.to_string()),
    ];
    if let Some(d) = role.duration_seconds {
        form.push(("DurationSeconds", d.to_string()));
    }
    call(http, sts, "AssumeRoleWithWebIdentity", &form, None).await
}

/// `application/x-www-form-urlencoded`, every value percent-encoded.
pub fn form_body(form: &[(&str, String)]) -> String {
    form.iter()
        .map(|(k, v)| format!("{k}={}", sigv4::uri_encode(v, false)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Headers of a signed STS POST: `host`, `content-type`, and what [`sigv4::sign_headers`]
/// adds. The time is an argument, as everywhere in the signer.
pub fn signed_headers(
    host: &str,
    path: &str,
    body: &str,
    sts: &StsEndpoint,
    source: &Credentials,
    time: OffsetDateTime,
) -> Vec<(String, String)> {
    let mut headers = vec![
        ("host".to_string(), host.to_string()),
        (
            "content-type".to_string(),
            "application/x-www-form-urlencoded; charset=utf-8".to_string(),
        ),
    ];
    let ctx = SigningContext {
        credentials: source,
        region: &sts.region,
        service: "sts",
        time,
    };
    sigv4::sign_headers(
        "POST",
        path,
        &[],
        &mut headers,
        &sigv4::sha256_hex(body.as_bytes()),
        &ctx,
    );
    headers
}

async fn call(
    http: &reqwest::Client,
    sts: &StsEndpoint,
    action: &str,
    form: &[(&str, String)],
    source: Option<&Credentials>,
) -> Result<Fetched, String> {
    let url = reqwest::Url::parse(&sts.url)
        .map_err(|_| format!("STS endpoint {:?} is not a valid URL", sts.url))?;
    let Some(host) = url.host_str() else {
        return Err(format!("STS endpoint {:?} has no host", sts.url));
    };
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let path = if url.path().is_empty() {
        "/"
    } else {
        url.path()
    }
    .to_string();
    let body = form_body(form);
    let headers = match source {
        Some(creds) => signed_headers(
            &authority,
            &path,
            &body,
            sts,
            creds,
            OffsetDateTime::now_utc(),
        ),
        None => vec![(
            "content-type".to_string(),
            "application/x-www-form-urlencoded; charset=utf-8".to_string(),
        )],
    };
    let mut req = http.post(url.clone()).timeout(TIMEOUT).body(body);
    for (k, v) in &headers {
        if k != "host" {
            req = req.header(k.as_str(), v.as_str());
        }
    }
    let where_ = format!("STS {action} at {}", sts.url);
    let resp = req
        .send()
        .await
        .map_err(|e| format!("{where_}: {}", super::transport::describe_error(&e)))?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .map_err(|e| format!("{where_}: reading the answer: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "{where_}: {}",
            error_message(status.as_u16(), &text)
        ));
    }
    parse_credentials(&text, action).map_err(|e| format!("{where_}: {e}"))
}

/// `HTTP 403: AccessDenied: User ... is not authorized` from an STS `<ErrorResponse>`.
pub fn error_message(status: u16, text: &str) -> String {
    let doc = xml::parse(text).ok();
    let error = doc.as_ref().and_then(|d| {
        if d.name == "Error" {
            Some(d)
        } else {
            d.child("Error")
        }
    });
    match error {
        Some(e) => format!(
            "HTTP {status}: {}: {}",
            e.text_of("Code").unwrap_or("?"),
            e.text_of("Message").unwrap_or("")
        ),
        None => format!("HTTP {status}"),
    }
}

/// The credentials of an `AssumeRole[WithWebIdentity]Response`.
pub fn parse_credentials(text: &str, action: &str) -> Result<Fetched, String> {
    let root = xml::parse(text).map_err(|e| e.to_string())?;
    let creds = root
        .child(&format!("{action}Result"))
        .and_then(|r| r.child("Credentials"))
        .ok_or_else(|| format!("the answer has no {action}Result/Credentials"))?;
    let (Some(id), Some(secret), Some(token), Some(expiration)) = (
        creds.text_of("AccessKeyId"),
        creds.text_of("SecretAccessKey"),
        creds.text_of("SessionToken"),
        creds.text_of("Expiration"),
    ) else {
        return Err(
            "the answer lacks AccessKeyId, SecretAccessKey, SessionToken or Expiration".into(),
        );
    };
    let expires = parse_time(expiration)
        .ok_or_else(|| format!("Expiration {expiration:?} is not an RFC 3339 time"))?;
    Ok(Fetched::new(
        Credentials::new(id.trim(), secret.trim(), Some(token.trim())),
        Some(expires),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::credentials::FakeEnv;

    fn env(vars: &[(&str, &str)]) -> FakeEnv {
        FakeEnv::with(vars)
    }

    #[test]
    fn endpoint_choice() {
        assert_eq!(
            StsEndpoint::from_env(&env(&[]), "eu-west-1").url,
            "https://sts.eu-west-1.amazonaws.com"
        );
        let legacy = StsEndpoint::from_env(
            &env(&[("AWS_STS_REGIONAL_ENDPOINTS", "legacy")]),
            "eu-west-1",
        );
        assert_eq!(legacy.url, "https://sts.amazonaws.com");
        assert_eq!(legacy.region, "us-east-1");
        // Regions opened later never had the global endpoint.
        assert_eq!(
            StsEndpoint::from_env(
                &env(&[("AWS_STS_REGIONAL_ENDPOINTS", "legacy")]),
                "af-south-1"
            )
            .url,
            "https://sts.af-south-1.amazonaws.com"
        );
        assert_eq!(
            StsEndpoint::from_env(&env(&[]), "cn-north-1").url,
            "https://sts.cn-north-1.amazonaws.com.cn"
        );
        let custom = StsEndpoint::from_env(
            &env(&[("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:1234")]),
            "eu-west-1",
        );
        assert_eq!(custom.url, "http://127.0.0.1:1234");
        assert_eq!(custom.region, "eu-west-1");
    }

    const ASSUMED: &str = r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/demo/s</Arn><AssumedRoleId>ARO:s</AssumedRoleId></AssumedRoleUser>
    <Credentials>
      <AccessKeyId>ASIAEXAMPLE</AccessKeyId>
      <SecretAccessKey>secret/with+chars</SecretAccessKey>
      <SessionToken>token==</SessionToken>
      <Expiration>2030-07-15T23:28:33.359Z</Expiration>
    </Credentials>
  </AssumeRoleResult>
  <ResponseMetadata><RequestId>c6104cbe</RequestId></ResponseMetadata>
</AssumeRoleResponse>"#;

    #[test]
    fn responses_are_read() {
        let f = parse_credentials(ASSUMED, "AssumeRole").unwrap();
        assert_eq!(f.credentials.access_key_id(), "ASIAEXAMPLE");
        assert_eq!(f.credentials.secret_access_key(), "secret/with+chars");
        assert_eq!(f.credentials.session_token(), Some("token=="));
        assert!(f.expires.is_some());
        let web = ASSUMED.replace("AssumeRole", "AssumeRoleWithWebIdentity");
        assert!(parse_credentials(&web, "AssumeRoleWithWebIdentity").is_ok());
        assert!(parse_credentials(ASSUMED, "AssumeRoleWithWebIdentity").is_err());
        assert!(parse_credentials("<nope", "AssumeRole").is_err());
    }

    #[test]
    fn errors_are_read() {
        let text = r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>not authorized to perform sts:AssumeRole</Message></Error><RequestId>x</RequestId></ErrorResponse>"#;
        assert_eq!(
            error_message(403, text),
            "HTTP 403: AccessDenied: not authorized to perform sts:AssumeRole"
        );
        assert_eq!(error_message(502, "<html>"), "HTTP 502");
    }

    #[test]
    fn form_and_signature() {
        let body = form_body(&[
            ("Action", "AssumeRole".into()),
            ("RoleArn", "arn:aws:iam::1:role/a b".into()),
        ]);
        assert_eq!(
            body,
            "Action=AssumeRole&RoleArn=arn%3Aaws%3Aiam%3A%3A1%3Arole%2Fa%20b"
        );
        let sts = StsEndpoint {
            url: "https://sts.eu-west-1.amazonaws.com".into(),
            region: "eu-west-1".into(),
        };
        let creds = Credentials::new("AKID", "secret", Some("tok"));
        let t = time::macros::datetime!(2024-01-02 03:04:05 UTC);
        let headers = signed_headers("sts.eu-west-1.amazonaws.com", "/", &body, &sts, &creds, t);
        let auth = &headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .unwrap()
            .1;
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKID/20240102/eu-west-1/sts/aws4_request, SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date;x-amz-security-token, Signature="),
            "{auth}"
        );
        assert!(headers
            .iter()
            .any(|(k, v)| k == "x-amz-security-token" && v == "tok"));
    }
}
