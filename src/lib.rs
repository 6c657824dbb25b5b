//! s3mount: mount an S3 bucket as a Linux directory over FUSE.
//!
//! The crate is a library plus the `s3mount` binary, so tests reach every layer:
//! - [`s3`]: the S3 client (our own SigV4 signer, the `ObjectClient` trait, the reqwest
//!   implementation and an in-memory mock);
//! - the filesystem core and the FUSE adapter build on the trait only;
//! - the service around a mount: mounting for mount(8) ([`fusemount`]), signals, logs, the
//!   control socket and status ([`service`], [`logging`], [`control`], [`status`],
//!   [`activity`]), and the commands that are not a mount ([`commands`], [`presign`]).
//!
//! See `docs/ARCHITECTURE.md` for the design.

// Errors carry the operation, key, status and server message so one log line explains a
// failure; that makes them large (136 bytes), and every Result here is on an I/O path where the
// size of the error arm costs nothing measurable.
#![allow(clippy::result_large_err)]

pub mod activity;
pub mod cli;
pub mod commands;
pub mod control;
pub mod fs;
pub mod fuse;
pub mod fusemount;
pub mod iomode;
pub mod logging;
pub mod mount;
pub mod presign;
pub mod s3;
pub mod service;
pub mod status;
