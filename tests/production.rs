//! Production S3 options on the wire: a recording proxy in front of the test server sees every
//! request of a whole sequence (create, multipart write, rename, chmod, read, listing) and the
//! test checks each carries the headers S3 needs for it, and only those.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::mount::{command, mount_with};
use common::standin::{RecordingProxy, Served};
use common::{pattern, read_object, unique_prefix, ServerEnv};
use s3mount::s3::{ObjectAttributes, ObjectClient, PutBody};

/// What S3 operation a recorded request is.
fn operation(r: &Served) -> &'static str {
    let q = r.query();
    let has = |p: &str| q.split('&').any(|kv| kv.split('=').next() == Some(p));
    match r.method.as_str() {
        "PUT" if has("partNumber") && r.header("x-amz-copy-source").is_some() => "UploadPartCopy",
        "PUT" if has("partNumber") => "UploadPart",
        "PUT" if r.header("x-amz-copy-source").is_some() => "CopyObject",
        "PUT" => "PutObject",
        "POST" if has("uploads") => "CreateMultipartUpload",
        "POST" if has("uploadId") => "CompleteMultipartUpload",
        "POST" if has("delete") => "DeleteObjects",
        "GET" if has("list-type") => "ListObjectsV2",
        "GET" if has("uploads") => "ListMultipartUploads",
        "GET" => "GetObject",
        "HEAD" => "HeadObject",
        "DELETE" if has("uploadId") => "AbortMultipartUpload",
        "DELETE" => "DeleteObject",
        _ => "other",
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn production_headers_are_on_every_request_that_needs_them() {
    let env = ServerEnv::main();
    let proxy = RecordingProxy::start(env.authority(), |_| None);
    let prefix = unique_prefix("production");
    // An object with a content type, stored by another client.
    let typed = ObjectAttributes {
        content_type: Some("text/csv".into()),
        ..Default::default()
    };
    env.client()
        .put_object(
            &format!("{prefix}typed.csv"),
            PutBody::from("a,b\n"),
            &typed,
        )
        .await
        .unwrap();
    let mut cmd = command(&env);
    cmd.env("AWS_ENDPOINT_URL", proxy.endpoint());
    let m = mount_with(
        cmd,
        &format!("{}:{prefix}", env.bucket),
        &[
            "--sse",
            "aws:kms",
            "--sse-kms-key-id",
            "alias/s3mount-test",
            "--storage-class",
            "STANDARD_IA",
            "-o",
            "acl=bucket-owner-full-control,requester_pays,expected_bucket_owner=123456789012",
            "--part-size",
            "5M",
        ],
    );
    // Create, multipart write, rename, chmod, read, list.
    std::fs::write(m.path().join("small.txt"), b"hello").unwrap();
    let big = pattern(12 << 20, 3);
    std::fs::write(m.path().join("big.bin"), &big).unwrap();
    std::fs::rename(m.path().join("small.txt"), m.path().join("renamed.txt")).unwrap();
    std::fs::rename(m.path().join("big.bin"), m.path().join("big-renamed.bin")).unwrap();
    std::fs::rename(
        m.path().join("typed.csv"),
        m.path().join("typed-renamed.csv"),
    )
    .unwrap();
    std::fs::set_permissions(
        m.path().join("typed-renamed.csv"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let replaced = |p: &RecordingProxy| {
        p.seen().iter().any(|r| {
            operation(r) == "CopyObject" && r.header("x-amz-metadata-directive") == Some("REPLACE")
        })
    };
    let start = Instant::now();
    while !replaced(&proxy) && start.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        replaced(&proxy),
        "the chmod was stored with CopyObject REPLACE"
    );
    assert_eq!(
        std::fs::read(m.path().join("renamed.txt")).unwrap(),
        b"hello"
    );
    assert!(std::fs::read(m.path().join("big-renamed.bin")).unwrap() == big);
    let names: Vec<_> = std::fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    drop(m);
    let stored = read_object(&env.client(), &format!("{prefix}big-renamed.bin"), None).await;
    assert!(stored[..] == big[..]);
    let head = env
        .client()
        .head_object(&format!("{prefix}typed-renamed.csv"))
        .await
        .unwrap();
    assert_eq!(
        head.content_type.as_deref(),
        Some("text/csv"),
        "rename and chmod kept it"
    );

    let seen: Vec<Served> = proxy
        .seen()
        .into_iter()
        .filter(|r| r.target.contains(&prefix.replace('/', "%2F")) || r.target.contains(&prefix))
        .collect();
    let count = |op: &str| seen.iter().filter(|r| operation(r) == op).count();
    for op in [
        "PutObject",
        "CreateMultipartUpload",
        "UploadPart",
        "CompleteMultipartUpload",
        "CopyObject",
        "HeadObject",
        "GetObject",
        "ListObjectsV2",
    ] {
        assert!(
            count(op) > 0,
            "the sequence made no {op}: {:?}",
            seen.iter().map(operation).collect::<Vec<_>>()
        );
    }
    assert!(count("UploadPart") >= 3, "12 MiB in 5 MiB parts");
    for r in &seen {
        let op = operation(r);
        let h = |name: &str| r.header(name);
        assert_eq!(
            h("x-amz-request-payer"),
            Some("requester"),
            "{op} {}",
            r.target
        );
        assert_eq!(
            h("x-amz-expected-bucket-owner"),
            Some("123456789012"),
            "{op}"
        );
        let creates = matches!(op, "PutObject" | "CreateMultipartUpload" | "CopyObject");
        if creates {
            assert_eq!(h("x-amz-server-side-encryption"), Some("aws:kms"), "{op}");
            assert_eq!(
                h("x-amz-server-side-encryption-aws-kms-key-id"),
                Some("alias/s3mount-test"),
                "{op}"
            );
            assert_eq!(h("x-amz-storage-class"), Some("STANDARD_IA"), "{op}");
            assert_eq!(h("x-amz-acl"), Some("bucket-owner-full-control"), "{op}");
        } else {
            // The key id goes once, on CreateMultipartUpload; S3 refuses it on the parts.
            assert_eq!(h("x-amz-server-side-encryption"), None, "{op}");
            assert_eq!(
                h("x-amz-server-side-encryption-aws-kms-key-id"),
                None,
                "{op}"
            );
            assert_eq!(h("x-amz-acl"), None, "{op}");
        }
        if op == "CopyObject" {
            assert_eq!(
                h("x-amz-source-expected-bucket-owner"),
                Some("123456789012")
            );
            if h("x-amz-metadata-directive") == Some("REPLACE") {
                assert_eq!(
                    h("content-type"),
                    Some("text/csv"),
                    "chmod keeps the content type"
                );
                assert_eq!(
                    h("x-amz-meta-mode"),
                    Some((0o100600u32).to_string().as_str()),
                    "{:?}",
                    r.headers
                );
            }
        }
        assert!(h("authorization").is_some(), "{op} is signed");
    }
}
