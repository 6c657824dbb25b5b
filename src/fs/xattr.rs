//! Extended attributes in the s3fs-fuse format: one `x-amz-meta-xattr` header holding
//! `{"name":"base64(value)",...}`, percent-encoded so any byte survives an HTTP header.

use std::collections::BTreeMap;

use base64::Engine as _;

/// The metadata name (after `x-amz-meta-`) the map is stored under.
pub const HEADER: &str = "xattr";

/// S3's limit on all user metadata of an object (names and values), in bytes.
pub const METADATA_LIMIT: usize = 2048;

/// The namespaces a name may be in: the user's, trusted and security attributes, and POSIX
/// ACLs (stored, not enforced: the kernel's `default_permissions` checks the mode bits).
pub fn allowed(name: &str) -> bool {
    ["user.", "trusted.", "security."]
        .iter()
        .any(|ns| name.len() > ns.len() && name.starts_with(ns))
        || name == "system.posix_acl_access"
        || name == "system.posix_acl_default"
}

/// The header value of `attrs`, or `None` when there are none (no header is stored).
pub fn encode(attrs: &BTreeMap<String, Vec<u8>>) -> Option<String> {
    if attrs.is_empty() {
        return None;
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let body: Vec<String> = attrs
        .iter()
        .map(|(k, v)| format!("\"{}\":\"{}\"", json_escape(k), b64.encode(v)))
        .collect();
    Some(percent_encode(&format!("{{{}}}", body.join(","))))
}

/// The map a header value holds; entries that cannot be read are left out (a value written by
/// another tool must not make the file unreadable).
pub fn decode(header: &str) -> BTreeMap<String, Vec<u8>> {
    let text = percent_decode(header);
    let b64 = base64::engine::general_purpose::STANDARD;
    let inner = text.trim().trim_start_matches('{').trim_end_matches('}');
    let mut out = BTreeMap::new();
    for pair in split_pairs(inner) {
        let Some((k, v)) = pair.split_once(':') else {
            continue;
        };
        let (Some(k), Some(v)) = (unquote(k), unquote(v)) else {
            continue;
        };
        if let Ok(value) = b64.decode(v.as_bytes()) {
            out.insert(k, value);
        }
    }
    out
}

/// The pairs of a JSON object's body, split at commas outside strings.
fn split_pairs(s: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

fn unquote(s: &str) -> Option<String> {
    let s = s.trim().strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                c => out.push(c),
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

fn json_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Every byte but the unreserved ones as `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The bytes `metadata` takes in S3's accounting (names and values).
pub fn metadata_size(metadata: &BTreeMap<String, String>) -> usize {
    metadata.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// The permission bits a POSIX ACL (`system.posix_acl_access`, in the kernel's xattr form)
/// stands for, and whether it is *minimal* (owner, group and other only: the mode says all of
/// it, so it is kept as the mode, as local file systems do). The group bits are the mask's
/// when there is one. `None` for a value that is not an ACL.
pub fn acl_mode(value: &[u8]) -> Option<(u32, bool)> {
    const USER_OBJ: u16 = 0x01;
    const GROUP_OBJ: u16 = 0x04;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    let (header, entries) = value.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*header) != 2 || entries.is_empty() || entries.len() % 8 != 0 {
        return None;
    }
    let (mut user, mut group, mut mask, mut other) = (None, None, None, None);
    let mut minimal = true;
    for e in entries.chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u32::from(u16::from_le_bytes([e[2], e[3]]) & 0o7);
        match tag {
            USER_OBJ => user = Some(perm),
            GROUP_OBJ => group = Some(perm),
            MASK => mask = Some(perm),
            OTHER => other = Some(perm),
            _ => minimal = false,
        }
    }
    let bits = (user? << 6) | (mask.or(group)? << 3) | other?;
    Some((bits, minimal && mask.is_none()))
}

#[cfg(test)]
mod tests {
    /// An ACL in the kernel's xattr form from (tag, perm) entries.
    fn acl(entries: &[(u16, u16)]) -> Vec<u8> {
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, perm) in entries {
            v.extend(tag.to_le_bytes());
            v.extend(perm.to_le_bytes());
            v.extend(u32::MAX.to_le_bytes());
        }
        v
    }

    #[test]
    fn an_access_acl_gives_the_mode_it_stands_for() {
        use super::acl_mode;
        // What cp -p sets for a file of mode 0640.
        assert_eq!(
            acl_mode(&acl(&[(1, 6), (4, 4), (0x20, 0)])),
            Some((0o640, true))
        );
        // A named user and a mask: the group bits are the mask's, and it is no mode alone.
        assert_eq!(
            acl_mode(&acl(&[(1, 6), (2, 6), (4, 4), (0x10, 6), (0x20, 4)])),
            Some((0o664, false))
        );
        assert_eq!(acl_mode(b"nonsense"), None);
        assert_eq!(acl_mode(&acl(&[(1, 6)])), None, "no group or other entry");
    }

    use super::*;

    #[test]
    fn any_bytes_round_trip_through_the_header() {
        let attrs = BTreeMap::from([
            ("user.plain".to_string(), b"hello".to_vec()),
            (
                "user.odd \"name\", with comma".to_string(),
                vec![0, 255, b'"', b','],
            ),
            (
                "system.posix_acl_access".to_string(),
                vec![2, 0, 0, 0, 1, 0, 6, 0],
            ),
        ]);
        let header = encode(&attrs).unwrap();
        assert!(header.bytes().all(|b| b.is_ascii_graphic()), "{header}");
        assert_eq!(decode(&header), attrs);
        assert_eq!(encode(&BTreeMap::new()), None);
    }

    #[test]
    fn the_s3fs_form_reads() {
        // {"user.k":"dg=="} as s3fs writes it: percent-encoded JSON of base64 values.
        let header = "%7B%22user.k%22%3A%22dg%3D%3D%22%7D";
        assert_eq!(
            decode(header),
            BTreeMap::from([("user.k".to_string(), b"v".to_vec())])
        );
        assert!(decode("not a map").is_empty());
    }

    #[test]
    fn names_outside_the_known_namespaces_are_refused() {
        assert!(allowed("user.a") && allowed("trusted.b") && allowed("security.selinux"));
        assert!(allowed("system.posix_acl_default"));
        assert!(!allowed("user.") && !allowed("system.other") && !allowed("plain"));
    }
}
