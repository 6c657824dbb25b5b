//! Our SigV4 signer against the public AWS signing test suite (tests/sigv4-vectors, Apache-2.0,
//! see its NOTICE) and the two S3 examples of the Amazon S3 API reference.
//!
//! Each case is checked stage by stage (canonical request, string to sign, signature, and the
//! final `Authorization` header or presigned query), in both header and query-string form.
//! Not copied, because they describe services other than S3: the `*-normalized` cases (S3 does
//! not normalise paths) and the `double-*` encoding cases (S3 encodes paths once).

use std::path::{Path, PathBuf};
use std::time::Duration;

use s3mount::s3::credentials::Credentials;
use s3mount::s3::sigv4::{self, RequestParts, SigningContext};
use time::OffsetDateTime;

struct Case {
    name: String,
    dir: PathBuf,
    credentials: Credentials,
    /// The credentials as signed: without the token when the case adds it after signing.
    signing_credentials: Credentials,
    region: String,
    service: String,
    time: OffsetDateTime,
    expires: u64,
    sign_body: bool,
    omit_session_token: bool,
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .expect("vector query is UTF-8")
        .into_owned()
}

/// `request.txt` taken apart.
struct ParsedRequest {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Parses `request.txt`: request line, headers (with obsolete line folding), blank line, body.
fn parse_request(text: &str) -> ParsedRequest {
    let (head, body) = match text.find("\n\n") {
        Some(i) => (&text[..i], text.as_bytes()[i + 2..].to_vec()),
        None => (text, Vec::new()),
    };
    let mut lines = head.lines();
    let request_line = lines.next().expect("request line");
    let method_end = request_line.find(' ').unwrap();
    let version_start = request_line.rfind(" HTTP/").unwrap();
    let target = &request_line[method_end + 1..version_start];
    let (path, query_text) = target.split_once('?').unwrap_or((target, ""));
    let query = query_text
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        if line.starts_with([' ', '\t']) {
            let last = headers.last_mut().expect("continuation after a header");
            last.1.push(' ');
            last.1.push_str(line.trim());
        } else {
            let (k, v) = line.split_once(':').expect("header line");
            headers.push((k.to_string(), v.to_string()));
        }
    }
    ParsedRequest {
        method: request_line[..method_end].to_string(),
        path: path.to_string(),
        query,
        headers,
        body,
    }
}

fn load(dir: &Path) -> Case {
    let ctx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("context.json")).unwrap()).unwrap();
    let c = &ctx["credentials"];
    let token = c["token"].as_str();
    let id = c["access_key_id"].as_str().unwrap();
    let secret = c["secret_access_key"].as_str().unwrap();
    let omit_session_token = ctx["omit_session_token"].as_bool().unwrap_or(false);
    let time = OffsetDateTime::parse(
        ctx["timestamp"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let ParsedRequest {
        method,
        path,
        query,
        headers,
        body,
    } = parse_request(&std::fs::read_to_string(dir.join("request.txt")).unwrap());
    Case {
        name: dir.file_name().unwrap().to_string_lossy().into_owned(),
        dir: dir.to_path_buf(),
        credentials: Credentials::new(id, secret, token),
        signing_credentials: Credentials::new(
            id,
            secret,
            if omit_session_token { None } else { token },
        ),
        region: ctx["region"].as_str().unwrap().to_string(),
        service: ctx["service"].as_str().unwrap().to_string(),
        time,
        expires: ctx["expiration_in_seconds"].as_u64().unwrap(),
        sign_body: ctx["sign_body"].as_bool().unwrap(),
        omit_session_token,
        method,
        path,
        query,
        headers,
        body,
    }
}

fn expected(case: &Case, file: &str) -> String {
    std::fs::read_to_string(case.dir.join(file))
        .unwrap_or_else(|e| panic!("{}: {file}: {e}", case.name))
}

fn cases() -> Vec<Case> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sigv4-vectors/v4");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    let cases: Vec<Case> = dirs.iter().map(|d| load(d)).collect();
    assert_eq!(cases.len(), 31, "every copied vector is loaded");
    cases
}

#[test]
fn header_signing_matches_every_vector() {
    for case in cases() {
        let ctx = SigningContext {
            credentials: &case.signing_credentials,
            region: &case.region,
            service: &case.service,
            time: case.time,
        };
        let payload_hash = sigv4::sha256_hex(&case.body);
        let mut headers = case.headers.clone();
        headers.push(("X-Amz-Date".into(), ctx.amz_date()));
        if case.sign_body {
            headers.push(("x-amz-content-sha256".into(), payload_hash.clone()));
        }
        if let (Some(token), false) = (case.credentials.session_token(), case.omit_session_token) {
            headers.push(("X-Amz-Security-Token".into(), token.to_string()));
        }
        let canonical_uri = sigv4::uri_encode_path(&case.path);
        let signed = sigv4::sign(
            &RequestParts {
                method: &case.method,
                canonical_uri: &canonical_uri,
                query: &case.query,
                headers: &headers,
                payload_hash: &payload_hash,
            },
            &ctx,
        );
        assert_eq!(
            signed.canonical_request,
            expected(&case, "header-canonical-request.txt"),
            "{}",
            case.name
        );
        assert_eq!(
            signed.string_to_sign,
            expected(&case, "header-string-to-sign.txt"),
            "{}",
            case.name
        );
        assert_eq!(
            signed.signature,
            expected(&case, "header-signature.txt").trim(),
            "{}",
            case.name
        );
        let authorization = sigv4::authorization_header(&signed, &ctx);
        let signed_request = expected(&case, "header-signed-request.txt");
        assert!(
            signed_request.contains(&format!("Authorization:{authorization}")),
            "{}: {authorization} not in\n{signed_request}",
            case.name
        );
    }
}

#[test]
fn query_signing_matches_every_vector() {
    for case in cases() {
        let ctx = SigningContext {
            credentials: &case.signing_credentials,
            region: &case.region,
            service: &case.service,
            time: case.time,
        };
        let canonical_uri = sigv4::uri_encode_path(&case.path);
        let (query, signed) = sigv4::presign(
            &case.method,
            &canonical_uri,
            &case.query,
            &case.headers,
            &sigv4::sha256_hex(&case.body),
            Duration::from_secs(case.expires),
            &ctx,
        )
        .unwrap();
        assert_eq!(
            signed.canonical_request,
            expected(&case, "query-canonical-request.txt"),
            "{}",
            case.name
        );
        assert_eq!(
            signed.string_to_sign,
            expected(&case, "query-string-to-sign.txt"),
            "{}",
            case.name
        );
        let signature = expected(&case, "query-signature.txt");
        assert_eq!(signed.signature, signature.trim(), "{}", case.name);
        // The signed request's query holds the same parameters (its order differs: ours is the
        // canonical order, which is what we send).
        let signed_request = expected(&case, "query-signed-request.txt");
        let line = signed_request.lines().next().unwrap();
        let target = &line[line.find(' ').unwrap() + 1..line.rfind(" HTTP/").unwrap()];
        // Their request line is written unencoded; compare decoded pairs.
        let mut theirs: Vec<String> = target
            .split_once('?')
            .unwrap()
            .1
            .split('&')
            .map(decode)
            .collect();
        let mut ours: Vec<String> = query.split('&').map(decode).collect();
        theirs.sort();
        ours.sort();
        if !case.omit_session_token {
            assert_eq!(ours, theirs, "{}", case.name);
        }
    }
}

fn s3_example_context(credentials: &Credentials) -> SigningContext<'_> {
    SigningContext {
        credentials,
        region: "us-east-1",
        service: "s3",
        time: time::macros::datetime!(2013-05-24 00:00:00 UTC),
    }
}

#[test]
fn s3_reference_get_object_example() {
    let creds = Credentials::new(
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        None,
    );
    let ctx = s3_example_context(&creds);
    let mut headers = vec![
        (
            "Host".to_string(),
            "examplebucket.s3.amazonaws.com".to_string(),
        ),
        ("Range".to_string(), "bytes=0-9".to_string()),
    ];
    sigv4::sign_headers(
        "GET",
        "/test.txt",
        &[],
        &mut headers,
        sigv4::EMPTY_SHA256,
        &ctx,
    );
    let auth = &headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .unwrap()
        .1;
    assert_eq!(
        auth,
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
         SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
         Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    );
}

#[test]
fn s3_reference_presigned_example() {
    let creds = Credentials::new(
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        None,
    );
    let ctx = s3_example_context(&creds);
    let headers = vec![(
        "host".to_string(),
        "examplebucket.s3.amazonaws.com".to_string(),
    )];
    let (query, signed) = sigv4::presign(
        "GET",
        "/test.txt",
        &[],
        &headers,
        sigv4::UNSIGNED_PAYLOAD,
        Duration::from_secs(86400),
        &ctx,
    )
    .unwrap();
    assert_eq!(
        signed.signature,
        "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
    );
    assert!(query.contains(
        "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404&"
    ));
    assert!(query.contains(
        "X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
    ));
}

#[test]
fn canonical_uri_of_awkward_keys() {
    // Every character the issue names, with `/` kept as the separator.
    let key = "dir one/ü ñ+%~=&?#;x";
    assert_eq!(
        sigv4::uri_encode_path(key),
        "dir%20one/%C3%BC%20%C3%B1%2B%25~%3D%26%3F%23%3Bx"
    );
}

/// The browser-upload example of the S3 API reference ("Example: Browser-Based Upload using HTTP
/// POST"): its base64 policy, signed on 2015-12-29.
#[test]
fn s3_reference_post_policy_example() {
    const POLICY: &str = "eyAiZXhwaXJhdGlvbiI6ICIyMDE1LTEyLTMwVDEyOjAwOjAwLjAwMFoiLA0KICAiY29uZGl0aW9ucyI6IFsNCiAgICB7ImJ1Y2tldCI6ICJzaWd2NGV4YW1wbGVidWNrZXQifSwNCiAgICBbInN0YXJ0cy13aXRoIiwgIiRrZXkiLCAidXNlci91c2VyMS8iXSwNCiAgICB7ImFjbCI6ICJwdWJsaWMtcmVhZCJ9LA0KICAgIHsic3VjY2Vzc19hY3Rpb25fcmVkaXJlY3QiOiAiaHR0cDovL3NpZ3Y0ZXhhbXBsZWJ1Y2tldC5zMy5hbWF6b25hd3MuY29tL3N1Y2Nlc3NmdWxfdXBsb2FkLmh0bWwifSwNCiAgICBbInN0YXJ0cy13aXRoIiwgIiRDb250ZW50LVR5cGUiLCAiaW1hZ2UvIl0sDQogICAgeyJ4LWFtei1tZXRhLXV1aWQiOiAiMTQzNjUxMjM2NTEyNzQifSwNCiAgICB7IngtYW16LXNlcnZlci1zaWRlLWVuY3J5cHRpb24iOiAiQUVTMjU2In0sDQogICAgWyJzdGFydHMtd2l0aCIsICIkeC1hbXotbWV0YS10YWciLCAiIl0sDQoNCiAgICB7IngtYW16LWNyZWRlbnRpYWwiOiAiQUtJQUlPU0ZPRE5ON0VYQU1QTEUvMjAxNTEyMjkvdXMtZWFzdC0xL3MzL2F3czRfcmVxdWVzdCJ9LA0KICAgIHsieC1hbXotYWxnb3JpdGhtIjogIkFXUzQtSE1BQy1TSEEyNTYifSwNCiAgICB7IngtYW16LWRhdGUiOiAiMjAxNTEyMjlUMDAwMDAwWiIgfQ0KICBdDQp9";
    let creds = Credentials::new(
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        None,
    );
    let ctx = SigningContext {
        credentials: &creds,
        region: "us-east-1",
        service: "s3",
        time: time::macros::datetime!(2015-12-29 00:00:00 UTC),
    };
    let fields = sigv4::sign_post_policy(POLICY, &ctx);
    assert_eq!(
        fields.x_amz_signature,
        "8afdbf4008c03f22c2cd3cdb72e4afbb1f6a588f3255ac628749a66d7f09699e"
    );
    assert_eq!(
        fields.x_amz_credential,
        "AKIAIOSFODNN7EXAMPLE/20151229/us-east-1/s3/aws4_request"
    );
    assert_eq!(fields.x_amz_date, "20151229T000000Z");
}

#[test]
fn post_policy_document_is_json_with_the_required_conditions() {
    let creds = Credentials::new("AKID", "secret", Some("tok\"en"));
    let ctx = SigningContext {
        credentials: &creds,
        region: "eu-west-1",
        service: "s3",
        time: time::macros::datetime!(2026-01-02 03:04:05 UTC),
    };
    let policy = sigv4::PostPolicy::new(time::macros::datetime!(2026-01-02 04:04:05 UTC))
        .exact("bucket", "b")
        .starts_with("key", "uploads/")
        .content_length_range(0, 1024);
    let doc: serde_json::Value = serde_json::from_str(&policy.document(&ctx)).unwrap();
    assert_eq!(doc["expiration"], "2026-01-02T04:04:05.000Z");
    let conditions = doc["conditions"].as_array().unwrap();
    assert!(conditions.contains(&serde_json::json!({"bucket": "b"})));
    assert!(conditions.contains(&serde_json::json!(["starts-with", "$key", "uploads/"])));
    assert!(conditions.contains(&serde_json::json!(["content-length-range", 0, 1024])));
    assert!(conditions.contains(
        &serde_json::json!({"x-amz-credential": "AKID/20260102/eu-west-1/s3/aws4_request"})
    ));
    assert!(conditions.contains(&serde_json::json!({"x-amz-date": "20260102T030405Z"})));
    assert!(conditions.contains(&serde_json::json!({"x-amz-security-token": "tok\"en"})));
    let fields = policy.sign(&ctx);
    let decoded =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &fields.policy).unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), policy.document(&ctx));
}
