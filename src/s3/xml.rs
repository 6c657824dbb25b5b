//! XML in and out. Responses are read with quick-xml into a small element tree (listings, the
//! bulk of what is read, as a stream), then into the plain structs of [`super::client`];
//! request bodies (CompleteMultipartUpload, DeleteObjects) are written by hand with escaping.
//! Parsers take `&str` and do no I/O.

use std::time::SystemTime;

use base64::Engine as _;
use quick_xml::escape::escape;
use quick_xml::events::Event;
use quick_xml::Reader;

use super::client::{
    CompletedPart, DeleteFailure, DeleteObjectsOutput, ListPage, ListPartsPage, ListUploadsPage,
    ObjectInfo, PartInfo, UploadInfo,
};

/// An XML element: its local name, its text and its children. Namespaces are dropped; S3
/// documents do not depend on them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn children<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The text of the first child called `name`.
    pub fn text_of(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed XML: {0}")]
pub struct XmlError(pub String);

/// Parses a whole document into its root element.
pub fn parse(text: &str) -> Result<Element, XmlError> {
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Element> = Vec::new();
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => stack.push(Element {
                name: local_name(e.local_name().as_ref()),
                ..Element::default()
            }),
            Ok(Event::Empty(e)) => {
                let el = Element {
                    name: local_name(e.local_name().as_ref()),
                    ..Element::default()
                };
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => return Ok(el),
                }
            }
            Ok(Event::Text(t)) => {
                if let Some(top) = stack.last_mut() {
                    let s = t.unescape().map_err(|e| XmlError(e.to_string()))?;
                    top.text.push_str(&s);
                }
            }
            Ok(Event::CData(t)) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Ok(Event::End(_)) => {
                let done = stack
                    .pop()
                    .ok_or_else(|| XmlError("unbalanced end tag".into()))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(done),
                    None => return Ok(done),
                }
            }
            Ok(Event::Eof) => return Err(XmlError("no root element".into())),
            Ok(_) => {}
            Err(e) => return Err(XmlError(e.to_string())),
        }
    }
}

/// The local name of the root element, read without the rest of the document.
fn root_name(text: &str) -> Option<String> {
    let mut reader = Reader::from_str(text);
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) | Ok(Event::Empty(e)) => {
                return Some(local_name(e.local_name().as_ref()))
            }
            Ok(Event::Eof) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

fn local_name(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

/// An `<Error>` document: code, message, request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorDocument {
    pub code: String,
    pub message: String,
    pub request_id: Option<String>,
}

/// Reads an `<Error>` document; `None` if the text is another document, or not XML.
pub fn error_document(text: &str) -> Option<ErrorDocument> {
    // Only the root is read of other documents: a listing page is 8,000 elements, which its
    // own parser reads once.
    if root_name(text)? != "Error" {
        return None;
    }
    let root = parse(text).ok()?;
    Some(ErrorDocument {
        code: root.text_of("Code").unwrap_or("").to_string(),
        message: root.text_of("Message").unwrap_or("").to_string(),
        request_id: root.text_of("RequestId").map(str::to_string),
    })
}

/// Decodes a value sent under `encoding-type=url`. S3 writes spaces as `+` there (form style);
/// a literal `+` arrives as `%2B`, so turning `+` into a space first is safe.
pub fn url_decode(s: &str) -> String {
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

/// A key or prefix as sent: URL-decoded when the request asked for `encoding-type=url`.
fn decode_if(s: &str, url_encoded: bool) -> String {
    if url_encoded {
        url_decode(s)
    } else {
        s.to_string()
    }
}

fn required<'a>(el: &'a Element, name: &str) -> Result<&'a str, XmlError> {
    el.text_of(name)
        .ok_or_else(|| XmlError(format!("<{}> has no <{name}>", el.name)))
}

fn parse_number<T: std::str::FromStr>(el: &Element, name: &str) -> Result<T, XmlError> {
    number(name, required(el, name)?)
}

/// The text of element `name` as a number.
fn number<T: std::str::FromStr>(name: &str, text: &str) -> Result<T, XmlError> {
    text.trim()
        .parse()
        .map_err(|_| XmlError(format!("<{name}> is not a number: {text:?}")))
}

/// ISO 8601 timestamps as S3 writes them in listings (`2009-10-12T17:50:30.000Z`).
pub fn parse_timestamp(text: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// ListObjectsV2. `url_encoded` says whether the request asked for `encoding-type=url`.
///
/// Read as a stream, not through [`parse`]'s tree: a page of 1,000 keys is 8,000 elements, and
/// a tree of them cost a name and a text allocation each; listings of large trees spent half
/// the mount's CPU in the allocator. Here element names are matched to a `Name`, not kept, and only the
/// texts of the fields read are kept.
pub fn list_objects(text: &str, url_encoded: bool) -> Result<ListPage, XmlError> {
    /// The fields of one `<Contents>` as they arrive.
    #[derive(Default)]
    struct Object {
        key: Option<String>,
        size: Option<String>,
        etag: Option<String>,
        last_modified: Option<String>,
        storage_class: Option<String>,
    }
    /// The elements a listing is read for; every other is `Other`.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Name {
        Contents,
        CommonPrefixes,
        Key,
        Size,
        ETag,
        LastModified,
        StorageClass,
        Prefix,
        IsTruncated,
        NextContinuationToken,
        Other,
    }
    fn name_of(name: &[u8]) -> Name {
        match name {
            b"Contents" => Name::Contents,
            b"CommonPrefixes" => Name::CommonPrefixes,
            b"Key" => Name::Key,
            b"Size" => Name::Size,
            b"ETag" => Name::ETag,
            b"LastModified" => Name::LastModified,
            b"StorageClass" => Name::StorageClass,
            b"Prefix" => Name::Prefix,
            b"IsTruncated" => Name::IsTruncated,
            b"NextContinuationToken" => Name::NextContinuationToken,
            _ => Name::Other,
        }
    }
    let decode = |s: &str| decode_if(s, url_encoded);
    let mut reader = Reader::from_str(text);
    let mut page = ListPage::default();
    // The open elements below the root (only the first two levels matter).
    let mut open: Vec<Name> = Vec::new();
    let mut root_open = false;
    let mut text = String::new();
    // Filled inside a `<Contents>` or `<CommonPrefixes>`, taken when it ends.
    let mut object = Object::default();
    let mut prefix: Option<String> = None;
    let (mut truncated, mut token) = (false, None);
    loop {
        let (started, ends) = match reader.read_event() {
            Ok(Event::Start(e)) => (Some(name_of(e.local_name().as_ref())), false),
            Ok(Event::Empty(e)) => (Some(name_of(e.local_name().as_ref())), true),
            Ok(Event::End(_)) => (None, true),
            Ok(Event::Text(t)) => {
                text.push_str(&t.unescape().map_err(|e| XmlError(e.to_string()))?);
                continue;
            }
            Ok(Event::CData(t)) => {
                text.push_str(&String::from_utf8_lossy(&t));
                continue;
            }
            Ok(Event::Eof) if root_open => return Err(XmlError("unbalanced end tag".into())),
            Ok(Event::Eof) => return Err(XmlError("no root element".into())),
            Ok(_) => continue,
            Err(e) => return Err(XmlError(e.to_string())),
        };
        if let Some(started) = started {
            text.clear();
            if !root_open {
                root_open = true;
                if ends {
                    break; // an empty root: an empty page
                }
                continue;
            }
            open.push(started);
            if !ends {
                continue;
            }
        }
        // An element ends: the innermost open one, or the root.
        let Some(ended) = open.pop() else {
            break; // the root
        };
        let value = std::mem::take(&mut text);
        match (open.as_slice(), ended) {
            ([Name::Contents], field) => {
                let slot = match field {
                    Name::Key => &mut object.key,
                    Name::Size => &mut object.size,
                    Name::ETag => &mut object.etag,
                    Name::LastModified => &mut object.last_modified,
                    Name::StorageClass => &mut object.storage_class,
                    _ => continue,
                };
                slot.get_or_insert(value);
            }
            ([Name::CommonPrefixes], Name::Prefix) => {
                prefix.get_or_insert(value);
            }
            ([], Name::Contents) => {
                let o = std::mem::take(&mut object);
                let key = o
                    .key
                    .ok_or_else(|| XmlError("<Contents> has no <Key>".into()))?;
                let size = o
                    .size
                    .ok_or_else(|| XmlError("<Contents> has no <Size>".into()))?;
                page.objects.push(ObjectInfo {
                    key: decode(&key),
                    size: number("Size", &size)?,
                    etag: o.etag.unwrap_or_default(),
                    last_modified: o
                        .last_modified
                        .as_deref()
                        .and_then(parse_timestamp)
                        .unwrap_or(SystemTime::UNIX_EPOCH),
                    storage_class: o.storage_class,
                });
            }
            ([], Name::CommonPrefixes) => {
                let p = prefix
                    .take()
                    .ok_or_else(|| XmlError("<CommonPrefixes> has no <Prefix>".into()))?;
                page.common_prefixes.push(decode(&p));
            }
            ([], Name::IsTruncated) => truncated = value == "true",
            ([], Name::NextContinuationToken) => {
                token.get_or_insert(value);
            }
            _ => {}
        }
    }
    page.next_continuation_token = token.filter(|t: &String| truncated && !t.is_empty());
    if truncated && page.next_continuation_token.is_none() {
        return Err(XmlError(
            "truncated listing without NextContinuationToken".into(),
        ));
    }
    Ok(page)
}

pub fn initiate_multipart_upload(text: &str) -> Result<String, XmlError> {
    Ok(required(&parse(text)?, "UploadId")?.to_string())
}

/// CopyObjectResult, CopyPartResult and CompleteMultipartUploadResult all carry an `<ETag>`.
pub fn etag_of(text: &str) -> Result<String, XmlError> {
    Ok(required(&parse(text)?, "ETag")?.to_string())
}

pub fn list_parts(text: &str) -> Result<ListPartsPage, XmlError> {
    let root = parse(text)?;
    let mut page = ListPartsPage::default();
    for p in root.children("Part") {
        page.parts.push(PartInfo {
            part_number: parse_number(p, "PartNumber")?,
            etag: required(p, "ETag")?.to_string(),
            size: parse_number(p, "Size")?,
        });
    }
    if root.text_of("IsTruncated") == Some("true") {
        page.next_part_number_marker = Some(parse_number(&root, "NextPartNumberMarker")?);
    }
    Ok(page)
}

pub fn list_multipart_uploads(text: &str, url_encoded: bool) -> Result<ListUploadsPage, XmlError> {
    let root = parse(text)?;
    let decode = |s: &str| decode_if(s, url_encoded);
    let mut page = ListUploadsPage::default();
    for u in root.children("Upload") {
        page.uploads.push(UploadInfo {
            key: decode(required(u, "Key")?),
            upload_id: required(u, "UploadId")?.to_string(),
            initiated: u.text_of("Initiated").and_then(parse_timestamp),
        });
    }
    if root.text_of("IsTruncated") == Some("true") {
        page.next_marker = Some((
            decode(required(&root, "NextKeyMarker")?),
            required(&root, "NextUploadIdMarker")?.to_string(),
        ));
    }
    Ok(page)
}

pub fn delete_objects_result(text: &str) -> Result<DeleteObjectsOutput, XmlError> {
    let root = parse(text)?;
    let mut out = DeleteObjectsOutput::default();
    for d in root.children("Deleted") {
        out.deleted.push(required(d, "Key")?.to_string());
    }
    for e in root.children("Error") {
        out.failed.push(DeleteFailure {
            key: required(e, "Key")?.to_string(),
            code: e.text_of("Code").unwrap_or("").to_string(),
            message: e.text_of("Message").unwrap_or("").to_string(),
        });
    }
    Ok(out)
}

pub fn complete_multipart_upload_body(parts: &[CompletedPart]) -> String {
    let mut body = String::from("<CompleteMultipartUpload>");
    for p in parts {
        body.push_str(&format!(
            "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag>",
            p.part_number,
            escape(p.etag.as_str())
        ));
        if let Some(crc) = p.crc32c {
            let value = base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes());
            body.push_str(&format!("<ChecksumCRC32C>{value}</ChecksumCRC32C>"));
        }
        body.push_str("</Part>");
    }
    body.push_str("</CompleteMultipartUpload>");
    body
}

pub fn delete_objects_body(keys: &[String]) -> String {
    let mut body = String::from("<Delete><Quiet>false</Quiet>");
    for k in keys {
        body.push_str("<Object><Key>");
        body.push_str(&escape_key(k));
        body.push_str("</Key></Object>");
    }
    body.push_str("</Delete>");
    body
}

/// Escapes a key for an XML body. Control characters cannot be written in XML 1.0 text at all,
/// except as character references, which S3 accepts.
fn escape_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for c in key.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 => out.push_str(&format!("&#{};", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_with_url_encoding() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>b</Name><Prefix>a%2F</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys>
  <EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>
  <Contents><Key>a/x+y%2Bz%26%3C</Key><LastModified>2009-10-12T17:50:30.000Z</LastModified>
    <ETag>&quot;abc&quot;</ETag><Size>434234</Size><StorageClass>STANDARD</StorageClass></Contents>
  <CommonPrefixes><Prefix>a/sub%20dir/</Prefix></CommonPrefixes>
  <NextContinuationToken>tok==</NextContinuationToken>
</ListBucketResult>"#;
        let page = list_objects(xml, true).unwrap();
        assert_eq!(page.objects.len(), 1);
        assert_eq!(page.objects[0].key, "a/x y+z&<");
        assert_eq!(page.objects[0].etag, "\"abc\"");
        assert_eq!(page.objects[0].size, 434234);
        assert_eq!(
            page.objects[0].last_modified,
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1255369830)
        );
        assert_eq!(page.common_prefixes, vec!["a/sub dir/".to_string()]);
        assert_eq!(page.next_continuation_token.as_deref(), Some("tok=="));
    }

    #[test]
    fn listing_pages_read_as_a_stream_keep_every_field() {
        let xml = "<ListBucketResult><Name>b</Name><IsTruncated>false</IsTruncated>\
            <Contents><Key> sp ace </Key><LastModified>2009-10-12T17:50:30.000Z</LastModified>\
            <ETag>\"1\"</ETag><Size> 5 </Size><Owner><ID>o</ID><DisplayName>d</DisplayName>\
            </Owner><StorageClass>STANDARD</StorageClass></Contents>\
            <Contents><Key><![CDATA[c<d]]></Key><Size>0</Size><StorageClass/></Contents>\
            <CommonPrefixes><Prefix>p/</Prefix></CommonPrefixes>\
            <CommonPrefixes><Prefix>q/</Prefix></CommonPrefixes></ListBucketResult>";
        let page = list_objects(xml, false).unwrap();
        let keys: Vec<&str> = page.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, [" sp ace ", "c<d"]);
        assert_eq!(page.objects[0].size, 5);
        assert_eq!(page.objects[0].etag, "\"1\"");
        assert_eq!(page.objects[0].storage_class.as_deref(), Some("STANDARD"));
        assert_eq!(page.objects[1].size, 0);
        assert_eq!(page.objects[1].etag, "");
        assert_eq!(page.objects[1].last_modified, SystemTime::UNIX_EPOCH);
        assert_eq!(page.objects[1].storage_class.as_deref(), Some(""));
        assert_eq!(page.common_prefixes, ["p/", "q/"]);
        assert_eq!(page.next_continuation_token, None);
        assert_eq!(
            list_objects("<ListBucketResult/>", false).unwrap(),
            ListPage::default()
        );
        let unclosed = "<ListBucketResult><Contents><Key>k</Key><Size>1</Size></Contents>";
        assert!(list_objects(unclosed, false).is_err());
        assert!(list_objects("<R><CommonPrefixes></CommonPrefixes></R>", false).is_err());
    }

    #[test]
    fn error_document_is_recognised() {
        let e = error_document(
            "<Error><Code>NoSuchKey</Code><Message>gone</Message><RequestId>r1</RequestId></Error>",
        )
        .unwrap();
        assert_eq!(e.code, "NoSuchKey");
        assert_eq!(e.message, "gone");
        assert_eq!(e.request_id.as_deref(), Some("r1"));
        assert!(error_document("<ListBucketResult/>").is_none());
        assert_eq!(
            root_name("<?xml version=\"1.0\"?>\n<Error><Code>x</Code></Error>").as_deref(),
            Some("Error")
        );
        assert_eq!(
            root_name("<ListBucketResult/>").as_deref(),
            Some("ListBucketResult")
        );
        assert_eq!(root_name("no xml"), None);
    }

    #[test]
    fn bodies_escape_keys() {
        let body = delete_objects_body(&["a&b<c>\"'".to_string(), "t\tab".to_string()]);
        assert!(
            body.contains("<Key>a&amp;b&lt;c&gt;&quot;&apos;</Key>"),
            "{body}"
        );
        assert!(body.contains("<Key>t&#9;ab</Key>"), "{body}");
        let root = parse(&body).unwrap();
        let keys: Vec<_> = root
            .children("Object")
            .map(|o| o.text_of("Key").unwrap().to_string())
            .collect();
        assert_eq!(keys, vec!["a&b<c>\"'", "t\tab"]);
    }

    #[test]
    fn truncated_parts_and_uploads() {
        let parts = list_parts("<ListPartsResult><IsTruncated>true</IsTruncated><NextPartNumberMarker>2</NextPartNumberMarker><Part><PartNumber>1</PartNumber><ETag>\"e1\"</ETag><Size>5</Size></Part></ListPartsResult>").unwrap();
        assert_eq!(parts.parts[0].size, 5);
        assert_eq!(parts.next_part_number_marker, Some(2));
        let ups = list_multipart_uploads("<ListMultipartUploadsResult><IsTruncated>false</IsTruncated><Upload><Key>a%20b</Key><UploadId>u1</UploadId></Upload></ListMultipartUploadsResult>", true).unwrap();
        assert_eq!(ups.uploads[0].key, "a b");
        assert_eq!(ups.next_marker, None);
    }

    #[test]
    fn malformed_documents_are_errors() {
        assert!(parse("<a><b></a>").is_err());
        assert!(list_objects(
            "<ListBucketResult><Contents><Size>1</Size></Contents></ListBucketResult>",
            false
        )
        .is_err());
        assert!(list_objects(
            "<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>",
            false
        )
        .is_err());
    }
}
