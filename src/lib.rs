//! s3mount: mount an S3 bucket as a Linux directory over FUSE.
//!
//! The crate is a library plus the `s3mount` binary, so tests reach every layer:
//! - [`s3`]: the S3 client (our own SigV4 signer, the `ObjectClient` trait, the reqwest
//!   implementation and an in-memory mock);
//! - the filesystem core and the FUSE adapter build on the trait only.
//!
//! See `docs/ARCHITECTURE.md` for the design.

pub mod cli;
pub mod fs;
pub mod fuse;
pub mod mount;
pub mod s3;
