//! One body of tests for every `ObjectClient`: `tests/mock_client.rs` runs it over the mock,
//! `tests/s3_client.rs` over the real server. If the mock drifts from S3, these fail there.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use s3mount::s3::*;

use super::{pattern, sha256_hex};

async fn read_all<C: ObjectClient>(c: &C, key: &str) -> Bytes {
    super::read_object(c, key, None).await
}

/// Collects a whole listing, following continuation tokens; returns (keys, prefixes, pages).
pub async fn list_all<C: ObjectClient>(
    c: &C,
    prefix: &str,
    delimiter: Option<&str>,
) -> (Vec<String>, Vec<String>, usize) {
    let mut keys = Vec::new();
    let mut prefixes = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = c
            .list_objects(&ListRequest {
                prefix,
                delimiter,
                continuation_token: token.as_deref(),
                ..Default::default()
            })
            .await
            .expect("list");
        pages += 1;
        keys.extend(page.objects.into_iter().map(|o| o.key));
        prefixes.extend(page.common_prefixes);
        match page.next_continuation_token {
            Some(t) => token = Some(t),
            None => return (keys, prefixes, pages),
        }
    }
}

pub async fn put_get_head_delete<C: ObjectClient>(c: &C, prefix: &str) {
    let key = format!("{prefix}hello.txt");
    let attrs = ObjectAttributes {
        content_type: Some("text/plain".into()),
        metadata: BTreeMap::from([
            ("mode".to_string(), "33188".to_string()),
            ("mtime".to_string(), "1700000000".to_string()),
        ]),
        ..Default::default()
    };
    let etag = c
        .put_object(&key, PutBody::from("hello, world"), &attrs)
        .await
        .unwrap();
    assert!(etag.starts_with('"') && etag.len() > 2, "{etag}");

    let head = c.head_object(&key).await.unwrap();
    assert_eq!(head.size, 12);
    assert_eq!(head.etag, etag);
    assert_eq!(head.content_type.as_deref(), Some("text/plain"));
    assert_eq!(head.metadata.get("mode").map(String::as_str), Some("33188"));
    assert_eq!(
        head.metadata.get("mtime").map(String::as_str),
        Some("1700000000")
    );
    let age = std::time::SystemTime::now()
        .duration_since(head.last_modified)
        .unwrap_or_default();
    assert!(age.as_secs() < 600, "Last-Modified is recent: {age:?}");

    assert_eq!(&read_all(c, &key).await[..], b"hello, world");

    // Ranges: inside, to the end, and past the end (clamped, as S3 does).
    let mid = c.get_object(&key, Some(7..12), None).await.unwrap();
    assert_eq!(mid.range, 7..12);
    assert_eq!(
        mid.head.size, 12,
        "the head carries the whole object's size"
    );
    assert_eq!(&mid.body.collect(5).await.unwrap()[..], b"world");
    let tail = c.get_object(&key, Some(10..100), None).await.unwrap();
    assert_eq!(tail.range, 10..12);
    assert_eq!(&tail.body.collect(2).await.unwrap()[..], b"ld");

    // If-Match: the right ETag reads, a stale one is refused.
    assert!(c.get_object(&key, Some(0..5), Some(&etag)).await.is_ok());
    let stale = c
        .get_object(
            &key,
            Some(0..5),
            Some("\"00000000000000000000000000000000\""),
        )
        .await
        .unwrap_err();
    assert_eq!(stale.kind, ErrorKind::PreconditionFailed, "{stale}");

    c.delete_object(&key).await.unwrap();
    let gone = c.head_object(&key).await.unwrap_err();
    assert_eq!(gone.kind, ErrorKind::NoSuchKey, "{gone}");
    let gone = c.get_object(&key, None, None).await.unwrap_err();
    assert_eq!(gone.kind, ErrorKind::NoSuchKey, "{gone}");
    assert_eq!(gone.key.as_deref(), Some(key.as_str()));
    // Deleting what is not there is not an error (S3 semantics).
    c.delete_object(&key).await.unwrap();
}

/// Every character the issue names, in file names and directory names.
pub const AWKWARD_NAMES: &[&str] = &[
    "with space",
    "ünïcødé-日本",
    "plus+sign",
    "per%cent",
    "tilde~",
    "equals=",
    "amp&ersand",
    "question?mark",
    "hash#tag",
    "semi;colon",
    "quote'\"",
    "angle<>",
    "star*",
    "a%2Fb",
    "x+y%20z",
];

pub async fn awkward_keys<C: ObjectClient>(c: &C, prefix: &str) {
    let mut expected = BTreeSet::new();
    for (i, name) in AWKWARD_NAMES.iter().enumerate() {
        let key = format!("{prefix}{name}/{name}.bin");
        let body = format!("body of {name}");
        c.put_object(
            &key,
            PutBody::from(body.clone().into_bytes()),
            &ObjectAttributes::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("put {key:?}: {e}"));
        assert_eq!(&read_all(c, &key).await[..], body.as_bytes(), "{key:?}");
        let copy = format!("{prefix}copies/{i}-{name}");
        c.copy_object(&key, &copy, &MetadataDirective::Copy)
            .await
            .unwrap_or_else(|e| panic!("copy {key:?}: {e}"));
        expected.insert(key);
        expected.insert(copy);
    }
    let (keys, _, _) = list_all(c, prefix, None).await;
    assert_eq!(keys.into_iter().collect::<BTreeSet<_>>(), expected);
    let (_, prefixes, _) = list_all(c, prefix, Some("/")).await;
    let mut want: BTreeSet<String> = AWKWARD_NAMES
        .iter()
        .map(|n| format!("{prefix}{n}/"))
        .collect();
    want.insert(format!("{prefix}copies/"));
    assert_eq!(prefixes.into_iter().collect::<BTreeSet<_>>(), want);
    let all: Vec<String> = expected.into_iter().collect();
    let out = c.delete_objects(&all).await.unwrap();
    assert!(out.failed.is_empty(), "{:?}", out.failed);
    assert_eq!(out.deleted.len(), all.len());
    assert!(list_all(c, prefix, None).await.0.is_empty());
}

/// `count` keys spread over nested "directories", listed flat in pages and by delimiter.
pub async fn large_listing<C: ObjectClient>(c: Arc<C>, prefix: &str, count: usize) {
    let mut set = tokio::task::JoinSet::new();
    let keys: Vec<String> = (0..count)
        .map(|i| format!("{prefix}d{}/k{i:05}", i % 7))
        .collect();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(32));
    for key in keys.clone() {
        let (c, s) = (c.clone(), semaphore.clone());
        set.spawn(async move {
            let _permit = s.acquire_owned().await.unwrap();
            c.put_object(
                &key,
                PutBody::from(Vec::new()),
                &ObjectAttributes::default(),
            )
            .await
            .map(|_| ())
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    let (listed, prefixes, pages) = list_all(&*c, prefix, None).await;
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(
        listed, sorted,
        "flat listing is complete, exact and in order"
    );
    assert!(
        pages >= count.div_ceil(1000),
        "{pages} pages for {count} keys"
    );
    assert!(prefixes.is_empty());

    let (top_keys, top_prefixes, _) = list_all(&*c, prefix, Some("/")).await;
    assert!(top_keys.is_empty());
    assert_eq!(
        top_prefixes,
        (0..7).map(|d| format!("{prefix}d{d}/")).collect::<Vec<_>>()
    );

    // Small pages and start-after.
    let page = c
        .list_objects(&ListRequest {
            prefix,
            max_keys: Some(3),
            start_after: Some(&sorted[10]),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        page.objects
            .iter()
            .map(|o| o.key.clone())
            .collect::<Vec<_>>(),
        sorted[11..14].to_vec()
    );
    assert!(page.next_continuation_token.is_some());

    for chunk in sorted.chunks(MAX_DELETE_KEYS) {
        let out = c.delete_objects(chunk).await.unwrap();
        assert!(out.failed.is_empty(), "{:?}", out.failed);
    }
    assert!(list_all(&*c, prefix, None).await.0.is_empty());
}

pub const MIB: usize = 1024 * 1024;

/// Multipart upload with parts sent concurrently with `checksum`, listed while open, then
/// completed.
pub async fn multipart_roundtrip<C: ObjectClient>(c: Arc<C>, prefix: &str, checksum: Checksum) {
    let key = format!("{prefix}multi.bin");
    let data = Bytes::from(pattern(3 * 5 * MIB + 12345, 7));
    let attrs = ObjectAttributes {
        metadata: BTreeMap::from([("origin".to_string(), "multipart".to_string())]),
        ..Default::default()
    };
    let upload_id = c
        .create_multipart_upload(&key, &attrs, checksum)
        .await
        .unwrap();

    let mut set = tokio::task::JoinSet::new();
    for (i, chunk) in data.chunks(5 * MIB).enumerate() {
        let (c, key, id) = (c.clone(), key.clone(), upload_id.clone());
        let body = data.slice_ref(chunk);
        set.spawn(async move {
            let n = i as u32 + 1;
            let sha256 = super::sha256_hex(&body);
            let crc = crc32c::crc32c(&body);
            c.upload_part(&key, &id, n, PutBody::Bytes(body), checksum)
                .await
                .map(|stored| {
                    let (want_sha, want_crc) = match checksum {
                        Checksum::Sha256 => (Some(sha256), None),
                        Checksum::Crc32c => (None, Some(crc)),
                        Checksum::Off => (None, None),
                    };
                    assert_eq!(
                        (stored.sha256_hex, stored.crc32c),
                        (want_sha, want_crc),
                        "the digest of what was sent"
                    );
                    CompletedPart {
                        part_number: n,
                        etag: stored.etag,
                        crc32c: stored.crc32c,
                    }
                })
        });
    }
    let mut parts = Vec::new();
    while let Some(r) = set.join_next().await {
        parts.push(r.unwrap().unwrap());
    }
    parts.sort_by_key(|p| p.part_number);
    assert_eq!(parts.len(), 4);

    let listed = c.list_parts(&key, &upload_id, None).await.unwrap();
    assert_eq!(
        listed
            .parts
            .iter()
            .map(|p| p.part_number)
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(
        listed.parts.iter().map(|p| p.size).sum::<u64>(),
        data.len() as u64
    );
    for (l, p) in listed.parts.iter().zip(&parts) {
        assert_eq!(l.etag, p.etag);
    }
    let uploads = c.list_multipart_uploads(prefix, None).await.unwrap();
    assert!(
        uploads
            .uploads
            .iter()
            .any(|u| u.upload_id == upload_id && u.key == key),
        "{uploads:?}"
    );

    let etag = c
        .complete_multipart_upload(&key, &upload_id, &parts)
        .await
        .unwrap();
    assert!(etag.ends_with("-4\""), "multipart ETag: {etag}");
    let got = read_all(&*c, &key).await;
    assert_eq!(sha256_hex(&got), sha256_hex(&data));
    let head = c.head_object(&key).await.unwrap();
    assert_eq!(
        head.metadata.get("origin").map(String::as_str),
        Some("multipart")
    );
    let uploads = c.list_multipart_uploads(prefix, None).await.unwrap();
    assert!(
        uploads.uploads.iter().all(|u| u.upload_id != upload_id),
        "completed upload is gone"
    );

    // UploadPartCopy: a new object from two ranges of the first, one of them 5 MiB+.
    let copy_key = format!("{prefix}copied.bin");
    let id2 = c
        .create_multipart_upload(&copy_key, &ObjectAttributes::default(), Checksum::Sha256)
        .await
        .unwrap();
    let split = 6 * MIB as u64;
    let e1 = c
        .upload_part_copy(&copy_key, &id2, 1, CopySource::range(&key, 0..split))
        .await
        .unwrap();
    let e2 = c
        .upload_part_copy(
            &copy_key,
            &id2,
            2,
            CopySource::range(&key, split..data.len() as u64),
        )
        .await
        .unwrap();
    c.complete_multipart_upload(
        &copy_key,
        &id2,
        &[
            CompletedPart {
                part_number: 1,
                etag: e1,
                crc32c: None,
            },
            CompletedPart {
                part_number: 2,
                etag: e2,
                crc32c: None,
            },
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        sha256_hex(&read_all(&*c, &copy_key).await),
        sha256_hex(&data)
    );

    // An aborted upload leaves nothing behind.
    let aborted_key = format!("{prefix}aborted.bin");
    let id3 = c
        .create_multipart_upload(&aborted_key, &ObjectAttributes::default(), checksum)
        .await
        .unwrap();
    c.upload_part(
        &aborted_key,
        &id3,
        1,
        PutBody::from(vec![1u8; 1000]),
        checksum,
    )
    .await
    .unwrap();
    c.abort_multipart_upload(&aborted_key, &id3).await.unwrap();
    let uploads = c.list_multipart_uploads(prefix, None).await.unwrap();
    assert!(uploads.uploads.iter().all(|u| u.upload_id != id3));
    assert_eq!(
        c.head_object(&aborted_key).await.unwrap_err().kind,
        ErrorKind::NoSuchKey
    );
    let err = c.list_parts(&aborted_key, &id3, None).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::NoSuchUpload, "{err}");

    c.delete_objects(&[key, copy_key]).await.unwrap();
}

/// CopyObject keeps metadata with COPY and replaces it with REPLACE.
pub async fn copy_metadata<C: ObjectClient>(c: &C, prefix: &str) {
    let src = format!("{prefix}src");
    let attrs = ObjectAttributes {
        content_type: Some("application/x-test".into()),
        metadata: BTreeMap::from([
            ("mode".to_string(), "33188".to_string()),
            ("uid".to_string(), "1000".to_string()),
        ]),
        ..Default::default()
    };
    c.put_object(&src, PutBody::from("data"), &attrs)
        .await
        .unwrap();

    let kept = format!("{prefix}kept");
    c.copy_object(&src, &kept, &MetadataDirective::Copy)
        .await
        .unwrap();
    let head = c.head_object(&kept).await.unwrap();
    assert_eq!(head.metadata, attrs.metadata);
    assert_eq!(head.content_type.as_deref(), Some("application/x-test"));

    let new_attrs = ObjectAttributes {
        content_type: Some("text/plain".into()),
        metadata: BTreeMap::from([
            ("mode".to_string(), "33261".to_string()),
            ("mtime".to_string(), "1234567890".to_string()),
        ]),
        ..Default::default()
    };
    // In place, as chmod on a closed file does.
    c.copy_object(&src, &src, &MetadataDirective::Replace(new_attrs.clone()))
        .await
        .unwrap();
    let head = c.head_object(&src).await.unwrap();
    assert_eq!(
        head.metadata, new_attrs.metadata,
        "REPLACE drops uid and sets mode and mtime"
    );
    assert_eq!(head.content_type.as_deref(), Some("text/plain"));
    assert_eq!(&read_all(c, &src).await[..], b"data");

    let missing = c
        .copy_object(&format!("{prefix}nope"), &kept, &MetadataDirective::Copy)
        .await
        .unwrap_err();
    assert_eq!(missing.kind, ErrorKind::NoSuchKey, "{missing}");
    c.delete_objects(&[src, kept]).await.unwrap();
}
