//! `Content-Type` of new objects from the file name's extension, as s3fs-fuse and
//! mountpoint-s3 set it: a built-in table of common types, replaced or extended by a
//! mime.types file (`--content-type-map FILE`), or none at all (`--content-type-map off`).
//! Set once, when a file is created; renames and attribute changes keep what the object has.

use std::collections::HashMap;
use std::sync::Arc;

/// The built-in table: extension (lowercase, no dot) and type.
const BUILT_IN: &[(&str, &str)] = &[
    ("txt", "text/plain"),
    ("text", "text/plain"),
    ("log", "text/plain"),
    ("md", "text/markdown"),
    ("csv", "text/csv"),
    ("tsv", "text/tab-separated-values"),
    ("htm", "text/html"),
    ("html", "text/html"),
    ("css", "text/css"),
    ("js", "text/javascript"),
    ("mjs", "text/javascript"),
    ("xml", "application/xml"),
    ("json", "application/json"),
    ("yaml", "application/yaml"),
    ("yml", "application/yaml"),
    ("toml", "application/toml"),
    ("pdf", "application/pdf"),
    ("zip", "application/zip"),
    ("gz", "application/gzip"),
    ("tgz", "application/gzip"),
    ("bz2", "application/x-bzip2"),
    ("xz", "application/x-xz"),
    ("zst", "application/zstd"),
    ("tar", "application/x-tar"),
    ("7z", "application/x-7z-compressed"),
    ("jar", "application/java-archive"),
    ("wasm", "application/wasm"),
    ("parquet", "application/vnd.apache.parquet"),
    ("doc", "application/msword"),
    (
        "docx",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ),
    ("xls", "application/vnd.ms-excel"),
    (
        "xlsx",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ),
    ("ppt", "application/vnd.ms-powerpoint"),
    (
        "pptx",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ),
    ("odt", "application/vnd.oasis.opendocument.text"),
    ("png", "image/png"),
    ("jpg", "image/jpeg"),
    ("jpeg", "image/jpeg"),
    ("gif", "image/gif"),
    ("webp", "image/webp"),
    ("avif", "image/avif"),
    ("svg", "image/svg+xml"),
    ("ico", "image/vnd.microsoft.icon"),
    ("bmp", "image/bmp"),
    ("tif", "image/tiff"),
    ("tiff", "image/tiff"),
    ("mp3", "audio/mpeg"),
    ("ogg", "audio/ogg"),
    ("wav", "audio/wav"),
    ("flac", "audio/flac"),
    ("m4a", "audio/mp4"),
    ("mp4", "video/mp4"),
    ("m4v", "video/mp4"),
    ("mov", "video/quicktime"),
    ("webm", "video/webm"),
    ("mkv", "video/x-matroska"),
    ("avi", "video/x-msvideo"),
    ("woff", "font/woff"),
    ("woff2", "font/woff2"),
    ("ttf", "font/ttf"),
    ("otf", "font/otf"),
];

/// Which `Content-Type` a new object gets.
#[derive(Debug, Clone, Default)]
pub enum ContentTypes {
    /// The built-in table.
    #[default]
    BuiltIn,
    /// A table read from a mime.types file.
    Map(Arc<HashMap<String, String>>),
    /// None: objects are stored without one (S3 then says `binary/octet-stream`).
    Off,
}

impl ContentTypes {
    /// The type of a new file named `name`, if its extension is known.
    pub fn of(&self, name: &str) -> Option<String> {
        let (stem, ext) = name.rsplit_once('.')?;
        if stem.is_empty() {
            return None; // a dot file such as `.bashrc` has no extension
        }
        let ext = ext.to_ascii_lowercase();
        match self {
            ContentTypes::BuiltIn => BUILT_IN
                .iter()
                .find(|(e, _)| *e == ext)
                .map(|(_, t)| t.to_string()),
            ContentTypes::Map(map) => map.get(&ext).cloned(),
            ContentTypes::Off => None,
        }
    }

    /// Parses a mime.types file (`type ext ext ...` per line, `#` comments), as
    /// /etc/mime.types is written. A type without extensions is allowed; a line whose type
    /// has no `/` is an error naming the line.
    pub fn parse_map(text: &str) -> Result<Self, String> {
        let mut map = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            let mut words = line.split_whitespace();
            let Some(ty) = words.next() else { continue };
            if !ty.contains('/') {
                return Err(format!(
                    "line {}: '{ty}' is not a media type (type/subtype)",
                    n + 1
                ));
            }
            for ext in words {
                map.insert(
                    ext.trim_start_matches('.').to_ascii_lowercase(),
                    ty.to_string(),
                );
            }
        }
        Ok(ContentTypes::Map(Arc::new(map)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_come_from_the_last_extension_in_any_case() {
        let t = ContentTypes::BuiltIn;
        assert_eq!(t.of("a.txt").as_deref(), Some("text/plain"));
        assert_eq!(t.of("B.PNG").as_deref(), Some("image/png"));
        assert_eq!(t.of("x.tar.gz").as_deref(), Some("application/gzip"));
        assert_eq!(t.of("noext"), None);
        assert_eq!(t.of(".bashrc"), None);
        assert_eq!(t.of("a.unknownext"), None);
        assert_eq!(ContentTypes::Off.of("a.txt"), None);
    }

    #[test]
    fn a_mime_types_file_replaces_the_table() {
        let t = ContentTypes::parse_map(
            "# comment\ntext/x-special  spc .SPX\napplication/empty\n\nimage/png png # trailing\n",
        )
        .unwrap();
        assert_eq!(t.of("a.spc").as_deref(), Some("text/x-special"));
        assert_eq!(t.of("a.spx").as_deref(), Some("text/x-special"));
        assert_eq!(t.of("a.png").as_deref(), Some("image/png"));
        assert_eq!(t.of("a.txt"), None, "only the file's types");
        let err = ContentTypes::parse_map("text/plain txt\nnot-a-type foo\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
    }
}
