//! A small HTTP proxy that stands between the client and a real S3 server and injects the
//! faults a real network produces, so retries, resumed bodies and exactly-once outcomes are
//! tested against real wire behaviour:
//!
//! - error statuses and a 200 whose body is an `<Error>` (the request never reaches the server);
//! - a connection closed before the request is forwarded (a reset *before* the server saw it);
//! - a lost answer: the request is forwarded, the server acts on it, and the connection is
//!   closed without the answer (a reset *after* the server saw it);
//! - a body cut off partway (headers and some of the body, then a reset);
//! - a stalled body (headers and some of the body, then nothing for a while);
//! - a hang: the request is read and never answered (a server that froze, as under SIGSTOP);
//! - a restart: every open connection dropped at once, and new ones refused for a moment;
//! - a black hole: every request hangs until it is switched off;
//! - a corrupted body: the request is forwarded with the last byte of its body changed, as a
//!   faulty link or middlebox would (the server must refuse it by its checksum).
//!
//! Faults come from a plan (the next requests, in order), from rules that pick requests by
//! method and query (`uploads`, `uploadId`), or at random with a seeded generator and a rate.
//! Bodies are streamed both ways, so large transfers stay cheap. Every answer closes its
//! connection (the client opens a new one per request); the request is forwarded unchanged, so
//! its Host header and signature stay valid.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with this status and an `<Error>` of this code, without forwarding.
    Status(u16, &'static str),
    /// Close the connection after reading the request, without forwarding it.
    Reset,
    /// Answer 200 with an `<Error>` body of this code, without forwarding, as S3 does when
    /// CopyObject or CompleteMultipartUpload fails after the status line went out.
    ErrorIn200(&'static str),
    /// Forward the request (the server acts on it) and close without the answer.
    LoseAnswer,
    /// Forward, send the answer's headers and part of its body, then reset.
    CutBody,
    /// Forward, send the headers and part of the body, then nothing for this long (then close).
    StallBody(Duration),
    /// Read the request and answer nothing for this long (then close), forwarding nothing.
    Hang(Duration),
    /// Forward the request with the last byte of its body changed.
    FlipBodyByte,
}

impl Fault {
    fn name(&self) -> &'static str {
        match self {
            Fault::Status(..) => "status",
            Fault::Reset => "reset",
            Fault::ErrorIn200(_) => "error-in-200",
            Fault::LoseAnswer => "lost-answer",
            Fault::CutBody => "cut-body",
            Fault::StallBody(_) => "stalled-body",
            Fault::Hang(_) => "hang",
            Fault::FlipBodyByte => "flipped-byte",
        }
    }
}

/// Which requests a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// CreateMultipartUpload: `POST ?uploads`.
    CreateMultipartUpload,
    /// CompleteMultipartUpload: `POST ?uploadId=`.
    CompleteMultipartUpload,
    /// GetObject: a GET that is not a listing.
    Get,
    /// Any PUT (PutObject, UploadPart, copies).
    Put,
}

impl Target {
    fn matches(self, head: &RequestHead) -> bool {
        let query = head.target.split_once('?').map_or("", |(_, q)| q);
        let has = |name: &str| {
            query
                .split('&')
                .any(|p| p == name || p.starts_with(&format!("{name}=")))
        };
        match self {
            Target::CreateMultipartUpload => head.method == "POST" && has("uploads"),
            Target::CompleteMultipartUpload => head.method == "POST" && has("uploadId"),
            Target::Get => {
                head.method == "GET" && !has("list-type") && !has("uploads") && !has("uploadId")
            }
            Target::Put => head.method == "PUT",
        }
    }
}

struct Rule {
    target: Target,
    fault: Fault,
    times: usize,
}

/// Faults at random: each request gets one with probability `rate`, its kind drawn from the
/// mix, all from one seeded generator so a failing run can be repeated.
struct Random {
    rng: fastrand::Rng,
    rate: f64,
    stall: Duration,
}

#[derive(Default)]
struct Plan {
    queue: VecDeque<Fault>,
    rules: Vec<Rule>,
    random: Option<Random>,
}

impl Plan {
    fn next(&mut self, head: &RequestHead) -> Option<Fault> {
        if let Some(rule) = self
            .rules
            .iter_mut()
            .find(|r| r.times > 0 && r.target.matches(head))
        {
            rule.times -= 1;
            return Some(rule.fault.clone());
        }
        if let Some(f) = self.queue.pop_front() {
            return Some(f);
        }
        let r = self.random.as_mut()?;
        if r.rng.f64() >= r.rate {
            return None;
        }
        Some(match r.rng.u32(0..8) {
            0 => Fault::Status(503, "SlowDown"),
            1 => Fault::Status(500, "InternalError"),
            2 => Fault::Reset,
            3 => Fault::LoseAnswer,
            4 | 5 => Fault::CutBody,
            6 => Fault::StallBody(r.stall),
            _ => Fault::Hang(r.stall),
        })
    }
}

struct Shared {
    upstream: String,
    plan: Mutex<Plan>,
    seen: AtomicUsize,
    injected: Mutex<Vec<&'static str>>,
    black_hole: AtomicBool,
    /// Until when new connections are refused (a restart in progress).
    down_until: Mutex<Option<Instant>>,
    /// Bumped by a restart: connections of an older generation are dropped.
    generation: tokio::sync::watch::Sender<u64>,
    /// GetObject requests being served now, and the most at once so far.
    gets: AtomicUsize,
    most_gets: AtomicUsize,
}

/// Counts a GetObject as being served until dropped.
struct Serving<'a>(&'a Shared);

impl<'a> Serving<'a> {
    fn start(s: &'a Shared) -> Self {
        let now = s.gets.fetch_add(1, Ordering::SeqCst) + 1;
        s.most_gets.fetch_max(now, Ordering::SeqCst);
        Self(s)
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.gets.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: String, plan: Vec<Fault>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            plan: Mutex::new(Plan {
                queue: VecDeque::from(plan),
                ..Plan::default()
            }),
            seen: AtomicUsize::new(0),
            injected: Mutex::new(Vec::new()),
            black_hole: AtomicBool::new(false),
            down_until: Mutex::new(None),
            generation: tokio::sync::watch::channel(0).0,
            gets: AtomicUsize::new(0),
            most_gets: AtomicUsize::new(0),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let down = s
                    .down_until
                    .lock()
                    .unwrap()
                    .is_some_and(|t| Instant::now() < t);
                if down {
                    // Restarting: refused, as a server that is not listening yet.
                    let _ = conn.set_zero_linger();
                    continue;
                }
                let s = s.clone();
                let mut generation = s.generation.subscribe();
                let born = *generation.borrow();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = serve(conn, &s) => {}
                        // A restart drops this connection, whatever it was doing.
                        _ = generation.wait_for(|g| *g != born) => {}
                    }
                });
            }
        });
        Self { addr, shared, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far, faulted or forwarded.
    pub fn requests_seen(&self) -> usize {
        self.shared.seen.load(Ordering::SeqCst)
    }

    /// The most GetObject requests served at once so far (from the request's head to the
    /// last piece of the answer, before it is sent).
    pub fn most_gets_at_once(&self) -> usize {
        self.shared.most_gets.load(Ordering::SeqCst)
    }

    /// The faults injected so far, by name.
    pub fn injected(&self) -> Vec<&'static str> {
        self.shared.injected.lock().unwrap().clone()
    }

    pub fn push(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.plan.lock().unwrap().queue.extend(faults);
    }

    pub fn faults_left(&self) -> usize {
        let plan = self.shared.plan.lock().unwrap();
        plan.queue.len() + plan.rules.iter().map(|r| r.times).sum::<usize>()
    }

    /// The next `times` requests of `target` get `fault`.
    pub fn on(&self, target: Target, fault: Fault, times: usize) {
        self.shared.plan.lock().unwrap().rules.push(Rule {
            target,
            fault,
            times,
        });
    }

    /// From now on, each request gets a random fault with probability `rate` (stalls and
    /// hangs last `stall`), drawn from a generator seeded with `seed`.
    pub fn random(&self, seed: u64, rate: f64, stall: Duration) {
        self.shared.plan.lock().unwrap().random = Some(Random {
            rng: fastrand::Rng::with_seed(seed),
            rate,
            stall,
        });
    }

    /// No more random faults.
    pub fn calm(&self) {
        self.shared.plan.lock().unwrap().random = None;
    }

    /// While on, every request is read and never answered, as by a frozen server.
    pub fn black_hole(&self, on: bool) {
        self.shared.black_hole.store(on, Ordering::SeqCst);
    }

    /// A server restart: every connection is dropped now, and new ones are refused for
    /// `down_for`.
    pub fn restart(&self, down_for: Duration) {
        *self.shared.down_until.lock().unwrap() = Some(Instant::now() + down_for);
        self.shared.generation.send_modify(|g| *g += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        // Open connections end with their next restart generation.
        self.shared.generation.send_modify(|g| *g += 1);
    }
}

#[derive(Debug)]
struct RequestHead {
    method: String,
    target: String,
    /// The head as received, `\r\n\r\n` included.
    raw: Vec<u8>,
    body_len: u64,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads a message head; returns it and whatever of the body came with it. `None` when the
/// peer closed first.
async fn read_head(conn: &mut TcpStream) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Ok(Some((buf, rest)));
        }
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header_value(head: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(head);
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Adds `Connection: close` to a message head.
fn with_connection_close(head: &[u8]) -> Vec<u8> {
    let end = find(head, b"\r\n\r\n").unwrap_or(head.len());
    let mut out = Vec::with_capacity(head.len() + 20);
    out.extend_from_slice(&head[..end]);
    out.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    out
}

fn error_response(status: u16, code: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected by the test proxy</Message><RequestId>proxy</RequestId></Error>"
    );
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/xml\r\nx-amz-request-id: proxy\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        if status == 200 { "OK" } else { "Injected" },
        body.len()
    )
    .into_bytes()
}

async fn serve(mut conn: TcpStream, s: &Shared) -> std::io::Result<()> {
    let Some((raw, early_body)) = read_head(&mut conn).await? else {
        return Ok(());
    };
    let first = String::from_utf8_lossy(&raw)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let mut parts = first.split(' ');
    let head = RequestHead {
        method: parts.next().unwrap_or("").to_string(),
        target: parts.next().unwrap_or("").to_string(),
        body_len: header_value(&raw, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        raw,
    };
    s.seen.fetch_add(1, Ordering::SeqCst);
    let mut serving = Target::Get.matches(&head).then(|| Serving::start(s));
    // The whole request body is read before anything else, as a server would receive it.
    let mut body = early_body;
    let mut chunk = vec![0u8; 256 * 1024];
    while (body.len() as u64) < head.body_len {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    if s.black_hole.load(Ordering::SeqCst) {
        // Frozen: nothing comes back, until the client gives up.
        std::future::pending::<()>().await;
    }
    let fault = s.plan.lock().unwrap().next(&head);
    if let Some(f) = &fault {
        s.injected.lock().unwrap().push(f.name());
    }
    match &fault {
        Some(Fault::Status(status, code)) => {
            conn.write_all(&error_response(*status, code)).await?;
            return conn.shutdown().await;
        }
        Some(Fault::ErrorIn200(code)) => {
            conn.write_all(&error_response(200, code)).await?;
            return conn.shutdown().await;
        }
        Some(Fault::Reset) => {
            conn.set_zero_linger()?;
            return Ok(());
        }
        Some(Fault::Hang(d)) => {
            tokio::time::sleep(*d).await;
            return Ok(());
        }
        Some(Fault::FlipBodyByte) => {
            if let Some(last) = body.last_mut() {
                *last ^= 0x01;
            }
        }
        _ => {}
    }
    let mut up = TcpStream::connect(&s.upstream).await?;
    up.write_all(&with_connection_close(&head.raw)).await?;
    up.write_all(&body).await?;
    let Some((response_head, early)) = read_head(&mut up).await? else {
        conn.set_zero_linger()?;
        return Ok(());
    };
    if fault == Some(Fault::LoseAnswer) {
        // The server has acted; drain its answer so it finishes, and tell the client nothing.
        let mut rest = early;
        let _ = up.read_to_end(&mut rest).await;
        conn.set_zero_linger()?;
        return Ok(());
    }
    let has_body = head.method != "HEAD";
    let body_len: Option<u64> =
        header_value(&response_head, "content-length").and_then(|v| v.parse().ok());
    // Where a cut or a stall happens: somewhere inside the body.
    let cut_at = match (&fault, body_len) {
        (Some(Fault::CutBody | Fault::StallBody(_)), Some(len)) if has_body && len > 1 => {
            Some(fastrand::u64(1..len))
        }
        (Some(Fault::CutBody | Fault::StallBody(_)), None) if has_body => Some(1),
        _ => None,
    };
    conn.write_all(&with_connection_close(&response_head))
        .await?;
    let mut sent = 0u64;
    let mut pending = early;
    loop {
        if pending.is_empty() {
            pending.resize(256 * 1024, 0);
            let n = up.read(&mut pending).await?;
            pending.truncate(n);
            if n == 0 {
                break;
            }
        }
        let mut piece = std::mem::take(&mut pending);
        if let Some(at) = cut_at {
            if sent + piece.len() as u64 >= at {
                let keep = (at - sent) as usize;
                piece.truncate(keep);
                conn.write_all(&piece).await?;
                conn.flush().await?;
                if let Some(Fault::StallBody(d)) = &fault {
                    tokio::time::sleep(*d).await;
                }
                conn.set_zero_linger()?;
                return Ok(());
            }
        }
        sent += piece.len() as u64;
        if Some(sent) == body_len {
            // Once this last piece is out, the client has the whole answer and may send its
            // next request at once, while this task is still being scheduled: so the GET
            // counts as served now, and the count never exceeds the client's GETs in flight.
            serving = None;
        }
        conn.write_all(&piece).await?;
    }
    drop(serving);
    conn.shutdown().await
}

/// A fault proxy in front of the server, and the server as reached through it.
pub async fn proxied(env: &super::ServerEnv) -> (FaultProxy, super::ServerEnv) {
    let proxy = FaultProxy::start(env.authority(), vec![]).await;
    let mut through = env.clone();
    through.endpoint = proxy.endpoint();
    (proxy, through)
}
