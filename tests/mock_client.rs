//! The conformance suite over the in-memory mock, plus the mock's own test hooks (call counts,
//! injected failures) that the filesystem's core tests rely on.

mod common;

use std::sync::Arc;

use common::conformance;
use s3mount::s3::*;

#[tokio::test]
async fn mock_put_get_head_delete() {
    conformance::put_get_head_delete(&MockClient::new("b"), "p/").await;
}

#[tokio::test]
async fn mock_awkward_keys() {
    conformance::awkward_keys(&MockClient::new("b"), "p/").await;
}

#[tokio::test]
async fn mock_large_listing() {
    conformance::large_listing(Arc::new(MockClient::new("b")), "p/", 2500).await;
}

#[tokio::test]
async fn mock_multipart_roundtrip() {
    for checksum in [Checksum::Sha256, Checksum::Crc32c, Checksum::Off] {
        conformance::multipart_roundtrip(Arc::new(MockClient::new("b")), "p/", checksum).await;
    }
}

#[tokio::test]
async fn mock_copy_metadata() {
    conformance::copy_metadata(&MockClient::new("b"), "p/").await;
}

#[tokio::test]
async fn mock_counts_calls_and_injects_failures() {
    let m = MockClient::new("b");
    m.insert("k", "v");
    m.fail_next(Operation::GetObject, ErrorKind::SlowDown, 2);
    for _ in 0..2 {
        let e = m.get_object("k", None, None).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::SlowDown);
        assert!(e.is_transient());
    }
    let ok = m.get_object("k", None, None).await.unwrap();
    assert_eq!(&ok.body.collect(1).await.unwrap()[..], b"v");
    assert_eq!(m.count(Operation::GetObject), 3);
    assert_eq!(m.count(Operation::HeadObject), 0);
}
