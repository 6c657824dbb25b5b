//! A small HTTP proxy that stands between the client and a real S3 server and fails chosen
//! requests, so the client's retry logic is tested against real wire behaviour: error statuses,
//! connections closed without an answer, and a 200 whose body is an `<Error>`.
//!
//! Requests are taken one at a time per connection. For each, the next planned [`Fault`] is
//! applied; when the plan is empty the request is forwarded to the server unchanged (its Host
//! header, and so its signature, stay valid: the server does not care which port it was reached
//! on). Every answer closes the connection, which keeps the proxy simple; the client opens a new
//! one per request.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status and an `<Error>` of this code.
    Status(u16, &'static str),
    /// Close the connection after reading the request, without answering.
    Reset,
    /// Answer 200 with an `<Error>` body of this code, without forwarding, as S3 does when
    /// CopyObject or CompleteMultipartUpload fails after the status line went out.
    ErrorIn200(&'static str),
}

pub struct FaultProxy {
    addr: SocketAddr,
    plan: Arc<Mutex<VecDeque<Fault>>>,
    seen: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: String, plan: Vec<Fault>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let plan = Arc::new(Mutex::new(VecDeque::from(plan)));
        let seen = Arc::new(AtomicUsize::new(0));
        let (p, s) = (plan.clone(), seen.clone());
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (p, s, up) = (p.clone(), s.clone(), upstream.clone());
                tokio::spawn(async move {
                    let _ = serve(conn, &up, &p, &s).await;
                });
            }
        });
        Self {
            addr,
            plan,
            seen,
            task,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far, faulted or forwarded.
    pub fn requests_seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }

    pub fn push(&self, faults: impl IntoIterator<Item = Fault>) {
        self.plan.lock().unwrap().extend(faults);
    }

    pub fn faults_left(&self) -> usize {
        self.plan.lock().unwrap().len()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (head and Content-Length body). `None` when the client closed.
async fn read_request(conn: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let body_len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + body_len {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(Some(buf))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Adds `Connection: close` to a request or response head.
fn with_connection_close(message: &[u8]) -> Vec<u8> {
    let Some(end) = find(message, b"\r\n\r\n") else {
        return message.to_vec();
    };
    let mut out = Vec::with_capacity(message.len() + 20);
    out.extend_from_slice(&message[..end]);
    out.extend_from_slice(b"\r\nConnection: close");
    out.extend_from_slice(&message[end..]);
    out
}

fn error_response(status: u16, code: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>"
    );
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        if status == 200 { "OK" } else { "Injected" },
        body.len()
    )
    .into_bytes()
}

async fn serve(
    mut conn: TcpStream,
    upstream: &str,
    plan: &Mutex<VecDeque<Fault>>,
    seen: &AtomicUsize,
) -> std::io::Result<()> {
    let Some(request) = read_request(&mut conn).await? else {
        return Ok(());
    };
    seen.fetch_add(1, Ordering::SeqCst);
    let fault = plan.lock().unwrap().pop_front();
    match fault {
        Some(Fault::Status(status, code)) => conn.write_all(&error_response(status, code)).await?,
        Some(Fault::ErrorIn200(code)) => conn.write_all(&error_response(200, code)).await?,
        Some(Fault::Reset) => {
            conn.set_zero_linger()?;
            return Ok(());
        }
        None => {
            let mut up = TcpStream::connect(upstream).await?;
            up.write_all(&with_connection_close(&request)).await?;
            let mut response = Vec::new();
            up.read_to_end(&mut response).await?;
            conn.write_all(&with_connection_close(&response)).await?;
        }
    }
    conn.shutdown().await
}
