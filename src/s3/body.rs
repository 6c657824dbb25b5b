//! Request bodies on the wire, and how a request's progress is watched for its timeouts.
//!
//! A request can hang in two places: while its body is being sent (the server stopped reading,
//! the link died) and while its answer is awaited. reqwest's own read timeout cannot tell these
//! apart: it fires during a long upload on a slow link, where nothing is read because nothing
//! is due yet. So every request body is handed to the HTTP stack in pieces of
//! [`PIECE`] bytes through a stream that records each piece taken ([`Progress`]); the sender
//! (see `S3Client::send_once`) fails the request when no piece was taken for the stall timeout,
//! or when the answer has not come within the request timeout of the last piece. The pieces
//! of a `Bytes` body are slices of it (no copy); a file region is read 1 MiB at a time off the
//! async workers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;

use super::client::PutBody;

/// The unit of progress of a body being sent.
const PIECE: usize = 256 << 10;
/// How much of a file region is read at once.
const FILE_READ: u64 = 1 << 20;

/// What a request in flight is waiting for, when it last moved.
#[derive(Debug)]
pub(super) struct Progress {
    state: Mutex<ProgressState>,
}

#[derive(Debug, Clone, Copy)]
struct ProgressState {
    /// The last piece of the body taken (or when the request started).
    moved: Instant,
    /// When the whole body was taken, and the answer became due.
    sent: Option<Instant>,
}

/// Which wait of a request ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Waiting {
    /// For the server to take more of the body.
    Body,
    /// For the answer.
    Answer,
}

impl Progress {
    /// A request starting now. `grace` (the connect timeout) is added to its first wait: a new
    /// connection may take that long before anything can move.
    pub(super) fn start(has_body: bool, grace: Duration) -> Arc<Self> {
        let now = Instant::now() + grace;
        Arc::new(Self {
            state: Mutex::new(ProgressState {
                moved: now,
                sent: (!has_body).then_some(now),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProgressState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn moved(&self, complete: bool) {
        let mut s = self.lock();
        let now = Instant::now();
        s.moved = s.moved.max(now);
        if complete {
            s.sent = Some(s.moved);
        }
    }

    /// When the request has waited too long, and for what.
    pub(super) fn deadline(&self, stall: Duration, answer: Duration) -> (Instant, Waiting) {
        let s = *self.lock();
        match s.sent {
            Some(sent) => (sent + answer, Waiting::Answer),
            None => (s.moved + stall, Waiting::Body),
        }
    }
}

/// `data` as a streamed request body whose pieces are recorded in `progress`.
pub(super) fn upload_body(data: &PutBody, progress: Arc<Progress>) -> reqwest::Body {
    let total = data.len();
    if total == 0 {
        progress.moved(true);
        return reqwest::Body::from(Bytes::new());
    }
    let pieces = match data {
        PutBody::Bytes(b) => {
            let b = b.clone();
            futures_util::stream::iter(
                (0..b.len())
                    .step_by(PIECE)
                    .map(move |at| Ok::<_, std::io::Error>(b.slice(at..(at + PIECE).min(b.len())))),
            )
            .boxed()
        }
        PutBody::File { file, offset, len } => {
            let file = file.clone();
            let end = offset + len;
            futures_util::stream::unfold(*offset, move |pos| {
                let file = file.clone();
                async move {
                    if pos >= end {
                        return None;
                    }
                    let n = (end - pos).min(FILE_READ) as usize;
                    let read = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; n];
                        read_exact_at(&file, &mut buf, pos).map(|()| Bytes::from(buf))
                    })
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r);
                    Some((read, pos + n as u64))
                }
            })
            .flat_map(|read| {
                let pieces: Vec<std::io::Result<Bytes>> = match read {
                    Ok(buf) => (0..buf.len())
                        .step_by(PIECE)
                        .map(|at| Ok(buf.slice(at..(at + PIECE).min(buf.len()))))
                        .collect(),
                    Err(e) => vec![Err(e)],
                };
                futures_util::stream::iter(pieces)
            })
            .boxed()
        }
    };
    let mut taken = 0u64;
    let counted = pieces.map(move |piece| {
        if let Ok(p) = &piece {
            taken += p.len() as u64;
            progress.moved(taken >= total);
        }
        piece
    });
    reqwest::Body::wrap_stream(counted)
}

/// Reads exactly `buf.len()` bytes at `pos`, or fails: a spool file shorter than its part is a
/// bug we want to hear about, not a short upload.
pub(super) fn read_exact_at(file: &std::fs::File, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pieces_cover_the_body_and_mark_it_sent_at_the_end() {
        let data: Vec<u8> = (0..(PIECE * 2 + 17)).map(|i| i as u8).collect();
        let progress = Progress::start(true, Duration::ZERO);
        let body = upload_body(&PutBody::Bytes(Bytes::from(data.clone())), progress.clone());
        let (_, waiting) = progress.deadline(Duration::from_secs(1), Duration::from_secs(9));
        assert_eq!(waiting, Waiting::Body, "nothing taken yet");
        let mut stream = Box::pin(http_body_util_stream(body));
        let mut got = Vec::new();
        while let Some(piece) = stream.next().await {
            got.extend_from_slice(&piece.unwrap());
        }
        assert_eq!(got, data);
        let (_, waiting) = progress.deadline(Duration::from_secs(1), Duration::from_secs(9));
        assert_eq!(waiting, Waiting::Answer, "all taken: the answer is due");
    }

    #[tokio::test]
    async fn file_regions_are_read_in_pieces() {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
        f.write_all(&data).unwrap();
        let progress = Progress::start(true, Duration::ZERO);
        let region = PutBody::File {
            file: Arc::new(f),
            offset: 100,
            len: 2_500_000,
        };
        let mut stream = Box::pin(http_body_util_stream(upload_body(
            &region,
            progress.clone(),
        )));
        let mut got = Vec::new();
        while let Some(piece) = stream.next().await {
            let piece = piece.unwrap();
            assert!(piece.len() <= PIECE);
            got.extend_from_slice(&piece);
        }
        assert_eq!(got, &data[100..2_500_100]);
        assert_eq!(
            progress
                .deadline(Duration::from_secs(1), Duration::from_secs(9))
                .1,
            Waiting::Answer
        );
    }

    /// The data frames of a reqwest body, as the HTTP stack would take them.
    fn http_body_util_stream(
        body: reqwest::Body,
    ) -> impl futures_util::Stream<Item = Result<Bytes, reqwest::Error>> {
        use http_body::Body as _;
        futures_util::stream::unfold(body, |mut body| async move {
            let frame =
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await?;
            Some((frame.map(|f| f.into_data().unwrap_or_default()), body))
        })
    }
}
