//! The S3 client against a real server (Garage by default: see tests/common/mod.rs for how the
//! server is chosen). Every operation of the `ObjectClient` trait runs on real objects here.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fault_proxy::{Fault, FaultProxy};
use common::{conformance, unique_prefix, ServerEnv};
use s3mount::s3::*;

fn client() -> S3Client {
    ServerEnv::main().client()
}

#[tokio::test(flavor = "multi_thread")]
async fn put_get_head_delete() {
    conformance::put_get_head_delete(&client(), &unique_prefix("basic")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn awkward_keys() {
    conformance::awkward_keys(&client(), &unique_prefix("awkward")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn listing_of_2500_keys_through_continuation_tokens() {
    conformance::large_listing(Arc::new(client()), &unique_prefix("list2500"), 2500).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn multipart_with_concurrent_parts_and_part_copy() {
    conformance::multipart_roundtrip(
        Arc::new(client()),
        &unique_prefix("multipart"),
        Checksum::Sha256,
    )
    .await;
}

/// The probe finds the server checking CRC32C (Garage, MinIO and AWS do), so uploads use it;
/// parts carry it, the complete request names it, and a body changed on the way is refused.
#[tokio::test(flavor = "multi_thread")]
async fn crc32c_checksums_are_probed_then_used_for_uploads() {
    let env = ServerEnv::main();
    let c = env.client();
    assert_eq!(c.upload_checksum(), Checksum::Sha256, "until probed");
    let prefix = unique_prefix("crc32c");
    c.probe_crc32c(&format!("{prefix}probe"))
        .await
        .expect("the server checks CRC32C");
    assert_eq!(c.upload_checksum(), Checksum::Crc32c);
    let listed = c.list_multipart_uploads(&prefix, None).await.unwrap();
    assert!(listed.uploads.is_empty(), "the probe's upload is aborted");
    let c = Arc::new(c);
    conformance::multipart_roundtrip(c.clone(), &prefix, Checksum::Crc32c).await;

    // A PutObject carries it too; a body changed on the way (with its CRC32C left as sent,
    // as a broken link would) is refused.
    let key = format!("{prefix}put");
    c.put_object(&key, PutBody::from("checked"), &ObjectAttributes::default())
        .await
        .unwrap();
    let proxy = FaultProxy::start(env.authority(), vec![Fault::FlipBodyByte]).await;
    let tampered = proxied(&env, &proxy, 1);
    tampered.probe_crc32c(&format!("{prefix}probe2")).await.ok();
    assert_eq!(tampered.upload_checksum(), Checksum::Crc32c);
    proxy.push([Fault::FlipBodyByte]);
    let e = tampered
        .put_object(&key, PutBody::from("changed"), &ObjectAttributes::default())
        .await
        .unwrap_err();
    assert!(matches!(e.status, Some(400 | 500)), "{e}");
    assert_eq!(&common::read_object(&*c, &key, None).await[..], b"checked");
    c.delete_object(&key).await.unwrap();
}

/// s3s-fs takes a part whose CRC32C is wrong: the probe says so, and uploads keep their signed
/// SHA-256, which s3s-fs checks.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_does_not_check_crc32c_keeps_uploads_on_sha256() {
    let Some(env) = ServerEnv::strict() else {
        eprintln!("skipped: no strict-signature server (S3MOUNT_STRICT_ENDPOINT); scripts/test starts s3s-fs");
        return;
    };
    let c = env.client();
    let prefix = unique_prefix("nocrc");
    let why = c
        .probe_crc32c(&format!("{prefix}probe"))
        .await
        .expect_err("s3s-fs does not check CRC32C");
    assert!(why.contains("wrong"), "{why}");
    assert_eq!(c.upload_checksum(), Checksum::Sha256);
    // s3s-fs has no ListMultipartUploads; a multipart upload as the write path makes one.
    let key = format!("{prefix}multi");
    let checksum = c.upload_checksum();
    let id = c
        .create_multipart_upload(&key, &ObjectAttributes::default(), checksum)
        .await
        .unwrap();
    let data = common::pattern(6 << 20, 5);
    let stored = c
        .upload_part(&key, &id, 1, PutBody::from(data.clone()), checksum)
        .await
        .unwrap();
    assert_eq!(stored.sha256_hex, Some(common::sha256_hex(&data)));
    let part = CompletedPart {
        part_number: 1,
        etag: stored.etag,
        crc32c: None,
    };
    c.complete_multipart_upload(&key, &id, &[part])
        .await
        .unwrap();
    assert_eq!(common::read_object(&c, &key, None).await[..], data[..]);
    c.delete_object(&key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_object_copy_and_replace_metadata() {
    conformance::copy_metadata(&client(), &unique_prefix("copy")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_byte_directory_marker_is_an_object() {
    let c = client();
    let prefix = unique_prefix("marker");
    let marker = format!("{prefix}dir/");
    c.put_object(
        &marker,
        PutBody::from(Vec::new()),
        &ObjectAttributes::default(),
    )
    .await
    .unwrap();
    assert_eq!(c.head_object(&marker).await.unwrap().size, 0);
    let (keys, _, _) = conformance::list_all(&c, &prefix, None).await;
    assert_eq!(keys, vec![marker.clone()]);
    let (_, prefixes, _) = conformance::list_all(&c, &prefix, Some("/")).await;
    assert_eq!(prefixes, vec![marker.clone()]);
    c.delete_object(&marker).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn file_region_bodies_stream_from_disk() {
    let c = client();
    let key = format!("{}spooled", unique_prefix("file-body"));
    let data = common::pattern(3 * 1024 * 1024 + 17, 3);
    let mut file = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut file, &[0u8; 100]).unwrap();
    std::io::Write::write_all(&mut file, &data).unwrap();
    let body = PutBody::File {
        file: Arc::new(file),
        offset: 100,
        len: data.len() as u64,
    };
    c.put_object(&key, body, &ObjectAttributes::default())
        .await
        .unwrap();
    let got = c
        .get_object(&key, None, None)
        .await
        .unwrap()
        .body
        .collect(data.len())
        .await
        .unwrap();
    assert_eq!(common::sha256_hex(&got), common::sha256_hex(&data));
    c.delete_object(&key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn head_bucket_and_missing_bucket() {
    let env = ServerEnv::main();
    env.client().head_bucket().await.unwrap();
    let mut cfg = env.config();
    cfg.bucket = format!("no-such-bucket-{:08x}", fastrand::u32(..));
    let missing = S3Client::new(cfg).unwrap();
    let e = missing.head_bucket().await.unwrap_err();
    assert!(
        matches!(e.kind, ErrorKind::NoSuchBucket | ErrorKind::AccessDenied),
        "{e}"
    );
    let e = missing
        .list_objects(&ListRequest::default())
        .await
        .unwrap_err();
    assert!(
        matches!(e.kind, ErrorKind::NoSuchBucket | ErrorKind::AccessDenied),
        "{e}"
    );
    assert!(
        e.to_string().contains("ListObjectsV2 s3://no-such-bucket-"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_secret_is_refused_as_signature_mismatch() {
    let env = ServerEnv::main();
    let mut cfg = env.config();
    let wrong = format!(
        "{}x",
        &env.secret_access_key[..env.secret_access_key.len() - 1]
    );
    cfg.auth = Auth::Signed(Credentials::new(&env.access_key_id, &wrong, None));
    let c = S3Client::new(cfg).unwrap();
    let e = c.list_objects(&ListRequest::default()).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::SignatureDoesNotMatch, "{e}");
    assert_eq!(e.status, Some(403));
    assert_eq!(e.attempts, 1, "a signature error is not retried");
    assert!(!e.to_string().contains(&wrong), "no secret in the message");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_access_key_is_refused() {
    let env = ServerEnv::main();
    let mut cfg = env.config();
    cfg.auth = Auth::Signed(Credentials::new(
        "GK000000000000000000000000",
        &env.secret_access_key,
        None,
    ));
    let e = S3Client::new(cfg)
        .unwrap()
        .list_objects(&ListRequest::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.kind,
            ErrorKind::InvalidAccessKeyId | ErrorKind::AccessDenied
        ),
        "{e}"
    );
    assert_eq!(e.status, Some(403));
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_endpoint_fails_in_bounded_time() {
    let env = ServerEnv::main();
    let mut cfg = env.config();
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    cfg.endpoint_url = Some(format!("http://127.0.0.1:{port}"));
    cfg.retry = RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        ..RetryPolicy::default()
    };
    let started = std::time::Instant::now();
    let e = S3Client::new(cfg).unwrap().head_bucket().await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Connect, "{e}");
    assert_eq!(e.attempts, 3, "connection failures are retried");
    assert!(started.elapsed() < Duration::from_secs(5));
}

fn curl(args: &[&str]) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn presigned_urls_work_with_curl() {
    let c = client();
    let key = format!("{}pre signed+key.txt", unique_prefix("presign"));
    let now = time::OffsetDateTime::now_utc();
    let put_url = c
        .presigned_url("PUT", &key, Duration::from_secs(600), now)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("upload.txt");
    std::fs::write(&file, "uploaded with curl").unwrap();
    let (status, body) = curl(&["-X", "PUT", "-T", file.to_str().unwrap(), &put_url]);
    assert_eq!(status, 200, "presigned PUT: {body}");

    let get_url = c
        .presigned_url("GET", &key, Duration::from_secs(7 * 24 * 3600), now)
        .unwrap();
    let (status, body) = curl(&[&get_url]);
    assert_eq!((status, body.as_str()), (200, "uploaded with curl"));

    // One changed signature character: refused.
    let sig_at = get_url.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
    let mut bad = get_url.clone().into_bytes();
    bad[sig_at] = if bad[sig_at] == b'0' { b'1' } else { b'0' };
    let (status, body) = curl(&[&String::from_utf8(bad).unwrap()]);
    assert_eq!(status, 403, "tampered presigned GET: {body}");
    // A PUT URL cannot be used for GET.
    let (status, _) = curl(&[&put_url]);
    assert_eq!(status, 403);
    c.delete_object(&key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn browser_post_policy_upload_with_curl() {
    let c = client();
    let prefix = unique_prefix("post");
    let now = time::OffsetDateTime::now_utc();
    let policy = s3mount::s3::sigv4::PostPolicy::new(now + time::Duration::minutes(10))
        .exact("bucket", c.bucket())
        .starts_with("key", &prefix)
        .content_length_range(0, 1 << 20);
    let (url, fields) = c.post_policy_form(&policy, now).unwrap();
    let key = format!("{prefix}from-form.txt");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.txt");
    std::fs::write(&file, "form upload").unwrap();
    let mut args: Vec<String> = vec!["-F".into(), format!("key={key}")];
    for (name, value) in fields.form_fields() {
        args.push("-F".into());
        args.push(format!("{name}={value}"));
    }
    args.push("-F".into());
    args.push(format!("file=@{}", file.display()));
    args.push(url.clone());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, body) = curl(&refs);
    assert!((200..300).contains(&status), "POST upload: {status} {body}");
    let got = common::read_object(&c, &key, None).await;
    assert_eq!(&got[..], b"form upload");

    // The same form with a key outside the policy's prefix is refused.
    let outside = format!("key={}elsewhere.txt", unique_prefix("post-outside"));
    let mut bad = refs.clone();
    bad[1] = &outside;
    let (status, body) = curl(&bad);
    // AWS answers 403 (AccessDenied: Invalid according to Policy), Garage 400: both refuse.
    assert!(
        matches!(status, 400 | 403),
        "a key outside the policy is refused: {status} {body}"
    );
    c.delete_object(&key).await.unwrap();
}

fn proxied(env: &ServerEnv, proxy: &FaultProxy, attempts: u32) -> S3Client {
    let mut cfg = env.config();
    cfg.endpoint_url = Some(proxy.endpoint());
    cfg.retry = RetryPolicy {
        max_attempts: attempts,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
        ..RetryPolicy::default()
    };
    S3Client::new(cfg).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_failures_are_retried_until_success() {
    let env = ServerEnv::main();
    let proxy = FaultProxy::start(
        env.authority(),
        vec![
            Fault::Status(503, "SlowDown"),
            Fault::Reset,
            Fault::Status(500, "InternalError"),
            Fault::Status(429, "TooManyRequests"),
        ],
    )
    .await;
    let c = proxied(&env, &proxy, 10);
    let key = format!("{}retried", unique_prefix("retry"));
    c.put_object(
        &key,
        PutBody::from("survived"),
        &ObjectAttributes::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        proxy.requests_seen(),
        5,
        "four failures, then the forwarded request"
    );
    assert_eq!(
        c.stats().retries.load(std::sync::atomic::Ordering::Relaxed),
        4
    );
    let direct = env.client();
    let got = common::read_object(&direct, &key, None).await;
    assert_eq!(&got[..], b"survived");

    // A 200 whose body is an <Error> counts as an error, and is retried.
    let id = direct
        .create_multipart_upload(&key, &ObjectAttributes::default(), Checksum::Sha256)
        .await
        .unwrap();
    let etag = direct
        .upload_part(&key, &id, 1, PutBody::from("part"), Checksum::Sha256)
        .await
        .unwrap()
        .etag;
    proxy.push([Fault::ErrorIn200("InternalError")]);
    let before = proxy.requests_seen();
    c.complete_multipart_upload(
        &key,
        &id,
        &[CompletedPart {
            part_number: 1,
            etag,
            crc32c: None,
        }],
    )
    .await
    .unwrap();
    assert_eq!(proxy.requests_seen() - before, 2);
    let got = common::read_object(&direct, &key, None).await;
    assert_eq!(&got[..], b"part");
    direct.delete_object(&key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn permanent_and_exhausted_failures_surface_clearly() {
    let env = ServerEnv::main();
    let proxy = FaultProxy::start(env.authority(), vec![Fault::Status(403, "AccessDenied")]).await;
    let c = proxied(&env, &proxy, 5);
    let key = format!("{}denied", unique_prefix("permanent"));
    let e = c.get_object(&key, None, None).await.unwrap_err();
    assert_eq!(
        (e.kind.clone(), e.status, e.attempts),
        (ErrorKind::AccessDenied, Some(403), 1),
        "{e}"
    );
    assert_eq!(proxy.requests_seen(), 1, "not retried");

    proxy.push(std::iter::repeat_n(Fault::Status(503, "SlowDown"), 5));
    let before = proxy.requests_seen();
    let e = c.head_object(&key).await.unwrap_err();
    assert_eq!(e.attempts, 5, "{e}");
    assert!(e.to_string().contains("after 5 attempts"), "{e}");
    assert_eq!(
        proxy.requests_seen() - before,
        5,
        "the retry budget is the limit"
    );

    // CreateMultipartUpload is not idempotent: a connection lost after sending is not retried.
    proxy.push(std::iter::repeat_n(Fault::Reset, 10));
    let before = proxy.requests_seen();
    let e = c
        .create_multipart_upload(&key, &ObjectAttributes::default(), Checksum::Sha256)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transport, "{e}");
    assert_eq!(proxy.requests_seen() - before, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn strict_server_checks_signature_and_payload_hash() {
    let Some(env) = ServerEnv::strict() else {
        eprintln!("skipped: no strict-signature server (S3MOUNT_STRICT_ENDPOINT); scripts/test starts s3s-fs");
        return;
    };
    let c = env.client();
    let key = format!("{}strict.bin", unique_prefix("strict"));
    c.put_object(
        &key,
        PutBody::from(common::pattern(100_000, 1)),
        &ObjectAttributes::default(),
    )
    .await
    .unwrap();
    let got = common::read_object(&c, &key, Some(10..20)).await;
    assert_eq!(&got[..], &common::pattern(100_000, 1)[10..20]);

    let mut cfg = env.config();
    cfg.auth = Auth::Signed(Credentials::new(&env.access_key_id, "not-the-secret", None));
    let e = S3Client::new(cfg)
        .unwrap()
        .head_object(&key)
        .await
        .unwrap_err();
    assert_eq!(e.status, Some(403), "{e}");

    // A body that does not match its signed SHA-256 is refused: send through a proxy that
    // corrupts one byte of the body on the way.
    let host = env.authority();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut up = tokio::net::TcpStream::connect(host).await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let n = conn.read(&mut buf).await.unwrap();
        let last = n - 1;
        buf[last] ^= 0xff; // the body's last byte
        up.write_all(&buf[..n]).await.unwrap();
        let (mut a, mut b) = (conn, up);
        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
    });
    let mut cfg = env.config();
    cfg.endpoint_url = Some(format!("http://{addr}"));
    cfg.retry = RetryPolicy::none();
    let e = S3Client::new(cfg)
        .unwrap()
        .put_object(
            &key,
            PutBody::from("tampered body"),
            &ObjectAttributes::default(),
        )
        .await
        .unwrap_err();
    // s3s-fs detects the mismatch (its log says Sha256Mismatch) but answers 500; AWS answers
    // 400 XAmzContentSHA256Mismatch. Either way the body is refused; the client would retry a
    // 500 and resend the intact body.
    assert!(matches!(e.status, Some(400 | 403 | 500)), "{e}");
    let still = common::read_object(&c, &key, Some(10..20)).await;
    assert_eq!(
        &still[..],
        &got[..],
        "the tampered PUT did not replace the object"
    );
    c.delete_object(&key).await.unwrap();
}

/// A front for `upstream` that writes each answer's header block and the rest in two writes,
/// with Nagle's algorithm on, as Garage and many HTTP servers do: the rest goes out only once
/// the client has acknowledged the headers.
async fn split_answer_front(upstream: String) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(up) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut from_client, mut to_client) = conn.into_split();
                let (mut from_server, mut to_server) = up.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
                });
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n @ 1..) = from_server.read(&mut buf).await {
                    // The front's own side acknowledges at once, so the server's Nagle
                    // does not hold the rest here.
                    let _ = socket2::SockRef::from(from_server.as_ref()).set_tcp_quickack(true);
                    let data = &buf[..n];
                    let split = data
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map_or(n, |i| i + 4);
                    for piece in [&data[..split], &data[split..]] {
                        if !piece.is_empty() && to_client.write_all(piece).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A small GET on a kept-alive connection does not wait for the delayed ACK of its headers
/// (Linux holds it 40 ms or more; a server with Nagle's algorithm holds the body until then).
#[tokio::test(flavor = "multi_thread")]
async fn small_gets_do_not_wait_for_a_delayed_ack() {
    let env = ServerEnv::main();
    let key = format!("{}small", unique_prefix("quickack"));
    env.client()
        .put_object(
            &key,
            PutBody::from(vec![7u8; 5000]),
            &ObjectAttributes::default(),
        )
        .await
        .unwrap();
    let front = split_answer_front(env.authority()).await;
    let mut cfg = env.config();
    cfg.endpoint_url = Some(format!("http://{front}"));
    let c = S3Client::new(cfg).unwrap();
    let mut took = Vec::new();
    for _ in 0..9 {
        let started = std::time::Instant::now();
        assert_eq!(common::read_object(&c, &key, None).await.len(), 5000);
        took.push(started.elapsed());
    }
    took.sort();
    // Each GET takes a few ms on a loopback server; with the ACK delayed, 40 ms or more. The
    // median of nine leaves room for a busy machine.
    assert!(
        took[4] < Duration::from_millis(25),
        "a small GET takes {:?} (all: {took:?})",
        took[4]
    );
}
