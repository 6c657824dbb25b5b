//! How HTTP clients are built: which certificates are trusted and which proxy a request takes.
//! The S3 client and every credential request (STS, SSO, IMDS, container) share this, so a
//! proxy or a private CA set once applies to all of them.
//!
//! Trust: the system's store (what `rustls-native-certs` finds, which honours `SSL_CERT_FILE`
//! and `SSL_CERT_DIR`) plus the bundled web roots, plus the PEM bundle of `--ca-bundle` or
//! `AWS_CA_BUNDLE`. `--no-verify-tls` turns verification off; the mount warns about it every
//! time.
//!
//! Proxies, as curl and the AWS CLI read them: `--proxy URL` for everything; else
//! `HTTPS_PROXY` for https URLs, `HTTP_PROXY` for http URLs, `ALL_PROXY` for both (each also in
//! lower case, the lower case winning as in curl); `NO_PROXY` lists hosts, domains (`.corp` or
//! `corp`), IP addresses, CIDR blocks or `*` to reach directly. `http://`, `https://`,
//! `socks5://` (names resolved here) and `socks5h://` (names resolved by the proxy) are
//! accepted. The link-local metadata addresses (IMDS, the ECS and EKS agents) are never
//! proxied: they exist only on this host's link.
//!
//! We choose the proxy ourselves ([`ProxySettings::proxy_for`]) and hand reqwest that choice,
//! so an error can name the proxy a request went through.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use reqwest::Url;

use super::credentials::Env;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct TransportError(pub String);

/// What every client built here shares.
#[derive(Debug, Clone, Default)]
pub struct TransportConfig {
    /// Extra trusted certificates (PEM), from `--ca-bundle` or `AWS_CA_BUNDLE`.
    pub ca_bundle: Option<PathBuf>,
    /// Accept any certificate (`--no-verify-tls`).
    pub no_verify_tls: bool,
    pub proxy: ProxySettings,
}

impl TransportConfig {
    /// `--ca-bundle` (else `AWS_CA_BUNDLE`), `--proxy` (else the proxy variables), checked:
    /// a bundle that cannot be read or holds no certificate, or a proxy URL of another
    /// scheme, is refused here, at mount time.
    pub fn from_options(
        env: &dyn Env,
        ca_bundle: Option<PathBuf>,
        proxy: Option<String>,
        no_verify_tls: bool,
    ) -> Result<Self, TransportError> {
        let ca_bundle = ca_bundle.or_else(|| env.var("AWS_CA_BUNDLE").map(PathBuf::from));
        if let Some(path) = &ca_bundle {
            load_bundle(path)?;
        }
        Ok(Self {
            ca_bundle,
            no_verify_tls,
            proxy: ProxySettings::from_env(env, proxy)?,
        })
    }
}

fn load_bundle(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, TransportError> {
    let pem = std::fs::read(path).map_err(|e| {
        TransportError(format!("cannot read the CA bundle {}: {e}", path.display()))
    })?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        TransportError(format!(
            "the CA bundle {} is not PEM certificates: {e}",
            path.display()
        ))
    })?;
    if certs.is_empty() {
        return Err(TransportError(format!(
            "the CA bundle {} holds no certificate (expected PEM blocks)",
            path.display()
        )));
    }
    Ok(certs)
}

/// A reqwest client builder with this trust and these proxies; callers add their timeouts and
/// pool settings.
pub fn builder(cfg: &TransportConfig) -> Result<reqwest::ClientBuilder, TransportError> {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(true)
        .no_proxy();
    if let Some(path) = &cfg.ca_bundle {
        for cert in load_bundle(path)? {
            b = b.add_root_certificate(cert);
        }
    }
    if cfg.no_verify_tls {
        b = b.danger_accept_invalid_certs(true);
    }
    if cfg.proxy.is_set() {
        let proxies = Arc::new(cfg.proxy.clone());
        b = b.proxy(reqwest::Proxy::custom(move |url| {
            proxies.proxy_for(url).and_then(|p| Url::parse(&p.url).ok())
        }));
    }
    Ok(b)
}

/// One proxy and where its URL came from (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    pub url: String,
    pub source: &'static str,
}

impl Proxy {
    /// The URL without user and password, for messages.
    pub fn display(&self) -> String {
        match Url::parse(&self.url) {
            Ok(mut u) => {
                let _ = u.set_username("");
                let _ = u.set_password(None);
                u.to_string().trim_end_matches('/').to_string()
            }
            Err(_) => "(unparsable proxy URL)".to_string(),
        }
    }
}

/// The proxies of this environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxySettings {
    explicit: Option<Proxy>,
    http: Option<Proxy>,
    https: Option<Proxy>,
    all: Option<Proxy>,
    no_proxy: Vec<String>,
}

fn checked(url: String, source: &'static str) -> Result<Proxy, TransportError> {
    // `host:port` alone means an HTTP proxy, as curl reads it.
    let url = if url.contains("://") {
        url
    } else {
        format!("http://{url}")
    };
    let parsed = Url::parse(&url)
        .map_err(|_| TransportError(format!("{source} {url:?} is not a valid proxy URL")))?;
    if !matches!(parsed.scheme(), "http" | "https" | "socks5" | "socks5h") {
        return Err(TransportError(format!(
            "{source} has scheme {:?}; use http://, https://, socks5:// or socks5h://",
            parsed.scheme()
        )));
    }
    if parsed.host_str().is_none() {
        return Err(TransportError(format!("{source} {url:?} has no host")));
    }
    Ok(Proxy { url, source })
}

impl ProxySettings {
    pub fn from_env(env: &dyn Env, explicit: Option<String>) -> Result<Self, TransportError> {
        let pick = |lower: &'static str, upper: &'static str| {
            env.var(lower)
                .map(|v| (v, lower))
                .or_else(|| env.var(upper).map(|v| (v, upper)))
                .map(|(v, name)| checked(v, name))
                .transpose()
        };
        Ok(Self {
            explicit: explicit.map(|u| checked(u, "--proxy")).transpose()?,
            http: pick("http_proxy", "HTTP_PROXY")?,
            https: pick("https_proxy", "HTTPS_PROXY")?,
            all: pick("all_proxy", "ALL_PROXY")?,
            no_proxy: env
                .var("no_proxy")
                .or_else(|| env.var("NO_PROXY"))
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_ascii_lowercase())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    pub fn is_set(&self) -> bool {
        self.explicit.is_some() || self.http.is_some() || self.https.is_some() || self.all.is_some()
    }

    /// The proxy a request to `url` goes through, if any.
    pub fn proxy_for(&self, url: &Url) -> Option<&Proxy> {
        let host = url
            .host_str()?
            .trim_start_matches('[')
            .trim_end_matches(']');
        if is_link_local_metadata(host) || self.bypassed(host) {
            return None;
        }
        if let Some(p) = &self.explicit {
            return Some(p);
        }
        let by_scheme = match url.scheme() {
            "https" => self.https.as_ref(),
            _ => self.http.as_ref(),
        };
        by_scheme.or(self.all.as_ref())
    }

    fn bypassed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let ip: Option<IpAddr> = host.parse().ok();
        self.no_proxy.iter().any(|entry| {
            if entry == "*" {
                return true;
            }
            if let Some((net, bits)) = entry.split_once('/') {
                return match (ip, net.parse::<IpAddr>(), bits.parse::<u32>()) {
                    (Some(ip), Ok(net), Ok(bits)) => in_cidr(ip, net, bits),
                    _ => false,
                };
            }
            // `host:port` entries: the port is not compared.
            let entry = match entry.rsplit_once(':') {
                Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.contains(':') => h,
                _ => entry.as_str(),
            };
            let entry = entry
                .trim_start_matches("*.")
                .trim_start_matches('.')
                .trim_start_matches('[')
                .trim_end_matches(']');
            host == entry || host.ends_with(&format!(".{entry}"))
        })
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, bits: u32) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) if bits <= 32 => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) if bits <= 128 => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// IMDS (169.254.169.254, fd00:ec2::254) and the container agents (169.254.170.2,
/// 169.254.170.23, fd00:ec2::23).
fn is_link_local_metadata(host: &str) -> bool {
    matches!(
        host,
        "169.254.169.254" | "169.254.170.2" | "169.254.170.23" | "fd00:ec2::254" | "fd00:ec2::23"
    )
}

/// A reqwest error with its whole chain of causes, which is where the reason is ("invalid
/// peer certificate: UnknownIssuer", "Connection refused").
pub fn describe_error(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message
}

/// Whether an error text says the server's certificate is not trusted.
pub fn is_untrusted_certificate(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("invalid peer certificate")
        || m.contains("unknownissuer")
        || m.contains("certificate verify failed")
}

/// The sentence for a certificate we do not trust.
pub fn untrusted_message(endpoint: &str, detail: &str) -> String {
    let reason = detail
        .rsplit(": ")
        .next()
        .unwrap_or(detail)
        .trim()
        .to_string();
    format!(
        "the TLS certificate of {endpoint} is not trusted ({reason}); pass its CA with --ca-bundle FILE or AWS_CA_BUNDLE"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::credentials::FakeEnv;

    fn env(vars: &[(&str, &str)]) -> FakeEnv {
        FakeEnv::with(vars)
    }

    fn url(u: &str) -> Url {
        Url::parse(u).unwrap()
    }

    #[test]
    fn proxies_by_scheme_and_no_proxy() {
        let p = ProxySettings::from_env(
            &env(&[
                ("HTTPS_PROXY", "http://user:pw@proxy.corp:3128"),
                ("ALL_PROXY", "socks5h://127.0.0.1:1080"),
                (
                    "NO_PROXY",
                    "internal.corp, .example.org,10.0.0.0/8,localhost:9000",
                ),
            ]),
            None,
        )
        .unwrap();
        let https = p.proxy_for(&url("https://s3.amazonaws.com/x")).unwrap();
        assert_eq!(https.source, "HTTPS_PROXY");
        assert_eq!(https.display(), "http://proxy.corp:3128");
        assert_eq!(
            p.proxy_for(&url("http://minio:9000/")).unwrap().url,
            "socks5h://127.0.0.1:1080"
        );
        assert!(p.proxy_for(&url("https://internal.corp/")).is_none());
        assert!(p.proxy_for(&url("https://s3.internal.corp/")).is_none());
        assert!(p.proxy_for(&url("https://a.example.org/")).is_none());
        assert!(p.proxy_for(&url("https://example.org/")).is_none());
        assert!(p.proxy_for(&url("https://notexample.org/")).is_some());
        assert!(p.proxy_for(&url("http://10.1.2.3:9000/")).is_none());
        assert!(p.proxy_for(&url("http://11.1.2.3:9000/")).is_some());
        assert!(p.proxy_for(&url("http://localhost:9000/")).is_none());
        assert!(p.proxy_for(&url("http://169.254.169.254/latest")).is_none());
    }

    #[test]
    fn explicit_proxy_and_lower_case_win() {
        let p = ProxySettings::from_env(
            &env(&[
                ("HTTP_PROXY", "http://upper:1"),
                ("http_proxy", "http://lower:1"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(p.proxy_for(&url("http://x/")).unwrap().source, "http_proxy");
        assert!(p.proxy_for(&url("https://x/")).is_none());
        let p = ProxySettings::from_env(&env(&[("NO_PROXY", "*")]), Some("127.0.0.1:8080".into()))
            .unwrap();
        assert!(p.proxy_for(&url("https://x/")).is_none(), "NO_PROXY=* wins");
        let p = ProxySettings::from_env(&env(&[]), Some("127.0.0.1:8080".into())).unwrap();
        assert_eq!(
            p.proxy_for(&url("https://x/")).unwrap().url,
            "http://127.0.0.1:8080"
        );
    }

    #[test]
    fn bad_proxies_are_refused() {
        let e = ProxySettings::from_env(&env(&[("ALL_PROXY", "ftp://x:1")]), None).unwrap_err();
        assert!(e.0.contains("ALL_PROXY") && e.0.contains("socks5h"), "{e}");
        assert!(ProxySettings::from_env(&env(&[]), Some("http://".into())).is_err());
    }

    #[test]
    fn ca_bundle_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").unwrap();
        let e = TransportConfig::from_options(&env(&[]), Some(empty), None, false).unwrap_err();
        assert!(e.0.contains("holds no certificate"), "{e}");
        let e = TransportConfig::from_options(
            &env(&[("AWS_CA_BUNDLE", "/nonexistent/ca.pem")]),
            None,
            None,
            false,
        )
        .unwrap_err();
        assert!(e.0.contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn untrusted_certificate_sentence() {
        let m = "error sending request: client error (Connect): invalid peer certificate: UnknownIssuer";
        assert!(is_untrusted_certificate(m));
        assert_eq!(
            untrusted_message("https://127.0.0.1:9443", m),
            "the TLS certificate of https://127.0.0.1:9443 is not trusted (UnknownIssuer); pass its CA with --ca-bundle FILE or AWS_CA_BUNDLE"
        );
    }
}
