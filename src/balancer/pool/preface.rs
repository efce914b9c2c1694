//! Waiting for the server's HTTP/2 preface.
//!
//! hyper's client handshake returns as soon as the client preface is written,
//! before the server has said anything: a port that accepts TCP but does not
//! speak HTTP/2 would join the rotation. grpc-go waits for the server's
//! SETTINGS frame before it calls a transport ready; this does the same by
//! watching the first bytes read from the connection (RFC 9113 §3.4: the
//! server preface is a SETTINGS frame). The frame also carries the server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS`, which the balancer honours.
//!
//! Only the first frame is inspected; after it every read is passed through
//! untouched (one branch per read).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

const FRAME_HEADER: usize = 9;
const SETTINGS: u8 = 0x4;
const ACK: u8 = 0x1;
const MAX_CONCURRENT_STREAMS: u16 = 0x3;
/// A SETTINGS payload longer than this is not a server preface we can trust.
const MAX_SETTINGS_LEN: usize = 6 * 64;

/// What the server's first frame said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerSettings {
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`, when the server set it.
    pub(crate) max_concurrent_streams: Option<u32>,
}

/// Why the first bytes were not an HTTP/2 server preface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NotHttp2(pub(crate) String);

type Report = oneshot::Sender<Result<ServerSettings, NotHttp2>>;

pin_project_lite::pin_project! {
    /// An IO that reports the server's first frame on a oneshot.
    pub(crate) struct Preface<T> {
        #[pin]
        io: T,
        seen: Vec<u8>,
        report: Option<Report>,
    }
}

impl<T> Preface<T> {
    /// Wraps `io`; the returned receiver resolves once the first frame has
    /// been read (and is dropped unresolved if the connection ends first).
    pub(crate) fn new(io: T) -> (Self, oneshot::Receiver<Result<ServerSettings, NotHttp2>>) {
        let (report, rx) = oneshot::channel();
        let this = Self {
            io,
            seen: Vec::new(),
            report: Some(report),
        };
        (this, rx)
    }
}

/// Parses the first frame from the bytes seen so far: `None` while more are
/// needed.
fn parse(seen: &[u8]) -> Option<Result<ServerSettings, NotHttp2>> {
    if seen.len() < FRAME_HEADER {
        return None;
    }
    let len = usize::from(seen[0]) << 16 | usize::from(seen[1]) << 8 | usize::from(seen[2]);
    let (kind, flags) = (seen[3], seen[4]);
    if kind != SETTINGS || flags & ACK != 0 || len % 6 != 0 || len > MAX_SETTINGS_LEN {
        let head: String = seen
            .iter()
            .take(FRAME_HEADER)
            .map(|b| {
                if b.is_ascii_graphic() {
                    *b as char
                } else {
                    '.'
                }
            })
            .collect();
        return Some(Err(NotHttp2(format!(
            "the server's first bytes are not an HTTP/2 SETTINGS frame (got {head:?})"
        ))));
    }
    if seen.len() < FRAME_HEADER + len {
        return None;
    }
    let mut settings = ServerSettings {
        max_concurrent_streams: None,
    };
    for entry in seen[FRAME_HEADER..FRAME_HEADER + len].chunks_exact(6) {
        let id = u16::from_be_bytes([entry[0], entry[1]]);
        if id == MAX_CONCURRENT_STREAMS {
            settings.max_concurrent_streams =
                Some(u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]));
        }
    }
    Some(Ok(settings))
}

impl<T: AsyncRead> AsyncRead for Preface<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let result = this.io.poll_read(cx, buf);
        if this.report.is_some() {
            if let Poll::Ready(Ok(())) = &result {
                let fresh = &buf.filled()[before..];
                let want = (FRAME_HEADER + MAX_SETTINGS_LEN).saturating_sub(this.seen.len());
                this.seen.extend_from_slice(&fresh[..fresh.len().min(want)]);
                if let Some(outcome) = parse(this.seen) {
                    if let Some(report) = this.report.take() {
                        let _ = report.send(outcome);
                    }
                    *this.seen = Vec::new();
                }
            }
        }
        result
    }
}

impl<T: AsyncWrite> AsyncWrite for Preface<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn settings_frame(entries: &[(u16, u32)]) -> Vec<u8> {
        let len = entries.len() * 6;
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            SETTINGS,
            0,
            0,
            0,
            0,
            0,
        ];
        for (id, v) in entries {
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&v.to_be_bytes());
        }
        f
    }

    #[tokio::test]
    async fn reports_max_concurrent_streams_even_when_split_across_reads() {
        let (client, mut server) = tokio::io::duplex(64);
        let (mut io, rx) = Preface::new(client);
        let frame = settings_frame(&[(0x4, 65_535), (MAX_CONCURRENT_STREAMS, 200)]);
        let mut rest = frame.clone();
        rest.extend_from_slice(b"more");
        let writer = tokio::spawn(async move {
            for chunk in rest.chunks(4) {
                server.write_all(chunk).await.unwrap();
                server.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            server
        });
        let mut all = Vec::new();
        let mut buf = [0u8; 3];
        while all.len() < frame.len() + 4 {
            let n = io.read(&mut buf).await.unwrap();
            all.extend_from_slice(&buf[..n]);
        }
        let _server = writer.await.unwrap();
        assert_eq!(&all[frame.len()..], b"more", "bytes pass through unchanged");
        assert_eq!(
            rx.await.unwrap(),
            Ok(ServerSettings {
                max_concurrent_streams: Some(200)
            })
        );
    }

    #[test]
    fn refuses_what_is_not_a_server_preface() {
        assert!(parse(b"HTTP/1.1 400 Bad Request").unwrap().is_err());
        let mut ack = settings_frame(&[]);
        ack[4] = ACK;
        assert!(parse(&ack).unwrap().is_err());
        assert_eq!(parse(&settings_frame(&[(0x4, 1)])[..5]), None);
        assert_eq!(
            parse(&settings_frame(&[])),
            Some(Ok(ServerSettings {
                max_concurrent_streams: None
            }))
        );
    }
}
