//! TLS trust and proxies through the real binary and a real mount: a TLS front with a CA made
//! by the test, a SOCKS5 proxy started by the test, and proxies that are not there.

mod common;

use std::process::Command;

use common::mount::{command, mount_with, run_to_exit};
use common::standin::{closed_port, HttpProxy, Socks5Proxy, TestCa, TlsFront};
use common::{pattern, read_object, unique_prefix, ServerEnv};

fn start_error(mut cmd: Command) -> String {
    let out = run_to_exit(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "exit status: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

async fn write_and_read(env: &ServerEnv, m: &common::mount::Mounted, prefix: &str, name: &str) {
    let data = pattern(200_000, 7);
    std::fs::write(m.path().join(name), &data).unwrap();
    assert_eq!(std::fs::read(m.path().join(name)).unwrap(), data);
    let stored = read_object(&env.client(), &format!("{prefix}{name}"), None).await;
    assert_eq!(&stored[..], &data[..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_ca_is_trusted_only_when_given() {
    let env = ServerEnv::main();
    let ca = TestCa::new();
    let front = TlsFront::start(&ca, env.authority());
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("test-ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let prefix = unique_prefix("tls");
    let spec = format!("{}:{prefix}", env.bucket);

    let https = |cmd: &mut Command| {
        cmd.env("AWS_ENDPOINT_URL", front.endpoint())
            .env_remove("AWS_CA_BUNDLE")
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR");
    };

    // Neither: refused with a line naming the endpoint.
    let mount_point = tempfile::tempdir().unwrap();
    let mut cmd = command(&env);
    https(&mut cmd);
    cmd.arg(&spec).arg(mount_point.path());
    let e = start_error(cmd);
    assert!(
        e.contains("not trusted") && e.contains(&front.endpoint()),
        "{e}"
    );
    assert!(e.contains("--ca-bundle"), "{e}");

    // --ca-bundle.
    let mut cmd = command(&env);
    https(&mut cmd);
    let m = mount_with(cmd, &spec, &["--ca-bundle", ca_file.to_str().unwrap()]);
    write_and_read(&env, &m, &prefix, "via-ca-bundle.bin").await;
    drop(m);

    // AWS_CA_BUNDLE, and the -o form of the option is accepted too.
    let mut cmd = command(&env);
    https(&mut cmd);
    cmd.env("AWS_CA_BUNDLE", &ca_file);
    let m = mount_with(cmd, &spec, &[]);
    write_and_read(&env, &m, &prefix, "via-aws-ca-bundle.bin").await;
    drop(m);
    let mut cmd = command(&env);
    https(&mut cmd);
    let m = mount_with(
        cmd,
        &spec,
        &["-o", &format!("ca_bundle={}", ca_file.display())],
    );
    assert!(m.path().join("via-ca-bundle.bin").exists());
    drop(m);
    assert!(front.handshakes() > 0);

    // --no-verify-tls mounts too, and says so.
    let mut cmd = command(&env);
    https(&mut cmd);
    let m = mount_with(cmd, &spec, &["--no-verify-tls"]);
    assert!(m.path().join("via-ca-bundle.bin").exists());
    assert!(
        m.log().contains("TLS certificates are not checked"),
        "{}",
        m.log()
    );

    // A bundle that is no PEM is refused before anything else.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let mut cmd = command(&env);
    https(&mut cmd);
    cmd.arg(&spec)
        .arg(mount_point.path())
        .arg("--ca-bundle")
        .arg(&junk);
    let e = start_error(cmd);
    assert!(e.contains("junk.pem"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mount_works_through_socks5_and_http_proxies() {
    let env = ServerEnv::main();
    let prefix = unique_prefix("socks");
    let spec = format!("{}:{prefix}", env.bucket);
    let server_port = env.authority().rsplit(':').next().unwrap().to_string();

    // ALL_PROXY with socks5h: the proxy resolves the name.
    let socks = Socks5Proxy::start();
    let mut cmd = command(&env);
    cmd.env("ALL_PROXY", socks.url("socks5h"));
    let m = mount_with(cmd, &spec, &[]);
    write_and_read(&env, &m, &prefix, "through-socks5h.bin").await;
    drop(m);
    assert!(socks.connections() > 0, "the proxy carried the mount");
    assert!(
        socks
            .targets()
            .iter()
            .all(|t| t.ends_with(&format!(":{server_port}"))),
        "{:?}",
        socks.targets()
    );

    // --proxy with socks5, over an ALL_PROXY that points nowhere: the option wins.
    let socks = Socks5Proxy::start();
    let mut cmd = command(&env);
    cmd.env("all_proxy", format!("socks5://127.0.0.1:{}", closed_port()));
    let m = mount_with(cmd, &spec, &["--proxy", &socks.url("socks5")]);
    write_and_read(&env, &m, &prefix, "through-socks5.bin").await;
    drop(m);
    assert!(socks.connections() > 0);

    // HTTP_PROXY, in the form curl reads (no scheme), for an http:// endpoint.
    let http = HttpProxy::start();
    let mut cmd = command(&env);
    cmd.env("HTTP_PROXY", http.url().trim_start_matches("http://"));
    let m = mount_with(cmd, &spec, &[]);
    write_and_read(&env, &m, &prefix, "through-http-proxy.bin").await;
    drop(m);
    assert!(
        !http.targets().is_empty() && http.targets().iter().all(|t| t == &env.authority()),
        "{:?}",
        http.targets()
    );

    // NO_PROXY sends the endpoint direct, past a proxy that is not there.
    let mut cmd = command(&env);
    cmd.env("HTTP_PROXY", format!("http://127.0.0.1:{}", closed_port()))
        .env("NO_PROXY", "example.org,127.0.0.1");
    let m = mount_with(cmd, &spec, &[]);
    assert!(m.path().join("through-socks5.bin").exists());
}

#[test]
fn a_dead_proxy_is_named() {
    let env = ServerEnv::main();
    let mount_point = tempfile::tempdir().unwrap();
    let port = closed_port();
    for (how, proxy) in [
        ("--proxy", format!("http://127.0.0.1:{port}")),
        ("HTTP_PROXY", format!("http://user:pw@127.0.0.1:{port}")),
        ("ALL_PROXY", format!("socks5h://127.0.0.1:{port}")),
    ] {
        let mut cmd = command(&env);
        cmd.arg(&env.bucket).arg(mount_point.path());
        if how == "--proxy" {
            cmd.arg("--proxy").arg(&proxy);
        } else {
            cmd.env(how, &proxy);
        }
        let e = start_error(cmd);
        assert!(
            e.contains("proxy") && e.contains(&format!("127.0.0.1:{port}")) && e.contains(how),
            "{how}: {e}"
        );
        assert!(!e.contains("pw@"), "no proxy password in messages: {e}");
    }
    let mut cmd = command(&env);
    cmd.arg(&env.bucket)
        .arg(mount_point.path())
        .env("ALL_PROXY", "ftp://127.0.0.1:21");
    let e = start_error(cmd);
    assert!(e.contains("ALL_PROXY") && e.contains("socks5"), "{e}");
}
