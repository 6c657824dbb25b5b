//! The filesystem's errors and their one mapping to errno.
//!
//! Every error a FUSE callback can return goes through [`FsError::errno`], one exhaustive
//! `match` with no wildcard arm: adding an error kind anywhere fails to compile until someone
//! decides its errno. Errors that reach the user as EIO are logged with the request that
//! failed and why (see [`FsError::log_if_unexpected`]).

use crate::s3::{ClientError, ErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotADirectory,
    #[error("is a directory")]
    IsADirectory,
    #[error("file name longer than 255 bytes")]
    NameTooLong,
    #[error("file name is not UTF-8 (S3 keys are)")]
    NotUtf8,
    #[error("the mount is read-only")]
    ReadOnly,
    #[error("the object changed since it was opened")]
    Stale,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("operation not supported: {0}")]
    NotSupported(&'static str),
    #[error("bad file handle")]
    BadHandle,
    #[error("file too large: {0}")]
    FileTooLarge(String),
    #[error("{0}")]
    Io(String),
    #[error("no space left on the local disk: {0}")]
    NoSpace(String),
    #[error("directory not empty")]
    NotEmpty,
    #[error("file exists")]
    Exists,
    #[error("operation not permitted: {0}")]
    NotPermitted(&'static str),
    #[error("no such extended attribute")]
    NoAttribute,
    #[error("too large: {0}")]
    TooBig(String),
    /// What S3 or the network said, kept for the log; made only by [`from_client`].
    #[error(transparent)]
    S3(ClientError),
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotADirectory => libc::ENOTDIR,
            FsError::IsADirectory => libc::EISDIR,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::NotUtf8 => libc::EILSEQ,
            FsError::ReadOnly => libc::EROFS,
            FsError::Stale => libc::ESTALE,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NotSupported(_) => libc::ENOTSUP,
            FsError::BadHandle => libc::EBADF,
            FsError::FileTooLarge(_) => libc::EFBIG,
            FsError::Io(_) => libc::EIO,
            FsError::NoSpace(_) => libc::ENOSPC,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Exists => libc::EEXIST,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::NoAttribute => libc::ENODATA,
            FsError::TooBig(_) => libc::E2BIG,
            FsError::S3(e) => match &e.kind {
                ErrorKind::NoSuchKey => libc::ENOENT,
                ErrorKind::PreconditionFailed => libc::ESTALE,
                ErrorKind::AccessDenied
                | ErrorKind::SignatureDoesNotMatch
                | ErrorKind::InvalidAccessKeyId => libc::EACCES,
                ErrorKind::InvalidRequest => libc::EINVAL,
                ErrorKind::NoSuchBucket
                | ErrorKind::NoSuchUpload
                | ErrorKind::InvalidRange
                | ErrorKind::InvalidPart
                | ErrorKind::EntityTooSmall
                | ErrorKind::SlowDown
                | ErrorKind::InternalError
                | ErrorKind::ServiceUnavailable
                | ErrorKind::RequestTimeout
                | ErrorKind::WrongRegion
                | ErrorKind::Other(_)
                | ErrorKind::Connect
                | ErrorKind::Timeout
                | ErrorKind::Transport
                | ErrorKind::InvalidResponse
                | ErrorKind::NotS3 => libc::EIO,
            },
        }
    }

    /// Logs errors the user cannot explain from the errno alone (EIO, EACCES): which request
    /// failed and why. ENOENT and friends are normal answers and stay at debug level.
    pub fn log_if_unexpected(&self, what: &str) {
        match self.errno() {
            libc::EIO | libc::EACCES | libc::ENOSPC => tracing::error!("{what}: {self}"),
            libc::ESTALE => tracing::warn!("{what}: {self}"),
            _ => tracing::debug!("{what}: {self}"),
        }
    }
}

/// Turns a client error into the filesystem's: a vanished key is ENOENT, a failed If-Match is
/// ESTALE, everything else keeps its S3 detail for the log.
pub fn from_client(e: ClientError) -> FsError {
    match e.kind {
        ErrorKind::NoSuchKey => FsError::NotFound,
        ErrorKind::PreconditionFailed => FsError::Stale,
        _ => FsError::S3(e),
    }
}

impl FsError {
    /// A failure of the local disk (spool, local copy) while doing `what`: a full disk is
    /// ENOSPC, a size past the file system's limit EFBIG, anything else EIO. Logged here, with
    /// what was being done, since the errno alone does not say which file failed.
    pub fn local(what: &str, e: std::io::Error) -> FsError {
        let message = format!("{what}: {e}");
        tracing::error!("local disk: {message}");
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => FsError::NoSpace(message),
            Some(libc::EFBIG) => FsError::FileTooLarge(message),
            _ => FsError::Io(message),
        }
    }

    /// Something inside s3mount that should not happen did (a task that ended without an
    /// answer): EIO for the caller, and a log line saying what.
    pub fn internal(what: &str) -> FsError {
        tracing::error!("internal error: {what}");
        FsError::Io(format!("internal error: {what}"))
    }
}

pub type FsResult<T> = Result<T, FsError>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::Operation;

    #[test]
    fn s3_errors_map_to_the_errno_a_user_expects() {
        let mk = |kind| FsError::S3(ClientError::new(Operation::GetObject, "b", Some("k"), kind));
        assert_eq!(mk(ErrorKind::AccessDenied).errno(), libc::EACCES);
        assert_eq!(mk(ErrorKind::NoSuchKey).errno(), libc::ENOENT);
        assert_eq!(mk(ErrorKind::PreconditionFailed).errno(), libc::ESTALE);
        assert_eq!(mk(ErrorKind::Timeout).errno(), libc::EIO);
        assert_eq!(mk(ErrorKind::Other("Weird".into())).errno(), libc::EIO);
        let stale = from_client(ClientError::new(
            Operation::GetObject,
            "b",
            None,
            ErrorKind::PreconditionFailed,
        ));
        assert!(matches!(stale, FsError::Stale));
        assert_eq!(FsError::ReadOnly.errno(), libc::EROFS);
        assert_eq!(FsError::NameTooLong.errno(), libc::ENAMETOOLONG);
    }
}
