//! `s3mount`: everything happens in [`s3mount::commands::main`]: a mount (also as the mount(8)
//! helper `mount.fuse.s3mount`), `status`, `presign` or `post-policy`. Any problem is printed as
//! one line; the exit status is 2 for a malformed command line, 1 for anything else.

fn main() {
    std::process::exit(s3mount::commands::main(std::env::args_os().collect()));
}
