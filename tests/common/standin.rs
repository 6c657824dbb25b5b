//! Small servers on 127.0.0.1 that stand in for the AWS services the local S3 server lacks
//! (IMDSv2, STS, container credentials, the SSO portal), and the network pieces around it (a
//! recording proxy in front of S3, a TLS front, a SOCKS5 proxy). Each runs on a runtime of its
//! own, so the test body may block (mount, file I/O) without starving it, and stops when
//! dropped.
//!
//! HTTP here is the least that works: one request per connection, `Content-Length` bodies,
//! `Connection: close` answers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as a stand-in received it.
#[derive(Debug, Clone)]
pub struct Served {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// Names in lower case, in the order sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Served {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    pub fn query(&self) -> &str {
        self.target.split_once('?').map_or("", |(_, q)| q)
    }

    /// A query or form parameter, percent-decoded.
    pub fn param_in(text: &str, name: &str) -> Option<String> {
        text.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| {
                percent_encoding::percent_decode_str(&v.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            })
        })
    }

    pub fn form(&self, name: &str) -> Option<String> {
        Self::param_in(&String::from_utf8_lossy(&self.body), name)
    }

    pub fn query_param(&self, name: &str) -> Option<String> {
        Self::param_in(self.query(), name)
    }
}

pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
        }
    }

    pub fn text(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self::new(status, "text/plain", body)
    }

    pub fn json(body: String) -> Self {
        Self::new(200, "application/json", body)
    }

    pub fn xml(status: u16, body: String) -> Self {
        Self::new(status, "text/xml", body)
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} Stand-in\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// A runtime of one worker that dies with its owner.
pub struct Background {
    rt: Option<tokio::runtime::Runtime>,
}

impl Background {
    pub fn new() -> Self {
        Self {
            rt: Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("stand-in runtime"),
            ),
        }
    }

    pub fn handle(&self) -> tokio::runtime::Handle {
        self.rt.as_ref().expect("running").handle().clone()
    }

    /// Binds 127.0.0.1 on a free port.
    pub fn listener(&self) -> (TcpListener, SocketAddr) {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let _guard = self.handle().enter();
        (TcpListener::from_std(std_listener).expect("listener"), addr)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Reads one request head and its `Content-Length` body. `None` when the peer closed first.
pub async fn read_request<S: AsyncRead + Unpin>(
    conn: &mut S,
) -> std::io::Result<Option<(Served, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_string();
    let target = first.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body_len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + body_len {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + body_len].to_vec();
    Ok(Some((
        Served {
            method,
            target,
            headers,
            body,
        },
        buf,
    )))
}

type Handler = dyn Fn(&Served) -> Reply + Send + Sync;

/// An HTTP stand-in answering every request with `handler`, and keeping what it was sent.
pub struct StandIn {
    addr: SocketAddr,
    served: Arc<Mutex<Vec<Served>>>,
    _bg: Background,
}

impl StandIn {
    pub fn start(handler: impl Fn(&Served) -> Reply + Send + Sync + 'static) -> Self {
        let bg = Background::new();
        let (listener, addr) = bg.listener();
        let served = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let log = served.clone();
        bg.handle().spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (handler, log) = (handler.clone(), log.clone());
                tokio::spawn(async move {
                    if let Ok(Some((req, _))) = read_request(&mut conn).await {
                        let reply = handler(&req);
                        log.lock().unwrap().push(req);
                        let _ = conn.write_all(&reply.bytes()).await;
                        let _ = conn.shutdown().await;
                    }
                });
            }
        });
        Self {
            addr,
            served,
            _bg: bg,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn served(&self) -> Vec<Served> {
        self.served.lock().unwrap().clone()
    }

    pub fn count(&self, pred: impl Fn(&Served) -> bool) -> usize {
        self.served
            .lock()
            .unwrap()
            .iter()
            .filter(|s| pred(s))
            .count()
    }
}

/// A proxy in front of the S3 server that records every request and may refuse some: `gate`
/// returns an answer to send instead of forwarding.
pub struct RecordingProxy {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Served>>>,
    refused: Arc<AtomicUsize>,
    _bg: Background,
}

type Gate = dyn Fn(&Served) -> Option<Reply> + Send + Sync;

impl RecordingProxy {
    pub fn start(
        upstream: String,
        gate: impl Fn(&Served) -> Option<Reply> + Send + Sync + 'static,
    ) -> Self {
        let bg = Background::new();
        let (listener, addr) = bg.listener();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(AtomicUsize::new(0));
        let gate: Arc<Gate> = Arc::new(gate);
        let (log, count) = (seen.clone(), refused.clone());
        bg.handle().spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (gate, log, count, up) =
                    (gate.clone(), log.clone(), count.clone(), upstream.clone());
                tokio::spawn(async move {
                    let Ok(Some((req, raw))) = read_request(&mut conn).await else {
                        return;
                    };
                    let verdict = gate(&req);
                    log.lock().unwrap().push(req);
                    if let Some(reply) = verdict {
                        count.fetch_add(1, Ordering::SeqCst);
                        let _ = conn.write_all(&reply.bytes()).await;
                        let _ = conn.shutdown().await;
                        return;
                    }
                    let Ok(mut server) = TcpStream::connect(&up).await else {
                        return;
                    };
                    if server
                        .write_all(&with_connection_close(&raw))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let _ = tokio::io::copy(&mut server, &mut conn).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        Self {
            addr,
            seen,
            refused,
            _bg: bg,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Served> {
        self.seen.lock().unwrap().clone()
    }

    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

/// Adds `Connection: close` to a request head, so the server ends the answer by closing.
pub fn with_connection_close(message: &[u8]) -> Vec<u8> {
    let Some(end) = message.windows(4).position(|w| w == b"\r\n\r\n") else {
        return message.to_vec();
    };
    let mut out = Vec::with_capacity(message.len() + 20);
    out.extend_from_slice(&message[..end]);
    out.extend_from_slice(b"\r\nConnection: close");
    out.extend_from_slice(&message[end..]);
    out
}

/// Copies both ways until either side closes.
pub async fn pipe<A, B>(a: A, b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a, mut b) = (a, b);
    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
}

/// A SOCKS5 proxy (no authentication, CONNECT to IPv4 or a name) that counts the connections
/// it carried.
pub struct Socks5Proxy {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    targets: Arc<Mutex<Vec<String>>>,
    _bg: Background,
}

impl Socks5Proxy {
    pub fn start() -> Self {
        let bg = Background::new();
        let (listener, addr) = bg.listener();
        let connections = Arc::new(AtomicUsize::new(0));
        let targets = Arc::new(Mutex::new(Vec::new()));
        let (count, log) = (connections.clone(), targets.clone());
        bg.handle().spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (count, log) = (count.clone(), log.clone());
                tokio::spawn(async move {
                    if let Ok((client, server, target)) = socks5_handshake(conn).await {
                        count.fetch_add(1, Ordering::SeqCst);
                        log.lock().unwrap().push(target);
                        pipe(client, server).await;
                    }
                });
            }
        });
        Self {
            addr,
            connections,
            targets,
            _bg: bg,
        }
    }

    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// `host:port` of each CONNECT, as the client named it.
    pub fn targets(&self) -> Vec<String> {
        self.targets.lock().unwrap().clone()
    }
}

async fn socks5_handshake(mut c: TcpStream) -> std::io::Result<(TcpStream, TcpStream, String)> {
    let bad = || std::io::Error::other("bad SOCKS5 request");
    let mut hello = [0u8; 2];
    c.read_exact(&mut hello).await?;
    if hello[0] != 5 {
        return Err(bad());
    }
    let mut methods = vec![0u8; hello[1] as usize];
    c.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        c.write_all(&[5, 0xff]).await?;
        return Err(bad());
    }
    c.write_all(&[5, 0]).await?;
    let mut req = [0u8; 4];
    c.read_exact(&mut req).await?;
    if req[0] != 5 || req[1] != 1 {
        return Err(bad());
    }
    let host = match req[3] {
        1 => {
            let mut ip = [0u8; 4];
            c.read_exact(&mut ip).await?;
            std::net::Ipv4Addr::from(ip).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            c.read_exact(&mut len).await?;
            let mut name = vec![0u8; len[0] as usize];
            c.read_exact(&mut name).await?;
            String::from_utf8_lossy(&name).into_owned()
        }
        _ => return Err(bad()),
    };
    let mut port = [0u8; 2];
    c.read_exact(&mut port).await?;
    let target = format!("{host}:{}", u16::from_be_bytes(port));
    match TcpStream::connect(&target).await {
        Ok(server) => {
            c.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0]).await?;
            Ok((c, server, target))
        }
        Err(e) => {
            // 5: connection refused.
            c.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
            Err(e)
        }
    }
}

/// An HTTP forward proxy for http:// URLs: takes absolute-form requests
/// (`GET http://host:port/path HTTP/1.1`), forwards them in origin form, and keeps the
/// `host:port` each went to.
pub struct HttpProxy {
    addr: SocketAddr,
    targets: Arc<Mutex<Vec<String>>>,
    _bg: Background,
}

impl HttpProxy {
    pub fn start() -> Self {
        let bg = Background::new();
        let (listener, addr) = bg.listener();
        let targets = Arc::new(Mutex::new(Vec::new()));
        let log = targets.clone();
        bg.handle().spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let Ok(Some((req, raw))) = read_request(&mut conn).await else {
                        return;
                    };
                    let Some(rest) = req.target.strip_prefix("http://") else {
                        let _ = conn
                            .write_all(&Reply::text(400, "absolute-form only").bytes())
                            .await;
                        return;
                    };
                    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                    log.lock().unwrap().push(authority.to_string());
                    let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
                    let mut forwarded = format!(
                        "{} {} HTTP/1.1",
                        req.method,
                        if path.is_empty() { "/" } else { path }
                    )
                    .into_bytes();
                    forwarded.extend_from_slice(&raw[line_end..]);
                    let Ok(mut server) = TcpStream::connect(authority).await else {
                        let _ = conn
                            .write_all(&Reply::text(502, "cannot connect").bytes())
                            .await;
                        return;
                    };
                    if server
                        .write_all(&with_connection_close(&forwarded))
                        .await
                        .is_ok()
                    {
                        let _ = tokio::io::copy(&mut server, &mut conn).await;
                    }
                    let _ = conn.shutdown().await;
                });
            }
        });
        Self {
            addr,
            targets,
            _bg: bg,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn targets(&self) -> Vec<String> {
        self.targets.lock().unwrap().clone()
    }
}

/// A test CA and a server certificate for 127.0.0.1 and localhost signed by it.
pub struct TestCa {
    pub ca_pem: String,
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

impl TestCa {
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "s3mount test CA");
        let ca_key = KeyPair::generate().expect("CA key");
        let ca = ca_params.self_signed(&ca_key).expect("CA cert");
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "s3mount test server");
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");
        Self {
            ca_pem: ca.pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        }
    }
}

/// TLS in front of a plain-HTTP server: terminates TLS with the test CA's certificate and
/// pipes the bytes to `upstream`. Counts completed handshakes.
pub struct TlsFront {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    _bg: Background,
}

impl TlsFront {
    pub fn start(ca: &TestCa, upstream: String) -> Self {
        use tokio_rustls::rustls;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![rustls::pki_types::CertificateDer::from(ca.cert_der.clone())],
                rustls::pki_types::PrivateKeyDer::Pkcs8(ca.key_der.clone().into()),
            )
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let bg = Background::new();
        let (listener, addr) = bg.listener();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let count = handshakes.clone();
        bg.handle().spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (acceptor, count, up) = (acceptor.clone(), count.clone(), upstream.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(conn).await else {
                        return;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    if let Ok(server) = TcpStream::connect(&up).await {
                        pipe(tls, server).await;
                    }
                });
            }
        });
        Self {
            addr,
            handshakes,
            _bg: bg,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

/// A port nothing listens on.
pub fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
