//! What the `s3mount` binary does with its arguments: mount (`s3mount BUCKET[:PREFIX] DIR`,
//! or as the mount(8) helper `mount.fuse.s3mount SOURCE DIR -o OPTIONS`), or one of the other
//! commands (`status`, `presign`, `post-policy`), or the internal `__watchdog`.
//!
//! **As a mount helper** (the program's name starts with `mount.`, as the symlinks
//! `scripts/install` makes are named), the arguments are always a mount, whatever the source
//! is called, and `-s`, `-f`, `-n`, `-v` have mount(8)'s meanings: sloppy, fake, no mtab,
//! verbose (so `-f` is not `--foreground` there).
//!
//! **Without `PATH`** (mount(8), systemd), a default one is set first, before any thread
//! exists, so `fusermount3` and a profile's `credential_process` are found.
//!
//! Every error is one line on stderr: `s3mount: error: ...`, exit status 2 for a malformed
//! command line and 1 for anything else.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};

use crate::cli::{Cli, PostPolicyCli, PresignCli, StatusCli, UploadsCli};
use crate::control;
use crate::fusemount::{self, MountEntry};
use crate::mount::{self, Connect};
use crate::presign::{self, FormRequest, UrlRequest};

/// `PATH` when the caller gave none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long a mount may take to answer `status` or `presign`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the program; returns its exit status.
pub fn main(args: Vec<OsString>) -> i32 {
    if std::env::var_os("PATH").is_none_or(|p| p.is_empty()) {
        // No thread exists yet, so changing the environment is safe.
        std::env::set_var("PATH", DEFAULT_PATH);
    }
    let program = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if program.starts_with("mount.") {
        return run_mount(helper_args(args));
    }
    match args.get(1).and_then(|a| a.to_str()) {
        Some("status") => run(status(parse(rest("status", &args)))),
        Some("uploads") => run(uploads(parse(rest("uploads", &args)))),
        Some("presign") => run(presign(parse(rest("presign", &args)))),
        Some("post-policy") => run(post_policy(parse(rest("post-policy", &args)))),
        Some("__watchdog") if args.len() >= 4 => fusemount::run_watchdog(
            &args[2].to_string_lossy(),
            Path::new(&args[3]),
            args.get(4).map(Path::new),
        ),
        _ => run_mount(args),
    }
}

/// The arguments of a subcommand, named as clap should show it.
fn rest(name: &str, args: &[OsString]) -> Vec<OsString> {
    let mut v = vec![OsString::from(format!("s3mount {name}"))];
    v.extend(args.iter().skip(2).cloned());
    v
}

fn run(result: Result<i32, String>) -> i32 {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("s3mount: error: {e}");
            1
        }
    }
}

/// Parses, printing help or a one-line error and exiting when that is all there is to do.
fn parse<T: Parser>(args: Vec<OsString>) -> T {
    match T::try_parse_from(args) {
        Ok(v) => v,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                std::process::exit(e.exit_code());
            }
            eprintln!("s3mount: error: {}", one_line(&e.to_string()));
            std::process::exit(2);
        }
    }
}

/// clap's message up to its usage, as one line.
fn one_line(text: &str) -> String {
    let body: Vec<&str> = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    body.join(" ")
        .trim_start_matches("error: ")
        .replace("  ", " ")
}

/// mount(8)'s helper flags: `-s -f -n -v`, alone or together (`-sfnv`), with `-f` meaning
/// fake (`--fake`).
pub fn helper_args(args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut after_o = false;
    for (i, a) in args.into_iter().enumerate() {
        let text = a.to_string_lossy().into_owned();
        let is_cluster = i > 0
            && !after_o
            && text.len() > 1
            && text.starts_with('-')
            && !text.starts_with("--")
            && text[1..].chars().all(|c| "sfnv".contains(c));
        after_o = text == "-o" || text == "-t";
        if !is_cluster {
            out.push(a);
            continue;
        }
        for c in text[1..].chars() {
            out.push(OsString::from(match c {
                'f' => "--fake".to_string(),
                c => format!("-{c}"),
            }));
        }
    }
    out
}

fn run_mount(args: Vec<OsString>) -> i32 {
    let cli = match parse::<Cli>(args).resolve() {
        Ok(cli) => cli,
        Err(msg) => {
            eprintln!("s3mount: error: {msg}");
            return 2;
        }
    };
    match mount::run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("s3mount: error: {e}");
            1
        }
    }
}

/// The s3mount mounts of this namespace (topmost at each mount point).
fn s3mount_mounts() -> Vec<MountEntry> {
    let all = fusemount::mounts();
    all.iter()
        .enumerate()
        .filter(|(i, m)| {
            m.fstype == fusemount::FSTYPE
                && !all[i + 1..].iter().any(|n| n.mountpoint == m.mountpoint)
        })
        .map(|(_, m)| m.clone())
        .collect()
}

fn my_uid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Asks the mount `m` for its report.
fn ask(m: &MountEntry, request: &Value) -> Result<Value, String> {
    let owner = m.fuse_owner().unwrap_or(0);
    let me = my_uid();
    if me != 0 && me != owner {
        return Err(format!(
            "{} is uid {owner}'s mount: only its owner and root may ask it",
            m.mountpoint.display()
        ));
    }
    control::request(
        &control::socket_path(owner, &m.mountpoint),
        request,
        ANSWER_TIMEOUT,
    )
}

/// The mount at `mountpoint`, or every s3mount mount this user may ask.
fn chosen_mounts(mountpoint: Option<&Path>) -> Result<Vec<MountEntry>, String> {
    Ok(match mountpoint {
        Some(p) => {
            let canonical = fusemount::canonical(p);
            let m = s3mount_mounts()
                .into_iter()
                .find(|m| m.mountpoint == canonical)
                .ok_or_else(|| format!("{} is not an s3mount mount", p.display()))?;
            vec![m]
        }
        None => s3mount_mounts()
            .into_iter()
            .filter(|m| my_uid() == 0 || m.fuse_owner() == Some(my_uid()))
            .collect(),
    })
}

fn uploads(cli: UploadsCli) -> Result<i32, String> {
    let mounts = chosen_mounts(cli.mountpoint.as_deref())?;
    if cli.abort.is_some() || cli.abort_all {
        let mut aborted = 0;
        for m in &mounts {
            let request = match &cli.abort {
                Some(path) => json!({"op": "abort_uploads", "path": path}),
                None => json!({"op": "abort_uploads", "all": true}),
            };
            let answer = ask(m, &request)?;
            if let Some(e) = answer["error"].as_str() {
                return Err(format!("{}: {e}", m.mountpoint.display()));
            }
            aborted += answer["aborted"].as_u64().unwrap_or(0);
        }
        println!(
            "aborted {aborted} upload{}",
            if aborted == 1 { "" } else { "s" }
        );
        return Ok(0);
    }
    let mut listed = Vec::new();
    let mut out = String::new();
    for m in &mounts {
        let report = ask(m, &json!({"op": "status"}))?;
        let list = report["resumable_uploads"].clone();
        out.push_str(&format!(
            "{}  s3://{}/{}\n",
            m.mountpoint.display(),
            s_of(&report, "bucket"),
            s_of(&report, "prefix")
        ));
        let text = crate::status::render_resumable(&report);
        out.push_str(if text.is_empty() {
            "  no resumable uploads\n"
        } else {
            &text
        });
        listed.push(json!({"mountpoint": m.mountpoint, "resumable_uploads": list}));
    }
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"mounts": listed})).unwrap_or_default()
        );
    } else if mounts.is_empty() {
        println!("no s3mount mounts");
    } else {
        print!("{out}");
    }
    Ok(0)
}

fn s_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or("")
}

fn status(cli: StatusCli) -> Result<i32, String> {
    let mounts = chosen_mounts(cli.mountpoint.as_deref())?;
    loop {
        let reports: Vec<Result<Value, String>> = mounts
            .iter()
            .map(|m| ask(m, &json!({"op": "status"})))
            .collect();
        let failed = reports.iter().any(Result::is_err);
        let mut out = String::new();
        if cli.json {
            let values: Vec<Value> = reports
                .iter()
                .zip(&mounts)
                .map(|(r, m)| match r {
                    Ok(v) => v.clone(),
                    Err(e) => json!({"mountpoint": m.mountpoint, "error": e}),
                })
                .collect();
            let doc = match (&cli.mountpoint, values.as_slice()) {
                (Some(_), [one]) => one.clone(),
                _ => json!({ "mounts": values }),
            };
            out.push_str(&if cli.watch {
                doc.to_string()
            } else {
                serde_json::to_string_pretty(&doc).unwrap_or_default()
            });
            out.push('\n');
        } else {
            if mounts.is_empty() {
                out.push_str("no s3mount mounts\n");
            }
            for (r, m) in reports.iter().zip(&mounts) {
                match r {
                    Ok(v) => out.push_str(&crate::status::render_text(v)),
                    Err(e) => {
                        out.push_str(&format!("{}: no status: {e}\n", m.mountpoint.display()))
                    }
                }
            }
        }
        if !cli.watch {
            print!("{out}");
            return Ok(i32::from(failed));
        }
        if cli.json {
            print!("{out}");
        } else {
            // Home and clear, then the report: one redraw per second.
            print!("\x1b[H\x1b[2J{out}");
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn connect_of(bucket: String, c: &crate::cli::ConnectionArgs) -> Connect {
    Connect {
        bucket,
        endpoint_url: c.endpoint_url.clone(),
        region: c.region.clone(),
        profile: c.profile.clone(),
        credentials_file: c.credentials_file.clone(),
        config_file: c.config_file.clone(),
        addressing_style: c.addressing_style.clone(),
        force_path_style: c.force_path_style,
        ca_bundle: c.ca_bundle.clone(),
        proxy: c.proxy.clone(),
        no_verify_tls: false,
        no_sign_request: false,
    }
}

fn not_for_a_mount(what: &str) -> String {
    format!(
        "--endpoint-url, --region, --profile and the other connection options do not apply to {what} inside a mount, which signs with its own; give s3://BUCKET/KEY to choose them"
    )
}

fn warn(warning: Option<&str>) {
    if let Some(w) = warning {
        eprintln!("s3mount: warning: {w}");
    }
}

fn presign(cli: PresignCli) -> Result<i32, String> {
    if let Some((bucket, key)) = presign::parse_s3_url(&cli.target) {
        let cfg = mount::client_config(&connect_of(bucket, &cli.connection)).map_err(|e| e.0)?;
        let (url, warning) = presign::presign_url(
            &cfg,
            &UrlRequest {
                key,
                method: cli.method.clone(),
                expires: cli.expires,
                public_endpoint: cli.connection.public_endpoint.clone(),
            },
        )?;
        warn(warning.as_deref());
        println!("{url}");
        return Ok(0);
    }
    if cli.connection.any() {
        return Err(not_for_a_mount("a file"));
    }
    let path = PathBuf::from(&cli.target);
    if path.is_dir() {
        return Err(format!(
            "{} is a directory: presign signs one object (post-policy makes a form for a directory)",
            path.display()
        ));
    }
    let (m, rel) = presign::locate_in_mount(&path)?;
    let answer = ask(
        &m,
        &json!({
            "op": "presign",
            "path": rel,
            "method": cli.method,
            "expires_seconds": cli.expires.as_secs(),
            "public_endpoint": cli.connection.public_endpoint,
        }),
    )?;
    warn(answer["warning"].as_str());
    println!(
        "{}",
        answer["url"]
            .as_str()
            .ok_or("the mount answered without a URL")?
    );
    Ok(0)
}

fn post_policy(cli: PostPolicyCli) -> Result<i32, String> {
    let form = if let Some((bucket, prefix)) = presign::parse_s3_url(&cli.target) {
        let cfg = mount::client_config(&connect_of(bucket, &cli.connection)).map_err(|e| e.0)?;
        presign::post_form(
            &cfg,
            &FormRequest {
                prefix,
                expires: cli.expires,
                max_size: cli.max_size,
                content_type: cli.content_type.clone(),
                acl: cli.acl.clone(),
                public_endpoint: cli.connection.public_endpoint.clone(),
            },
        )?
    } else {
        if cli.connection.any() {
            return Err(not_for_a_mount("a directory"));
        }
        let path = PathBuf::from(&cli.target);
        if !path.is_dir() {
            return Err(format!(
                "{} is not a directory: give s3://BUCKET/PREFIX/ or a directory inside a mount",
                path.display()
            ));
        }
        let (m, rel) = presign::locate_in_mount(&path)?;
        ask(
            &m,
            &json!({
                "op": "post_policy",
                "path": rel,
                "expires_seconds": cli.expires.as_secs(),
                "max_size": cli.max_size,
                "content_type": cli.content_type,
                "acl": cli.acl,
                "public_endpoint": cli.connection.public_endpoint,
            }),
        )?
    };
    warn(form["warning"].as_str());
    if cli.html {
        print!("{}", presign::html_form(&form));
    } else {
        let mut shown = form.clone();
        if let Some(o) = shown.as_object_mut() {
            o.remove("warning");
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&shown).unwrap_or_default()
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn helper_flags_mean_what_mount_8_means() {
        let got = helper_args(os(&[
            "/sbin/mount.fuse.s3mount",
            "b:p",
            "/mnt",
            "-sfnv",
            "-o",
            "-f-is-a-value-here",
            "-n",
        ]));
        assert_eq!(
            got,
            os(&[
                "/sbin/mount.fuse.s3mount",
                "b:p",
                "/mnt",
                "-s",
                "--fake",
                "-n",
                "-v",
                "-o",
                "-f-is-a-value-here",
                "-n"
            ])
        );
        let cli = Cli::try_parse_from(helper_args(os(&[
            "mount.s3mount",
            "b",
            "/m",
            "-f",
            "-s",
            "-o",
            "rw,bogus,_netdev",
        ])))
        .unwrap()
        .resolve()
        .unwrap();
        assert!(cli.fake && cli.sloppy && !cli.foreground);
    }

    #[test]
    fn clap_errors_become_one_line() {
        let e = Cli::try_parse_from(["s3mount", "b"]).unwrap_err();
        let line = one_line(&e.to_string());
        assert!(!line.contains('\n'));
        assert!(line.contains("MOUNTPOINT"), "{line}");
    }
}
