//! Server-side copies of one object: CopyObject, or UploadPartCopy in parts above 5 GiB,
//! keeping the object's content type, metadata, storage class and encryption.

use std::collections::BTreeMap;

use super::error::{from_client, FsResult};
use super::write::MAX_COPY_PART;
use super::{xattr, S3Filesystem};
use crate::s3::{
    Checksum, CompletedPart, CopySource, MetadataDirective, ObjectAttributes, ObjectClient,
    ObjectHead,
};

/// Objects up to this size are renamed with one CopyObject; above, with UploadPartCopy.
pub(super) const MAX_SINGLE_COPY: u64 = 5 << 30;

/// Keys copied at once in a directory rename.
pub(super) const RENAME_PARALLELISM: usize = 16;

/// The `x-amz-meta-*` names s3mount writes (s3fs-fuse's): what an attribute change replaces.
const OURS: [&str; 8] = [
    "mode",
    "uid",
    "gid",
    "mtime",
    "ctime",
    "atime",
    "rdev",
    xattr::HEADER,
];

/// `metadata` with our own names replaced by `ours` (one of ours that `ours` lacks, such as
/// the xattr map once the last attribute is removed, goes); other clients' names stay.
pub(super) fn replace_ours(
    metadata: &mut BTreeMap<String, String>,
    ours: BTreeMap<String, String>,
) {
    metadata.retain(|k, _| !OURS.contains(&k.as_str()));
    metadata.extend(ours);
}

/// What `head`'s object is stored with, our own metadata replaced by `ours`: what a copy onto
/// itself, a rename with changed attributes or a rewrite stores.
pub(super) fn kept_with_ours(
    head: &ObjectHead,
    ours: BTreeMap<String, String>,
) -> ObjectAttributes {
    let mut attrs = ObjectAttributes::of_head(head);
    replace_ours(&mut attrs.metadata, ours);
    attrs
}

impl<C: ObjectClient> S3Filesystem<C> {
    /// Moves one object, with its metadata replaced by `replace`'s if given; returns its ETag
    /// before and the copy's ETag.
    pub(super) async fn copy_then_delete(
        &self,
        from: &str,
        to: &str,
        replace: Option<ObjectAttributes>,
    ) -> FsResult<(String, String)> {
        let head = self.client.head_object(from).await.map_err(from_client)?;
        let replacing = replace.is_some();
        // Ours are replaced; other clients' user metadata stays.
        let attrs = match replace {
            Some(r) => kept_with_ours(&head, r.metadata),
            None => ObjectAttributes::of_head(&head),
        };
        let new_etag = if head.size > MAX_SINGLE_COPY {
            self.multipart_copy(from, to, head.size, &attrs).await?
        } else {
            // Not Copy: S3 would store the copy with the bucket's default encryption and
            // storage class, not the object's.
            let directive = if replacing {
                MetadataDirective::Replace(attrs)
            } else {
                MetadataDirective::Keep(attrs)
            };
            self.client
                .copy_object(from, to, &directive)
                .await
                .map_err(from_client)?
        };
        self.client.delete_object(from).await.map_err(from_client)?;
        Ok((head.etag, new_etag))
    }

    /// Copies `from` to `to` server-side in parts (objects over 5 GiB); returns the new ETag.
    pub(super) async fn multipart_copy(
        &self,
        from: &str,
        to: &str,
        size: u64,
        attrs: &ObjectAttributes,
    ) -> FsResult<String> {
        let id = self
            .client
            // Copied parts carry no checksum of ours.
            .create_multipart_upload(to, attrs, Checksum::Sha256)
            .await
            .map_err(from_client)?;
        let mut parts = Vec::new();
        let mut start = 0;
        let mut n = 1;
        while start < size {
            let end = (start + MAX_COPY_PART).min(size);
            match self
                .client
                .upload_part_copy(to, &id, n, CopySource::range(from, start..end))
                .await
            {
                Ok(etag) => parts.push(CompletedPart {
                    part_number: n,
                    etag,
                    crc32c: None,
                }),
                Err(e) => {
                    let _ = self.client.abort_multipart_upload(to, &id).await;
                    return Err(from_client(e));
                }
            }
            start = end;
            n += 1;
        }
        match self.client.complete_multipart_upload(to, &id, &parts).await {
            Ok(etag) => Ok(etag),
            Err(e) => {
                let _ = self.client.abort_multipart_upload(to, &id).await;
                Err(from_client(e))
            }
        }
    }
}
