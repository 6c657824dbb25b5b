//! `s3mount`: parse the command line, then hand over to [`s3mount::mount::run`]. Any start-up
//! problem is printed as one line and the exit status is 1.

use clap::Parser;

fn main() {
    let cli = match s3mount::cli::Cli::parse().resolve() {
        Ok(cli) => cli,
        Err(msg) => {
            eprintln!("s3mount: error: {msg}");
            std::process::exit(2);
        }
    };
    if let Err(e) = s3mount::mount::run(cli) {
        eprintln!("s3mount: error: {e}");
        std::process::exit(1);
    }
}
