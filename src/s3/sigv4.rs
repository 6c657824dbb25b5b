//! AWS Signature Version 4, written from the specification.
//!
//! This module is pure: every input (method, canonical URI, query, headers, payload hash,
//! credentials, region, service and the time) is an argument, and nothing here performs I/O or
//! reads a clock. That is what lets `tests/sigv4_vectors.rs` check each stage against the
//! published AWS vectors byte for byte.
//!
//! The signing process has four stages, each a function of its own:
//! 1. [`canonical_request`]: method, URI, sorted query, sorted headers, signed header list,
//!    payload hash.
//! 2. [`string_to_sign`]: algorithm, timestamp, credential scope, hash of stage 1.
//! 3. [`signing_key`]: the HMAC chain secret → date → region → service → `aws4_request`.
//! 4. [`signature`]: HMAC of stage 2 under the key of stage 3, in hex.
//!
//! Three products are built from them: the `Authorization` header ([`sign_headers`]),
//! presigned URLs ([`presign`]) and the signature of a browser POST policy ([`PostPolicy`]).
//!
//! S3 differs from other services in two ways that matter here: the path is neither normalised
//! (`.` and `..` segments and `//` are kept) nor encoded twice. Callers pass the path exactly as
//! it goes on the wire, already encoded once with [`uri_encode_path`].

use std::fmt::Write as _;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::credentials::Credentials;

/// The only algorithm S3 accepts for SigV4.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// Payload hash for requests whose body is not covered by the signature.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
/// SHA-256 of the empty string: the payload hash of every bodiless request.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// Presigned URLs may live at most seven days (S3 refuses longer expiries).
pub const MAX_PRESIGN_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

type HmacSha256 = Hmac<Sha256>;

/// One request as the signer sees it. The path is the wire form (encoded once); query pairs
/// and header values are raw (not yet encoded), as the application means them.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    pub method: &'a str,
    pub canonical_uri: &'a str,
    pub query: &'a [(String, String)],
    pub headers: &'a [(String, String)],
    pub payload_hash: &'a str,
}

/// Where and as whom a request is signed.
#[derive(Debug, Clone, Copy)]
pub struct SigningContext<'a> {
    pub credentials: &'a Credentials,
    pub region: &'a str,
    pub service: &'a str,
    pub time: OffsetDateTime,
}

impl SigningContext<'_> {
    /// `YYYYMMDD'T'HHMMSS'Z'`, the `x-amz-date` form.
    pub fn amz_date(&self) -> String {
        format_amz_date(self.time)
    }

    fn date_stamp(&self) -> String {
        format_amz_date(self.time)[..8].to_string()
    }

    /// `date/region/service/aws4_request`.
    pub fn scope(&self) -> String {
        format!(
            "{}/{}/{}/aws4_request",
            self.date_stamp(),
            self.region,
            self.service
        )
    }

    fn credential(&self) -> String {
        format!("{}/{}", self.credentials.access_key_id(), self.scope())
    }

    fn key(&self) -> [u8; 32] {
        signing_key(
            self.credentials.secret_access_key(),
            &self.date_stamp(),
            self.region,
            self.service,
        )
    }
}

pub fn format_amz_date(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Percent-encodes everything but the unreserved characters `A-Z a-z 0-9 - . _ ~`, as SigV4
/// requires (uppercase hex). `/` is kept when `keep_slash` is set (paths) and encoded otherwise
/// (query keys and values).
pub fn uri_encode(input: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(input.len() + input.len() / 2);
    for &b in input.as_bytes() {
        let unreserved = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
        if unreserved || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The wire (and canonical) path of an object key: `/` separators kept, everything else that is
/// not unreserved encoded once.
pub fn uri_encode_path(path: &str) -> String {
    uri_encode(path, true)
}

/// Query string in canonical form: each key and value encoded, pairs sorted by key then value.
/// This is also the form the client sends, so what is signed is exactly what goes on the wire.
pub fn canonical_query(query: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
        .collect();
    pairs.sort();
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// Header names lowercased, values trimmed with inner runs of spaces folded to one, repeated
/// names joined with `,` in the order given, sorted by name. Returns the canonical header block
/// (each line ending in `\n`) and the `;`-joined signed header list.
pub fn canonical_headers(headers: &[(String, String)]) -> (String, String) {
    let mut merged: Vec<(String, String)> = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        let value = fold_spaces(value);
        match merged.iter_mut().find(|(n, _)| *n == name) {
            Some((_, existing)) => {
                existing.push(',');
                existing.push_str(&value);
            }
            None => merged.push((name, value)),
        }
    }
    merged.sort_by(|a, b| a.0.cmp(&b.0));
    let mut block = String::new();
    let mut signed = String::new();
    for (i, (name, value)) in merged.iter().enumerate() {
        block.push_str(name);
        block.push(':');
        block.push_str(value);
        block.push('\n');
        if i > 0 {
            signed.push(';');
        }
        signed.push_str(name);
    }
    (block, signed)
}

fn fold_spaces(value: &str) -> String {
    // Multi-line values (obsolete line folding) count as spaces too.
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Stage 1. Returns the canonical request and the signed header list.
pub fn canonical_request(req: &RequestParts<'_>) -> (String, String) {
    let (headers, signed) = canonical_headers(req.headers);
    let text = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        req.canonical_uri,
        canonical_query(req.query),
        headers,
        signed,
        req.payload_hash
    );
    (text, signed)
}

/// Stage 2.
pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    )
}

/// Stage 3.
pub fn signing_key(secret: &str, date_stamp: &str, region: &str, service: &str) -> [u8; 32] {
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date_stamp.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    hmac(&k_service, b"aws4_request")
}

/// Stage 4.
pub fn signature(signing_key: &[u8; 32], string_to_sign: &str) -> String {
    hex::encode(hmac(signing_key, string_to_sign.as_bytes()))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Every intermediate of one signature, so tests can compare each stage.
#[derive(Debug, Clone)]
pub struct Signed {
    pub canonical_request: String,
    pub string_to_sign: String,
    pub signed_headers: String,
    pub signature: String,
}

/// Signs `req` as it stands: the caller has already put every header that must be signed
/// (`host`, `x-amz-date`, and for S3 `x-amz-content-sha256`, plus `x-amz-security-token` when
/// there is a session token) into `req.headers`.
pub fn sign(req: &RequestParts<'_>, ctx: &SigningContext<'_>) -> Signed {
    let (canonical_request, signed_headers) = canonical_request(req);
    let string_to_sign = string_to_sign(&ctx.amz_date(), &ctx.scope(), &canonical_request);
    let signature = signature(&ctx.key(), &string_to_sign);
    Signed {
        canonical_request,
        string_to_sign,
        signed_headers,
        signature,
    }
}

/// The `Authorization` header value for a signed request.
pub fn authorization_header(signed: &Signed, ctx: &SigningContext<'_>) -> String {
    format!(
        "{ALGORITHM} Credential={}, SignedHeaders={}, Signature={}",
        ctx.credential(),
        signed.signed_headers,
        signed.signature
    )
}

/// Adds `x-amz-date`, `x-amz-content-sha256`, `x-amz-security-token` (when the credentials
/// carry one) and `authorization` to `headers`, which must already hold `host`. This is what the
/// S3 client calls for every request.
pub fn sign_headers(
    method: &str,
    canonical_uri: &str,
    query: &[(String, String)],
    headers: &mut Vec<(String, String)>,
    payload_hash: &str,
    ctx: &SigningContext<'_>,
) -> Signed {
    headers.push(("x-amz-date".into(), ctx.amz_date()));
    headers.push(("x-amz-content-sha256".into(), payload_hash.into()));
    if let Some(token) = ctx.credentials.session_token() {
        headers.push(("x-amz-security-token".into(), token.into()));
    }
    let signed = sign(
        &RequestParts {
            method,
            canonical_uri,
            query,
            headers,
            payload_hash,
        },
        ctx,
    );
    headers.push(("authorization".into(), authorization_header(&signed, ctx)));
    signed
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PresignError {
    #[error("presigned URL expiry {0:?} is over the 7-day maximum S3 accepts")]
    ExpiryTooLong(Duration),
    #[error("presigned URL expiry must be at least one second")]
    ExpiryZero,
}

/// The query of a presigned URL (query-string authentication): `query` plus the `X-Amz-*`
/// parameters and the signature, in canonical (sorted, encoded) form, ready to append after `?`.
/// `headers` are the headers the URL's user must send, `host` at least. S3 presigned URLs use
/// [`UNSIGNED_PAYLOAD`] as payload hash.
pub fn presign(
    method: &str,
    canonical_uri: &str,
    query: &[(String, String)],
    headers: &[(String, String)],
    payload_hash: &str,
    expires: Duration,
    ctx: &SigningContext<'_>,
) -> Result<(String, Signed), PresignError> {
    if expires > MAX_PRESIGN_EXPIRY {
        return Err(PresignError::ExpiryTooLong(expires));
    }
    if expires.as_secs() == 0 {
        return Err(PresignError::ExpiryZero);
    }
    let (_, signed_headers) = canonical_headers(headers);
    let mut full: Vec<(String, String)> = query.to_vec();
    full.push(("X-Amz-Algorithm".into(), ALGORITHM.into()));
    full.push(("X-Amz-Credential".into(), ctx.credential()));
    full.push(("X-Amz-Date".into(), ctx.amz_date()));
    full.push(("X-Amz-Expires".into(), expires.as_secs().to_string()));
    if let Some(token) = ctx.credentials.session_token() {
        full.push(("X-Amz-Security-Token".into(), token.into()));
    }
    full.push(("X-Amz-SignedHeaders".into(), signed_headers));
    let signed = sign(
        &RequestParts {
            method,
            canonical_uri,
            query: &full,
            headers,
            payload_hash,
        },
        ctx,
    );
    full.push(("X-Amz-Signature".into(), signed.signature.clone()));
    Ok((canonical_query(&full), signed))
}

/// A browser-based upload policy (HTML form POST). The policy document is JSON; S3 checks each
/// form field against its conditions and the signature over its base64 form.
#[derive(Debug, Clone)]
pub struct PostPolicy {
    expiration: OffsetDateTime,
    conditions: Vec<String>,
}

/// The form fields an HTML upload form carries besides `key`, the file and the fields the
/// policy names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostPolicyFields {
    pub policy: String,
    pub x_amz_algorithm: String,
    pub x_amz_credential: String,
    pub x_amz_date: String,
    pub x_amz_signature: String,
    pub x_amz_security_token: Option<String>,
}

impl PostPolicyFields {
    /// As `(field name, value)` pairs in the order a form should carry them.
    pub fn form_fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![
            ("policy", self.policy.clone()),
            ("x-amz-algorithm", self.x_amz_algorithm.clone()),
            ("x-amz-credential", self.x_amz_credential.clone()),
            ("x-amz-date", self.x_amz_date.clone()),
        ];
        if let Some(token) = &self.x_amz_security_token {
            fields.push(("x-amz-security-token", token.clone()));
        }
        fields.push(("x-amz-signature", self.x_amz_signature.clone()));
        fields
    }
}

impl PostPolicy {
    pub fn new(expiration: OffsetDateTime) -> Self {
        Self {
            expiration,
            conditions: Vec::new(),
        }
    }

    /// `{"field": "value"}`: the form field must equal `value`.
    pub fn exact(mut self, field: &str, value: &str) -> Self {
        self.conditions.push(format!(
            "{{{}: {}}}",
            json_string(field),
            json_string(value)
        ));
        self
    }

    /// `["starts-with", "$field", "prefix"]`.
    pub fn starts_with(mut self, field: &str, prefix: &str) -> Self {
        self.conditions.push(format!(
            "[\"starts-with\", {}, {}]",
            json_string(&format!("${field}")),
            json_string(prefix)
        ));
        self
    }

    /// `["content-length-range", min, max]`.
    pub fn content_length_range(mut self, min: u64, max: u64) -> Self {
        self.conditions
            .push(format!("[\"content-length-range\", {min}, {max}]"));
        self
    }

    /// The policy document, with the credential, algorithm and date conditions S3 requires.
    pub fn document(&self, ctx: &SigningContext<'_>) -> String {
        let mut conditions = self.conditions.clone();
        conditions.push(format!(
            "{{\"x-amz-credential\": {}}}",
            json_string(&ctx.credential())
        ));
        conditions.push(format!("{{\"x-amz-algorithm\": \"{ALGORITHM}\"}}"));
        conditions.push(format!(
            "{{\"x-amz-date\": {}}}",
            json_string(&ctx.amz_date())
        ));
        if let Some(token) = ctx.credentials.session_token() {
            conditions.push(format!(
                "{{\"x-amz-security-token\": {}}}",
                json_string(token)
            ));
        }
        let expiration = self
            .expiration
            .to_offset(time::UtcOffset::UTC)
            .format(&time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            ))
            .unwrap_or_default();
        format!(
            "{{\"expiration\": \"{expiration}\", \"conditions\": [{}]}}",
            conditions.join(", ")
        )
    }

    /// Base64-encodes the document and signs it.
    pub fn sign(&self, ctx: &SigningContext<'_>) -> PostPolicyFields {
        let policy = base64::engine::general_purpose::STANDARD.encode(self.document(ctx));
        sign_post_policy(&policy, ctx)
    }
}

/// Signs an already base64-encoded policy document: the signature is the HMAC of the base64 text
/// itself under the SigV4 signing key.
pub fn sign_post_policy(policy_base64: &str, ctx: &SigningContext<'_>) -> PostPolicyFields {
    PostPolicyFields {
        policy: policy_base64.to_string(),
        x_amz_algorithm: ALGORITHM.to_string(),
        x_amz_credential: ctx.credential(),
        x_amz_date: ctx.amz_date(),
        x_amz_signature: signature(&ctx.key(), policy_base64),
        x_amz_security_token: ctx.credentials.session_token().map(str::to_string),
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_keeps_only_unreserved() {
        assert_eq!(uri_encode_path("a b/c+d%e"), "a%20b/c%2Bd%25e");
        assert_eq!(uri_encode("a/b=c&d", false), "a%2Fb%3Dc%26d");
        assert_eq!(uri_encode_path("~._-"), "~._-");
        assert_eq!(uri_encode_path("é?#;"), "%C3%A9%3F%23%3B");
    }

    #[test]
    fn canonical_query_sorts_by_encoded_key_then_value() {
        let q = vec![
            ("b".to_string(), "2".to_string()),
            ("a".to_string(), "z".to_string()),
            ("a".to_string(), "y".to_string()),
            ("prefix".to_string(), "x y/".to_string()),
        ];
        assert_eq!(canonical_query(&q), "a=y&a=z&b=2&prefix=x%20y%2F");
    }

    #[test]
    fn headers_fold_and_merge() {
        let h = vec![
            ("X-B".to_string(), "  two   words ".to_string()),
            ("x-a".to_string(), "1".to_string()),
            ("X-A".to_string(), "2".to_string()),
        ];
        let (block, signed) = canonical_headers(&h);
        assert_eq!(block, "x-a:1,2\nx-b:two words\n");
        assert_eq!(signed, "x-a;x-b");
    }

    #[test]
    fn expiry_limits() {
        let creds = Credentials::new("AKID", "secret", None);
        let ctx = SigningContext {
            credentials: &creds,
            region: "us-east-1",
            service: "s3",
            time: OffsetDateTime::UNIX_EPOCH,
        };
        let headers = vec![("host".to_string(), "h".to_string())];
        let too_long = MAX_PRESIGN_EXPIRY + Duration::from_secs(1);
        assert_eq!(
            presign("GET", "/k", &[], &headers, UNSIGNED_PAYLOAD, too_long, &ctx).unwrap_err(),
            PresignError::ExpiryTooLong(too_long)
        );
        assert!(presign(
            "GET",
            "/k",
            &[],
            &headers,
            UNSIGNED_PAYLOAD,
            MAX_PRESIGN_EXPIRY,
            &ctx
        )
        .is_ok());
    }
}
