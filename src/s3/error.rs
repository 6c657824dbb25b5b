//! Errors of the S3 client. Every error names the operation, the key (when there is one), the
//! HTTP status (when a response came back) and what S3 said, so one log line tells a user which
//! request failed and why. Nothing here ever holds a credential.

use std::fmt;

/// One variant per S3 operation the client performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    ListObjectsV2,
    HeadObject,
    GetObject,
    PutObject,
    DeleteObject,
    DeleteObjects,
    CopyObject,
    CreateMultipartUpload,
    UploadPart,
    UploadPartCopy,
    CompleteMultipartUpload,
    AbortMultipartUpload,
    ListParts,
    ListMultipartUploads,
    HeadBucket,
}

impl Operation {
    /// Every operation, in the order stats and metrics list them.
    pub const ALL: [Operation; 15] = [
        Operation::ListObjectsV2,
        Operation::HeadObject,
        Operation::GetObject,
        Operation::PutObject,
        Operation::DeleteObject,
        Operation::DeleteObjects,
        Operation::CopyObject,
        Operation::CreateMultipartUpload,
        Operation::UploadPart,
        Operation::UploadPartCopy,
        Operation::CompleteMultipartUpload,
        Operation::AbortMultipartUpload,
        Operation::ListParts,
        Operation::ListMultipartUploads,
        Operation::HeadBucket,
    ];

    /// Whether repeating the request after an unknown outcome (a timeout, a reset after the
    /// request was sent) is safe. CreateMultipartUpload is not: a repeat makes a second upload
    /// that nobody would complete or abort. Everything else either has no side effect, or
    /// has the same effect when done twice.
    pub fn is_idempotent(self) -> bool {
        !matches!(self, Operation::CreateMultipartUpload)
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What went wrong, as S3 names it (its error `Code`) or as the transport saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    NoSuchKey,
    NoSuchBucket,
    NoSuchUpload,
    AccessDenied,
    SignatureDoesNotMatch,
    InvalidAccessKeyId,
    PreconditionFailed,
    InvalidRange,
    InvalidPart,
    EntityTooSmall,
    SlowDown,
    InternalError,
    ServiceUnavailable,
    RequestTimeout,
    /// The bucket is in another region than the one we signed for.
    WrongRegion,
    /// Any other error code S3 sent.
    Other(String),
    /// No connection could be made (refused, DNS, TLS handshake).
    Connect,
    /// No answer in time.
    Timeout,
    /// The connection broke while the request or response was under way.
    Transport,
    /// The server answered something we could not read (bad XML, missing header).
    InvalidResponse,
    /// The endpoint answered, but not as S3 does: an error without an S3 error document or
    /// request id (a plain web server, a proxy's own page).
    NotS3,
    /// A request we refuse to send (a key the HTTP layer cannot express, for example).
    InvalidRequest,
}

impl ErrorKind {
    pub fn from_code(code: &str) -> Self {
        match code {
            "NoSuchKey" => Self::NoSuchKey,
            "NoSuchBucket" => Self::NoSuchBucket,
            "NoSuchUpload" => Self::NoSuchUpload,
            "AccessDenied" => Self::AccessDenied,
            "SignatureDoesNotMatch" => Self::SignatureDoesNotMatch,
            "InvalidAccessKeyId" => Self::InvalidAccessKeyId,
            "PreconditionFailed" => Self::PreconditionFailed,
            "InvalidRange" => Self::InvalidRange,
            "InvalidPart" | "InvalidPartOrder" => Self::InvalidPart,
            "EntityTooSmall" => Self::EntityTooSmall,
            "SlowDown" => Self::SlowDown,
            "InternalError" => Self::InternalError,
            "ServiceUnavailable" => Self::ServiceUnavailable,
            "RequestTimeout" => Self::RequestTimeout,
            "PermanentRedirect"
            | "AuthorizationHeaderMalformed"
            | "IllegalLocationConstraintException" => Self::WrongRegion,
            other => Self::Other(other.to_string()),
        }
    }

    /// The kind implied by a bare status, for responses without a body (HEAD).
    pub fn from_status(status: u16, op: Operation) -> Self {
        match status {
            404 if op == Operation::HeadBucket => Self::NoSuchBucket,
            404 => Self::NoSuchKey,
            403 => Self::AccessDenied,
            412 => Self::PreconditionFailed,
            416 => Self::InvalidRange,
            301 => Self::WrongRegion,
            408 => Self::RequestTimeout,
            429 => Self::SlowDown,
            503 => Self::ServiceUnavailable,
            s if s >= 500 => Self::InternalError,
            s => Self::Other(format!("HTTP{s}")),
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Other(code) => f.write_str(code),
            Self::Connect => f.write_str("cannot connect"),
            Self::Timeout => f.write_str("timed out"),
            Self::Transport => f.write_str("connection broken"),
            Self::InvalidResponse => f.write_str("unreadable response"),
            Self::NotS3 => f.write_str("not an S3 endpoint"),
            Self::InvalidRequest => f.write_str("invalid request"),
            other => fmt::Debug::fmt(other, f),
        }
    }
}

/// An error from one S3 operation, after retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub op: Operation,
    pub bucket: String,
    pub key: Option<String>,
    pub status: Option<u16>,
    pub kind: ErrorKind,
    pub message: String,
    pub request_id: Option<String>,
    /// How many times the request was sent.
    pub attempts: u32,
}

impl ClientError {
    pub fn new(op: Operation, bucket: &str, key: Option<&str>, kind: ErrorKind) -> Self {
        Self {
            op,
            bucket: bucket.to_string(),
            key: key.map(str::to_string),
            status: None,
            kind,
            message: String::new(),
            request_id: None,
            attempts: 1,
        }
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// Whether the request may have reached the server although no answer came back (a
    /// timeout, a connection broken after sending): its effect is unknown.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self.kind, ErrorKind::Timeout | ErrorKind::Transport)
    }

    /// Whether another attempt may succeed. Transport failures of non-idempotent requests are
    /// retried only when the request surely never reached the server (connect errors).
    pub fn is_transient(&self) -> bool {
        let status_says = matches!(self.status, Some(408 | 429 | 500 | 502 | 503 | 504));
        let kind_says = match self.kind {
            ErrorKind::SlowDown
            | ErrorKind::InternalError
            | ErrorKind::ServiceUnavailable
            | ErrorKind::RequestTimeout
            | ErrorKind::Connect => true,
            ErrorKind::Timeout | ErrorKind::Transport => self.op.is_idempotent(),
            _ => false,
        };
        status_says || kind_says
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} s3://{}", self.op, self.bucket)?;
        if let Some(key) = &self.key {
            write!(f, "/{key}")?;
        }
        write!(f, ": {}", self.kind)?;
        if let Some(status) = self.status {
            write!(f, " (HTTP {status})")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        if self.attempts > 1 {
            write!(f, " [after {} attempts]", self.attempts)?;
        }
        if let Some(id) = &self.request_id {
            write!(f, " [request id {id}]")?;
        }
        Ok(())
    }
}

impl std::error::Error for ClientError {}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_operation_once() {
        for (i, op) in Operation::ALL.iter().enumerate() {
            // No wildcard: a new operation fails to compile here until ALL has it.
            let index = match op {
                Operation::ListObjectsV2 => 0,
                Operation::HeadObject => 1,
                Operation::GetObject => 2,
                Operation::PutObject => 3,
                Operation::DeleteObject => 4,
                Operation::DeleteObjects => 5,
                Operation::CopyObject => 6,
                Operation::CreateMultipartUpload => 7,
                Operation::UploadPart => 8,
                Operation::UploadPartCopy => 9,
                Operation::CompleteMultipartUpload => 10,
                Operation::AbortMultipartUpload => 11,
                Operation::ListParts => 12,
                Operation::ListMultipartUploads => 13,
                Operation::HeadBucket => 14,
            };
            assert_eq!(index, i, "{op}");
        }
    }

    #[test]
    fn display_names_operation_key_status_and_message() {
        let e = ClientError::new(
            Operation::GetObject,
            "b",
            Some("dir/k"),
            ErrorKind::NoSuchKey,
        )
        .with_status(404)
        .with_message("The specified key does not exist.");
        assert_eq!(
            e.to_string(),
            "GetObject s3://b/dir/k: NoSuchKey (HTTP 404): The specified key does not exist."
        );
    }

    #[test]
    fn transient_classification() {
        let mk = |op, kind, status: Option<u16>| {
            let mut e = ClientError::new(op, "b", None, kind);
            e.status = status;
            e
        };
        assert!(mk(Operation::GetObject, ErrorKind::SlowDown, Some(503)).is_transient());
        assert!(mk(Operation::GetObject, ErrorKind::Timeout, None).is_transient());
        assert!(!mk(Operation::CreateMultipartUpload, ErrorKind::Timeout, None).is_transient());
        assert!(mk(Operation::CreateMultipartUpload, ErrorKind::Connect, None).is_transient());
        assert!(!mk(Operation::GetObject, ErrorKind::AccessDenied, Some(403)).is_transient());
        assert!(!mk(Operation::GetObject, ErrorKind::NoSuchKey, Some(404)).is_transient());
        assert!(mk(
            Operation::PutObject,
            ErrorKind::Other("X".into()),
            Some(429)
        )
        .is_transient());
    }
}
