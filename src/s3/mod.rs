//! Everything that talks S3: the signer, credentials, the `ObjectClient` trait with its HTTP
//! and in-memory implementations, XML, retries and errors. Nothing here knows about FUSE.

pub mod body;
pub mod client;
pub mod credentials;
pub mod error;
pub mod http;
pub mod mock;
mod quickack;
pub mod retry;
pub mod sigv4;
pub mod sts;
pub mod transport;
pub mod xml;

pub use client::*;
pub use credentials::{Auth, Credentials};
pub use error::{ClientError, ErrorKind, Operation};
pub use http::{Addressing, ChecksumChoice, ClientConfig, S3Client, WriteDefaults};
pub use mock::MockClient;
pub use retry::RetryPolicy;
