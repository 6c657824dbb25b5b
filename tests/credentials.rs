//! The credential chain through the real binary and a real mount: each provider against a
//! stand-in of its AWS service on 127.0.0.1 (`common::standin`), answering with keys the test
//! S3 server accepts. The STS stand-in checks our SigV4 signature with its own code.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::mount::{command, mount_with, run_to_exit, Mounted};
use common::standin::{RecordingProxy, Reply, Served, StandIn};
use common::{pattern, read_object, unique_prefix, ServerEnv};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// The server's endpoint and region but no keys: the chain must find them.
fn keyless(env: &ServerEnv, home: &Path) -> Command {
    let mut cmd = command(env);
    cmd.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("HOME", home);
    cmd
}

fn aws_dir(home: &Path, credentials: &str, config: &str) {
    std::fs::create_dir_all(home.join(".aws")).unwrap();
    std::fs::write(home.join(".aws/credentials"), credentials).unwrap();
    std::fs::write(home.join(".aws/config"), config).unwrap();
}

/// Writes a file through the mount, reads it back through the mount and directly from S3.
async fn write_and_read(env: &ServerEnv, m: &Mounted, prefix: &str, name: &str) {
    let data = pattern(300_000, name.len() as u64);
    std::fs::write(m.path().join(name), &data).unwrap();
    assert_eq!(
        std::fs::read(m.path().join(name)).unwrap(),
        data,
        "read back through the mount"
    );
    let stored = read_object(&env.client(), &format!("{prefix}{name}"), None).await;
    assert_eq!(&stored[..], &data[..], "stored in S3");
}

fn credentials_json(
    env: &ServerEnv,
    token: &str,
    expires: SystemTime,
    token_field: &str,
) -> String {
    format!(
        r#"{{"Code":"Success","Type":"AWS-HMAC","AccessKeyId":"{}","SecretAccessKey":"{}","{token_field}":"{token}","Expiration":"{}"}}"#,
        env.access_key_id,
        env.secret_access_key,
        rfc3339(expires)
    )
}

fn log_line<'a>(log: &'a str, needle: &str) -> &'a str {
    log.lines().find(|l| l.contains(needle)).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread")]
async fn imds_v2_gives_credentials_and_region() {
    let env = ServerEnv::main();
    let home = tempfile::tempdir().unwrap();
    let creds = {
        let (id, secret) = (env.access_key_id.clone(), env.secret_access_key.clone());
        move |req: &Served| -> Reply {
            const TOKEN: &str = "imds-session-token";
            match (req.method.as_str(), req.path()) {
                ("PUT", "/latest/api/token") => {
                    match req.header("x-aws-ec2-metadata-token-ttl-seconds") {
                        Some(_) => Reply::text(200, TOKEN),
                        None => Reply::text(400, "missing TTL"),
                    }
                }
                _ if req.header("x-aws-ec2-metadata-token") != Some(TOKEN) => Reply::text(401, ""),
                ("GET", "/latest/meta-data/iam/security-credentials/") => {
                    Reply::text(200, "test-role")
                }
                ("GET", "/latest/meta-data/iam/security-credentials/test-role") => {
                    Reply::json(format!(
                        r#"{{"Code":"Success","AccessKeyId":"{id}","SecretAccessKey":"{secret}","Token":"imds-token","Expiration":"{}"}}"#,
                        rfc3339(SystemTime::now() + Duration::from_secs(6 * 3600))
                    ))
                }
                ("GET", "/latest/meta-data/placement/region") => Reply::text(200, env_region()),
                _ => Reply::text(404, ""),
            }
        }
    };
    let imds = StandIn::start(creds);
    let prefix = unique_prefix("imds");
    let mut cmd = keyless(&env, home.path());
    cmd.env_remove("AWS_EC2_METADATA_DISABLED")
        .env_remove("AWS_REGION")
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url());
    let m = mount_with(cmd, &format!("{}:{prefix}", env.bucket), &[]);
    write_and_read(&env, &m, &prefix, "from-imds.bin").await;
    let served = imds.served();
    assert!(
        served.iter().any(|r| r.method == "PUT"),
        "IMDSv2 session token asked for"
    );
    assert!(
        served
            .iter()
            .any(|r| r.path() == "/latest/meta-data/placement/region"),
        "region asked of IMDS when none is configured"
    );
    assert!(served
        .iter()
        .all(|r| r.method == "PUT" || r.header("x-aws-ec2-metadata-token").is_some()));
    let log = m.log();
    let line = log_line(&log, "credentials");
    assert!(line.contains("IMDSv2") && line.contains("expires"), "{log}");
    assert!(
        !log.contains(&env.secret_access_key),
        "no secret in the log"
    );
}

fn env_region() -> String {
    std::env::var("S3MOUNT_TEST_REGION").unwrap_or_else(|_| "us-east-1".into())
}

#[tokio::test(flavor = "multi_thread")]
async fn container_credentials_with_a_token_file() {
    let env = ServerEnv::main();
    let home = tempfile::tempdir().unwrap();
    let token_file = home.path().join("eks-pod-identity-token");
    std::fs::write(&token_file, "pod-token-1\n").unwrap();
    let agent = {
        let env_copy = ServerEnv::main();
        StandIn::start(move |req| match req.header("authorization") {
            Some("pod-token-1") if req.path() == "/v1/credentials" => {
                Reply::json(credentials_json(
                    &env_copy,
                    "container-token",
                    SystemTime::now() + Duration::from_secs(3600),
                    "Token",
                ))
            }
            _ => Reply::text(403, "bad token"),
        })
    };
    let prefix = unique_prefix("container");
    let mut cmd = keyless(&env, home.path());
    cmd.env(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        format!("{}/v1/credentials", agent.url()),
    )
    .env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &token_file);
    let m = mount_with(cmd, &format!("{}:{prefix}", env.bucket), &[]);
    write_and_read(&env, &m, &prefix, "from-container.bin").await;
    assert_eq!(
        agent.count(|r| r.header("authorization") == Some("pod-token-1")),
        agent.served().len()
    );
    assert!(log_line(&m.log(), "credentials").contains("container credentials"));
}

/// Checks an AWS SigV4 `Authorization` header the way a server does, written here from the
/// specification, independently of the client's signer.
fn verify_sigv4(req: &Served, secret: &str, service: &str) -> Result<String, String> {
    let auth = req
        .header("authorization")
        .ok_or("no authorization header")?;
    let rest = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("not AWS4-HMAC-SHA256")?;
    let mut parts = HashMap::new();
    for p in rest.split(", ") {
        let (k, v) = p.split_once('=').ok_or("malformed authorization")?;
        parts.insert(k, v);
    }
    let credential = parts.get("Credential").ok_or("no Credential")?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [key_id, date, region, svc, "aws4_request"] = scope[..] else {
        return Err(format!("bad credential scope {credential}"));
    };
    if svc != service {
        return Err(format!("signed for service {svc}, not {service}"));
    }
    let signed_headers = parts.get("SignedHeaders").ok_or("no SignedHeaders")?;
    let mut canonical_headers = String::new();
    for name in signed_headers.split(';') {
        let value = req
            .header(name)
            .ok_or(format!("signed header {name} not sent"))?;
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        canonical_headers.push_str(&format!("{name}:{value}\n"));
    }
    for required in ["host", "x-amz-date"] {
        if !signed_headers.split(';').any(|h| h == required) {
            return Err(format!("{required} is not signed"));
        }
    }
    let payload = hex::encode(Sha256::digest(&req.body));
    let canonical = format!(
        "{}\n{}\n{}\n{canonical_headers}\n{signed_headers}\n{payload}",
        req.method,
        req.path(),
        req.query()
    );
    let amz_date = req.header("x-amz-date").ok_or("no x-amz-date")?;
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{date}/{region}/{svc}/aws4_request\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let hmac = |key: &[u8], data: &str| {
        let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
        m.update(data.as_bytes());
        m.finalize().into_bytes().to_vec()
    };
    let k = hmac(format!("AWS4{secret}").as_bytes(), date);
    let k = hmac(&k, region);
    let k = hmac(&k, svc);
    let k = hmac(&k, "aws4_request");
    let want = hex::encode(hmac(&k, &to_sign));
    if parts.get("Signature") == Some(&want.as_str()) {
        Ok(key_id.to_string())
    } else {
        Err("signature does not match".into())
    }
}

/// The access key id an `Authorization` header names.
fn signing_key_id(req: &Served) -> Option<String> {
    let auth = req.header("authorization")?;
    let credential = auth.split("Credential=").nth(1)?;
    Some(credential.split('/').next()?.to_string())
}

const SOURCE_KEY: &str = "AKIDSOURCEKEY";
const SOURCE_SECRET: &str = "source/secret+key";

/// STS: `AssumeRole` must be signed with the source keys; role `denied` is refused;
/// `AssumeRoleWithWebIdentity` must carry the expected token. Answers with the S3 server's
/// keys and a session token valid for `lifetime`.
fn sts_standin(lifetime: Duration) -> StandIn {
    let env = ServerEnv::main();
    StandIn::start(move |req| {
        let error = |status: u16, code: &str, msg: &str| {
            Reply::xml(
                status,
                format!(
                    r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>{code}</Code><Message>{msg}</Message></Error><RequestId>r</RequestId></ErrorResponse>"#
                ),
            )
        };
        let action = req.form("Action").unwrap_or_default();
        match action.as_str() {
            "AssumeRole" => {
                // The source keys, or keys this stand-in issued (a chain of roles).
                let secret = match signing_key_id(req) {
                    Some(k) if k == SOURCE_KEY => SOURCE_SECRET,
                    Some(k) if k == env.access_key_id => env.secret_access_key.as_str(),
                    other => {
                        return error(
                            403,
                            "InvalidClientTokenId",
                            &format!("unknown key {other:?}"),
                        )
                    }
                };
                if let Err(e) = verify_sigv4(req, secret, "sts") {
                    return error(403, "SignatureDoesNotMatch", &e);
                }
            }
            "AssumeRoleWithWebIdentity" => {
                if req.header("authorization").is_some() {
                    return error(
                        400,
                        "InvalidRequest",
                        "AssumeRoleWithWebIdentity is not signed",
                    );
                }
                if req.form("WebIdentityToken").as_deref() != Some("oidc-token-value") {
                    return error(400, "InvalidIdentityToken", "wrong token");
                }
            }
            _ => return error(400, "InvalidAction", "unknown action"),
        }
        let role = req.form("RoleArn").unwrap_or_default();
        if role.ends_with("/denied") {
            return error(
                403,
                "AccessDenied",
                "User is not authorized to perform: sts:AssumeRole on resource",
            );
        }
        Reply::xml(
            200,
            format!(
                "<{action}Response xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><{action}Result><Credentials>\
                 <AccessKeyId>{}</AccessKeyId><SecretAccessKey>{}</SecretAccessKey><SessionToken>sts-token-{}</SessionToken>\
                 <Expiration>{}</Expiration></Credentials></{action}Result></{action}Response>",
                env.access_key_id,
                env.secret_access_key,
                fastrand::u32(..),
                rfc3339(SystemTime::now() + lifetime)
            ),
        )
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn assume_role_profile_is_signed_by_our_signer() {
    let env = ServerEnv::main();
    let home = tempfile::tempdir().unwrap();
    let sts = sts_standin(Duration::from_secs(3600));
    aws_dir(
        home.path(),
        &format!("[base]\naws_access_key_id = {SOURCE_KEY}\naws_secret_access_key = {SOURCE_SECRET}\n"),
        "[profile ci]\nrole_arn = arn:aws:iam::123456789012:role/s3mount-ci\nsource_profile = base\n\
         external_id = ext-42\nrole_session_name = nightly\nduration_seconds = 1800\n",
    );
    let prefix = unique_prefix("assume-role");
    let mut cmd = keyless(&env, home.path());
    cmd.env("AWS_ENDPOINT_URL_STS", sts.url());
    let m = mount_with(
        cmd,
        &format!("{}:{prefix}", env.bucket),
        &["--profile", "ci"],
    );
    write_and_read(&env, &m, &prefix, "from-role.bin").await;
    let calls = sts.served();
    assert_eq!(calls.len(), 1, "one AssumeRole at mount time");
    let call = &calls[0];
    assert_eq!(
        verify_sigv4(call, SOURCE_SECRET, "sts").as_deref(),
        Ok(SOURCE_KEY)
    );
    assert_eq!(
        call.form("RoleArn").as_deref(),
        Some("arn:aws:iam::123456789012:role/s3mount-ci")
    );
    assert_eq!(call.form("ExternalId").as_deref(), Some("ext-42"));
    assert_eq!(call.form("RoleSessionName").as_deref(), Some("nightly"));
    assert_eq!(call.form("DurationSeconds").as_deref(), Some("1800"));
    let auth = call.header("authorization").unwrap();
    assert!(
        auth.contains(&format!("/{}/sts/aws4_request", env_region())),
        "{auth}"
    );
    assert!(log_line(&m.log(), "credentials").contains("profile 'ci'"));
}

/// A chain of two roles whose first source is `credential_source = EcsContainer`: each
/// AssumeRole is signed with the credentials (and session token) of the step before.
#[tokio::test(flavor = "multi_thread")]
async fn role_chain_from_a_container_credential_source() {
    let env = ServerEnv::main();
    let home = tempfile::tempdir().unwrap();
    let sts = sts_standin(Duration::from_secs(3600));
    let agent = StandIn::start(|_req| {
        Reply::json(format!(
            r#"{{"AccessKeyId":"{SOURCE_KEY}","SecretAccessKey":"{SOURCE_SECRET}","Token":"task-token","Expiration":"{}"}}"#,
            rfc3339(SystemTime::now() + Duration::from_secs(3600))
        ))
    });
    aws_dir(
        home.path(),
        "",
        "[profile inner]\nrole_arn = arn:aws:iam::111111111111:role/inner\ncredential_source = EcsContainer\n\
         [profile outer]\nrole_arn = arn:aws:iam::222222222222:role/outer\nsource_profile = inner\n",
    );
    let prefix = unique_prefix("role-chain");
    let mut cmd = keyless(&env, home.path());
    cmd.env("AWS_ENDPOINT_URL_STS", sts.url()).env(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        format!("{}/creds", agent.url()),
    );
    let m = mount_with(
        cmd,
        &format!("{}:{prefix}", env.bucket),
        &["-o", "profile=outer"],
    );
    write_and_read(&env, &m, &prefix, "from-role-chain.bin").await;
    let calls = sts.served();
    assert_eq!(calls.len(), 2, "two AssumeRole calls");
    assert_eq!(
        calls[0].form("RoleArn").as_deref(),
        Some("arn:aws:iam::111111111111:role/inner")
    );
    assert_eq!(signing_key_id(&calls[0]).as_deref(), Some(SOURCE_KEY));
    assert_eq!(calls[0].header("x-amz-security-token"), Some("task-token"));
    assert_eq!(
        calls[1].form("RoleArn").as_deref(),
        Some("arn:aws:iam::222222222222:role/outer")
    );
    assert_eq!(signing_key_id(&calls[1]), Some(env.access_key_id.clone()));
    assert!(calls[1]
        .header("x-amz-security-token")
        .is_some_and(|t| t.starts_with("sts-token-")));
    assert_eq!(agent.served().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn web_identity_from_the_environment() {
    let env = ServerEnv::main();
    let home = tempfile::tempdir().unwrap();
    let sts = sts_standin(Duration::from_secs(3600));
    let token = home.path().join("token");
    std::fs::write(&token, "oidc-token-value\n").unwrap();
    let prefix = unique_prefix("web-identity");
    let mut cmd = keyless(&env, home.path());
    cmd.env("AWS_ENDPOINT_URL_STS", sts.url())
        .env("AWS_WEB_IDENTITY_TOKEN_FILE", &token)
        .env("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/irsa")
        .env("AWS_ROLE_SESSION_NAME", "pod-a");
    let m = mount_with(cmd, &format!("{}:{prefix}", env.bucket), &[]);
    write_and_read(&env, &m, &prefix, "from-web-identity.bin").await;
    let calls = sts.served();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].form("Action").as_deref(),
        Some("AssumeRoleWithWebIdentity")
    );
    assert_eq!(calls[0].form("RoleSessionName").as_deref(), Some("pod-a"));
    assert!(log_line(&m.log(), "credentials").contains("web identity"));
}

#[tokio::test(flavor = "multi_thread")]
async fn credential_process_profile() {
    let env = ServerEnv::main();
    let home = tempfile::tempdir().unwrap();
    let script = home.path().join("my creds.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho run >> \"$(dirname \"$0\")/runs\"\nprintf '%s' '{{\"Version\": 1, \"AccessKeyId\": \"{}\", \"SecretAccessKey\": \"{}\", \"SessionToken\": \"process-token\", \"Expiration\": \"{}\"}}'\n",
            env.access_key_id,
            env.secret_access_key,
            rfc3339(SystemTime::now() + Duration::from_secs(3600))
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    aws_dir(
        home.path(),
        "",
        &format!(
            "[profile tool]\ncredential_process = \"{}\" --flag\n",
            script.display()
        ),
    );
    let prefix = unique_prefix("process");
    let mut cmd = keyless(&env, home.path());
    cmd.env("AWS_PROFILE", "tool");
    let m = mount_with(cmd, &format!("{}:{prefix}", env.bucket), &[]);
    write_and_read(&env, &m, &prefix, "from-process.bin").await;
    assert_eq!(
        std::fs::read_to_string(home.path().join("runs")).unwrap(),
        "run\n"
    );
    assert!(log_line(&m.log(), "credentials").contains("profile 'tool'"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sso_profile_from_the_cached_token() {
    let env = ServerEnv::main();
    let home = tempfile::tempdir().unwrap();
    let portal = {
        let env_copy = ServerEnv::main();
        StandIn::start(move |req| {
            let ok = req.path() == "/federation/credentials"
                && req.header("x-amz-sso_bearer_token") == Some("cached-sso-access-token")
                && req.query_param("account_id").as_deref() == Some("123456789012")
                && req.query_param("role_name").as_deref() == Some("S3Access");
            if !ok {
                return Reply::json(r#"{"message":"Session token not found or invalid"}"#.into());
            }
            let expires_ms = (SystemTime::now() + Duration::from_secs(3600))
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis();
            Reply::json(format!(
                r#"{{"roleCredentials":{{"accessKeyId":"{}","secretAccessKey":"{}","sessionToken":"sso-token","expiration":{expires_ms}}}}}"#,
                env_copy.access_key_id, env_copy.secret_access_key
            ))
        })
    };
    aws_dir(
        home.path(),
        "",
        "[profile dev]\nsso_session = corp\nsso_account_id = 123456789012\nsso_role_name = S3Access\n\
         [sso-session corp]\nsso_start_url = https://corp.awsapps.com/start\nsso_region = eu-west-1\n",
    );
    let cache = home.path().join(".aws/sso/cache");
    std::fs::create_dir_all(&cache).unwrap();
    // The CLI names the file after the SHA-1 of the session name.
    let name = hex::encode(<sha1::Sha1 as sha1::Digest>::digest(b"corp"));
    std::fs::write(
        cache.join(format!("{name}.json")),
        format!(
            r#"{{"startUrl":"https://corp.awsapps.com/start","region":"eu-west-1","accessToken":"cached-sso-access-token","expiresAt":"{}"}}"#,
            rfc3339(SystemTime::now() + Duration::from_secs(8 * 3600))
        ),
    )
    .unwrap();
    let prefix = unique_prefix("sso");
    let mut cmd = keyless(&env, home.path());
    cmd.env("AWS_ENDPOINT_URL_SSO", portal.url());
    let m = mount_with(
        cmd,
        &format!("{}:{prefix}", env.bucket),
        &["--profile", "dev"],
    );
    write_and_read(&env, &m, &prefix, "from-sso.bin").await;
    assert_eq!(portal.served().len(), 1);
    assert!(log_line(&m.log(), "credentials").contains("profile 'dev'"));
}

#[test]
fn a_role_that_cannot_be_assumed_fails_naming_the_profile() {
    let env = ServerEnv::main();
    let home = tempfile::tempdir().unwrap();
    let sts = sts_standin(Duration::from_secs(3600));
    aws_dir(
        home.path(),
        &format!("[base]\naws_access_key_id = {SOURCE_KEY}\naws_secret_access_key = {SOURCE_SECRET}\n"),
        "[profile locked]\nrole_arn = arn:aws:iam::123456789012:role/denied\nsource_profile = base\n",
    );
    let mount_point = tempfile::tempdir().unwrap();
    // The environment's keys are valid for the bucket, and must not be used.
    let mut cmd = command(&env);
    cmd.env("HOME", home.path())
        .env("AWS_ENDPOINT_URL_STS", sts.url())
        .arg(&env.bucket)
        .arg(mount_point.path())
        .args(["--profile", "locked"]);
    let out = run_to_exit(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("profile 'locked'") && stderr.contains("AccessDenied"),
        "{stderr}"
    );
    assert!(
        stderr.contains("arn:aws:iam::123456789012:role/denied"),
        "{stderr}"
    );
    assert!(!stderr.contains(SOURCE_SECRET) && !stderr.contains(&env.secret_access_key));
    assert_eq!(sts.served().len(), 1, "asked STS once");
    assert!(!common::mount::is_mounted(mount_point.path()));
}

#[test]
fn nothing_found_lists_every_provider_tried() {
    let env = ServerEnv::main();
    let home = tempfile::tempdir().unwrap();
    let mount_point = tempfile::tempdir().unwrap();
    let mut cmd = keyless(&env, home.path());
    cmd.arg(&env.bucket).arg(mount_point.path());
    let out = run_to_exit(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    for want in [
        "no AWS credentials found",
        "environment: AWS_ACCESS_KEY_ID",
        "web identity:",
        "profile 'default'",
        "container credentials:",
        "IMDSv2",
        "--no-sign-request",
    ] {
        assert!(stderr.contains(want), "{want}: {stderr}");
    }
}

/// Container credentials that live 20 seconds, and a proxy in front of S3 that refuses any
/// request signed with an expired one (as S3 does): a copy that takes a minute goes through
/// only if the mount renews them in time.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_of_20_seconds_are_renewed_during_a_60_second_copy() {
    let env = ServerEnv::main();
    let home = tempfile::tempdir().unwrap();
    let issued: Arc<Mutex<HashMap<String, SystemTime>>> = Arc::default();
    let agent = {
        let (env_copy, issued) = (ServerEnv::main(), issued.clone());
        StandIn::start(move |_req| {
            let mut issued = issued.lock().unwrap();
            let token = format!("short-lived-{}", issued.len());
            let expires = SystemTime::now() + Duration::from_secs(20);
            issued.insert(token.clone(), expires);
            Reply::json(credentials_json(&env_copy, &token, expires, "Token"))
        })
    };
    let proxy = {
        let issued = issued.clone();
        RecordingProxy::start(env.authority(), move |req| {
            let token = req.header("x-amz-security-token").unwrap_or_default();
            let expired = issued
                .lock()
                .unwrap()
                .get(token)
                .is_none_or(|t| SystemTime::now() > *t);
            expired.then(|| {
                Reply::xml(
                    400,
                    "<Error><Code>ExpiredToken</Code><Message>The provided token has expired.</Message></Error>".into(),
                )
            })
        })
    };
    let prefix = unique_prefix("renewal");
    let mut cmd = keyless(&env, home.path());
    cmd.env(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        format!("{}/creds", agent.url()),
    )
    .env("AWS_ENDPOINT_URL", proxy.endpoint());
    let m = mount_with(cmd, &format!("{}:{prefix}", env.bucket), &[]);

    let start = Instant::now();
    let mut expected = Vec::new();
    {
        let mut big = std::fs::File::create(m.path().join("slow-copy.bin")).unwrap();
        let mut i = 0u64;
        while start.elapsed() < Duration::from_secs(60) {
            let chunk = pattern(256 << 10, i);
            big.write_all(&chunk).unwrap();
            expected.extend_from_slice(&chunk);
            if i % 10 == 0 {
                // Small files along the way: requests all through the minute.
                let name = format!("tick-{i}");
                std::fs::write(m.path().join(&name), name.as_bytes()).unwrap();
                assert_eq!(
                    std::fs::read(m.path().join(&name)).unwrap(),
                    name.as_bytes()
                );
                std::fs::read_dir(m.path()).unwrap().for_each(drop);
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(500));
        }
        big.sync_all().expect("the copy commits");
    }
    assert_eq!(
        std::fs::read(m.path().join("slow-copy.bin")).unwrap(),
        expected
    );
    let stored = read_object(&env.client(), &format!("{prefix}slow-copy.bin"), None).await;
    assert!(stored[..] == expected[..], "stored in S3");

    assert_eq!(
        proxy.refused(),
        0,
        "no request went out with expired credentials"
    );
    let renewals = agent.served().len();
    assert!(
        renewals >= 4,
        "renewed every 10-14 s over a minute: {renewals} fetches"
    );
    let tokens: std::collections::HashSet<String> = proxy
        .seen()
        .iter()
        .filter_map(|r| r.header("x-amz-security-token").map(str::to_string))
        .collect();
    assert!(
        tokens.len() >= 4,
        "requests used the renewed tokens: {tokens:?}"
    );
    let log = m.log();
    assert!(log.matches("credentials renewed").count() >= 3, "{log}");
}

/// Static keys in the shared file: an edit is picked up within seconds, SIGHUP re-reads it
/// at once.
#[test]
fn static_keys_are_read_again_when_the_file_changes_and_on_sighup() {
    let env = ServerEnv::main();
    let home = tempfile::tempdir().unwrap();
    let good = format!(
        "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
        env.access_key_id, env.secret_access_key
    );
    let bad = format!(
        "[default]\naws_access_key_id = {}\naws_secret_access_key = not-the-secret\n",
        env.access_key_id
    );
    aws_dir(home.path(), &good, "");
    let file = home.path().join(".aws/credentials");
    let prefix = unique_prefix("reread");
    let m = mount_with(
        keyless(&env, home.path()),
        &format!("{}:{prefix}", env.bucket),
        &[],
    );
    // A name never seen: its lookup asks S3.
    let probe = |n: &str| {
        std::fs::metadata(m.path().join(n))
            .map(drop)
            .map_err(|e| e.kind())
    };
    assert_eq!(probe("a"), Err(std::io::ErrorKind::NotFound));

    std::fs::write(&file, &bad).unwrap();
    assert!(
        m.wait_for_log("credentials renewed", 1, Duration::from_secs(10)),
        "{}",
        m.log()
    );
    assert_eq!(
        probe("b"),
        Err(std::io::ErrorKind::PermissionDenied),
        "the wrong secret is in use"
    );

    // Good keys again, but with the file's time unchanged: only SIGHUP can tell.
    let seen = std::fs::metadata(&file).unwrap().modified().unwrap();
    std::fs::write(&file, &good).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(seen)
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        probe("c"),
        Err(std::io::ErrorKind::PermissionDenied),
        "not re-read without a change"
    );
    // SAFETY: kill(2) on the pid of the s3mount this test started.
    unsafe { libc::kill(m.pid() as i32, libc::SIGHUP) };
    assert!(
        m.wait_for_log("credentials renewed", 2, Duration::from_secs(10)),
        "{}",
        m.log()
    );
    assert_eq!(
        probe("d"),
        Err(std::io::ErrorKind::NotFound),
        "good keys again"
    );
}

/// Credentials that cannot be renewed: operations go on until they expire, then fail with
/// EACCES, and the log names the provider and its error.
#[test]
fn expired_credentials_that_cannot_be_renewed_give_eacces() {
    let env = ServerEnv::main();
    let home = tempfile::tempdir().unwrap();
    let agent = {
        let env_copy = ServerEnv::main();
        let first = std::sync::atomic::AtomicBool::new(true);
        StandIn::start(move |_req| {
            if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                let expires = SystemTime::now() + Duration::from_secs(12);
                Reply::json(credentials_json(&env_copy, "once", expires, "Token"))
            } else {
                Reply::text(500, "agent down")
            }
        })
    };
    let prefix = unique_prefix("expiry");
    let mut cmd = keyless(&env, home.path());
    cmd.env(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        format!("{}/creds", agent.url()),
    );
    let m = mount_with(cmd, &format!("{}:{prefix}", env.bucket), &[]);
    let probe = |n: &str| {
        std::fs::metadata(m.path().join(n))
            .map(drop)
            .map_err(|e| e.kind())
    };
    assert_eq!(probe("before"), Err(std::io::ErrorKind::NotFound));
    assert!(
        m.wait_for_log("renewing credentials failed", 1, Duration::from_secs(15)),
        "{}",
        m.log()
    );
    assert_eq!(
        probe("meanwhile"),
        Err(std::io::ErrorKind::NotFound),
        "still valid"
    );
    assert!(
        m.wait_for_log("cannot be renewed", 1, Duration::from_secs(20)),
        "{}",
        m.log()
    );
    assert_eq!(probe("after"), Err(std::io::ErrorKind::PermissionDenied));
    let log = m.log();
    let line = log_line(&log, "cannot be renewed");
    assert!(
        line.contains("container credentials") && line.contains("HTTP 500"),
        "{line}"
    );
    assert!(agent.served().len() >= 3, "renewal retried");
}
