//! A minimal HTTP/1.1 client on one TCP socket, so the probe sees the exact moment a server
//! closes an idle connection and whether it was a FIN or an RST, which hyper's client hides.
//!
//! It sends `GET` requests without a body and reads responses of any framing (Content-Length,
//! chunked, or until close), discarding the body. Nothing here retries. `head` parses the
//! response head.

mod head;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{CloseKind, ProbeError};
use crate::tools::target::{self, HttpTarget, TargetError};
use head::{Framing, Head, MAX_HEADERS, parse_head};

/// Sent on every request so that the server's access log shows where the traffic came from.
const USER_AGENT: &str = concat!("kaguard-probe/", env!("CARGO_PKG_VERSION"));

/// Longest response head or chunk-size line accepted: far above what servers send, and a bound
/// on what a misbehaving server can make the probe buffer.
const MAX_HEAD: usize = 64 * 1024;

/// Interim (1xx) responses skipped before the final one; a bound against a server that sends
/// them forever.
const MAX_INTERIM: usize = 8;

/// Bytes read per `read` call while discarding a body.
const READ_CHUNK: usize = 16 * 1024;

/// How long unsolicited bytes on an idle connection are drained while waiting for the close
/// that normally follows them (e.g. a `408 Request Timeout` before the FIN).
const DRAIN_AFTER_DATA: Duration = Duration::from_secs(1);

/// Where every probe connection goes, resolved once.
#[derive(Debug)]
pub(super) struct Target {
    pub(super) addr: SocketAddr,
    request: Vec<u8>,
}

impl Target {
    /// Checks that `uri` is `http://host[:port][/path]` and resolves its host; the first
    /// address is used for every connection.
    pub(super) async fn resolve(uri: &http::Uri) -> Result<Target, ProbeError> {
        let HttpTarget {
            addr,
            authority,
            path,
        } = target::resolve(uri).await.map_err(|err| match err {
            TargetError::Bad(reason) => ProbeError::Target {
                target: uri.to_string(),
                reason,
            },
            TargetError::Resolve(source) => ProbeError::Connect {
                target: uri.to_string(),
                source,
            },
        })?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {USER_AGENT}\r\nAccept: */*\r\n\r\n"
        );
        Ok(Target {
            addr,
            request: request.into_bytes(),
        })
    }
}

/// What the probe needs from one complete response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Response {
    pub(super) status: u16,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub(super) version: &'static str,
    /// The server will close after this response: `Connection: close`, an HTTP/1.0 response
    /// without `Connection: keep-alive`, or a body delimited by the close itself.
    pub(super) close: bool,
    /// `Connection: close` was on the response (as opposed to a close implied otherwise).
    pub(super) said_close: bool,
    /// `Keep-Alive: timeout=N`.
    pub(super) hint_timeout: Option<u64>,
    /// `Keep-Alive: max=M`.
    pub(super) hint_max: Option<u64>,
    /// When the last byte of the response was read.
    pub(super) ended: Instant,
}

/// Why an exchange produced no complete response.
#[derive(Debug)]
pub(super) enum Failure {
    /// The server closed before sending a byte of the response (or the request could not be
    /// written): the connection was already gone.
    Closed(CloseKind),
    /// No complete response before the deadline.
    Timeout,
    /// The response was cut off or malformed, or another I/O error.
    Broken(String),
}

impl Failure {
    fn of_io(error: &io::Error) -> Failure {
        match close_kind(error) {
            Some(kind) => Failure::Closed(kind),
            None => Failure::Broken(error.to_string()),
        }
    }
}

/// What happened while a connection sat idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Idle {
    /// Nothing arrived before the deadline.
    Open,
    /// The server closed (or sent unsolicited bytes, then closed) at `at`. `kind` is `None`
    /// when the end was neither a clean FIN nor an RST (another error, or data without a close).
    Closed {
        at: Instant,
        kind: Option<CloseKind>,
    },
}

/// FIN or RST, from how a read or write failed; `None` for other errors.
fn close_kind(error: &io::Error) -> Option<CloseKind> {
    match error.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => Some(CloseKind::Rst),
        io::ErrorKind::UnexpectedEof => Some(CloseKind::Fin),
        _ => None,
    }
}

/// One probe connection.
pub(super) struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    pub(super) async fn open(target: &Target, limit: Duration) -> io::Result<Conn> {
        let stream = tokio::time::timeout(limit, TcpStream::connect(target.addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        // A small request must leave at once, or Nagle's algorithm blurs the timings.
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
        })
    }

    /// Sends one request and reads its response to the end, all within `limit`.
    pub(super) async fn exchange(
        &mut self,
        target: &Target,
        limit: Duration,
    ) -> Result<Response, Failure> {
        let deadline = Instant::now() + limit;
        tokio::time::timeout_at(deadline, self.exchange_inner(target))
            .await
            .unwrap_or(Err(Failure::Timeout))
    }

    async fn exchange_inner(&mut self, target: &Target) -> Result<Response, Failure> {
        self.stream
            .write_all(&target.request)
            .await
            .map_err(|e| Failure::of_io(&e))?;
        let head = self.read_head().await?;
        let close_delimited = match head.framing {
            Framing::Empty => false,
            Framing::Length(n) => {
                self.skip(n).await?;
                false
            }
            Framing::Chunked => {
                self.skip_chunked().await?;
                false
            }
            Framing::UntilClose => {
                self.skip_to_eof().await?;
                true
            }
        };
        Ok(Response {
            status: head.status,
            version: head.version,
            close: head.close || close_delimited,
            said_close: head.said_close,
            hint_timeout: head.hint_timeout,
            hint_max: head.hint_max,
            ended: Instant::now(),
        })
    }

    /// Waits until `deadline` for the server to close the idle connection.
    ///
    /// Cancel safe up to the first unsolicited byte: reading a closed or silent socket loses
    /// nothing.
    pub(super) async fn wait_idle(&mut self, deadline: Instant) -> Idle {
        if !self.buf.is_empty() {
            // Bytes beyond the last response: the server spoke first.
            let at = Instant::now();
            return Idle::Closed {
                at,
                kind: self.drain(at + DRAIN_AFTER_DATA).await,
            };
        }
        let mut byte = [0u8; 1];
        let read = match tokio::time::timeout_at(deadline, self.stream.read(&mut byte)).await {
            Err(_elapsed) => return Idle::Open,
            Ok(read) => read,
        };
        let at = Instant::now();
        let kind = match read {
            Ok(0) => Some(CloseKind::Fin),
            Ok(_) => self.drain(at + DRAIN_AFTER_DATA).await,
            Err(error) => close_kind(&error),
        };
        Idle::Closed { at, kind }
    }

    /// Reads and discards until the server closes or `until`; how it closed.
    async fn drain(&mut self, until: Instant) -> Option<CloseKind> {
        self.buf.clear();
        let mut scratch = [0u8; 1024];
        loop {
            match tokio::time::timeout_at(until, self.stream.read(&mut scratch)).await {
                Err(_elapsed) => return None,
                Ok(Ok(0)) => return Some(CloseKind::Fin),
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return close_kind(&error),
            }
        }
    }

    /// Reads more bytes into the buffer; EOF is an error, since callers expect more.
    async fn fill(&mut self) -> Result<(), Failure> {
        self.buf.reserve(READ_CHUNK);
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) => Err(Failure::Closed(CloseKind::Fin)),
            Ok(_) => Ok(()),
            Err(error) => Err(Failure::of_io(&error)),
        }
    }

    /// Reads one final response head, skipping interim 1xx responses.
    async fn read_head(&mut self) -> Result<Head, Failure> {
        for _ in 0..=MAX_INTERIM {
            let head = loop {
                if let Some((head, used)) = parse_head(&self.buf)? {
                    self.buf.advance(used);
                    break head;
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(Failure::Broken("response head too large".into()));
                }
                let started = !self.buf.is_empty();
                match self.fill().await {
                    Ok(()) => {}
                    // A close after part of the head is a cut-off response, not a closed idle
                    // connection.
                    Err(Failure::Closed(_)) if started => {
                        return Err(Failure::Broken("connection closed inside the head".into()));
                    }
                    Err(failure) => return Err(failure),
                }
            };
            if head.status == 101 {
                return Err(Failure::Broken(
                    "the server switched protocols (101)".into(),
                ));
            }
            if !(100..200).contains(&head.status) {
                return Ok(head);
            }
        }
        Err(Failure::Broken("too many interim (1xx) responses".into()))
    }

    async fn skip(&mut self, mut remaining: u64) -> Result<(), Failure> {
        // Bounded: every pass consumes at least one byte or fails.
        while remaining > 0 {
            if self.buf.is_empty() {
                self.fill().await.map_err(cut_off)?;
            }
            let n = usize::try_from(remaining).map_or(self.buf.len(), |r| r.min(self.buf.len()));
            self.buf.advance(n);
            remaining -= n as u64;
        }
        Ok(())
    }

    async fn read_line(&mut self) -> Result<BytesMut, Failure> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.split_to(end);
                self.buf.advance(2);
                return Ok(line);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(Failure::Broken("chunked framing line too long".into()));
            }
            self.fill().await.map_err(cut_off)?;
        }
    }

    async fn skip_chunked(&mut self) -> Result<(), Failure> {
        // Bounded by the bytes the server sends: every chunk consumes its line.
        loop {
            let line = self.read_line().await?;
            let size = line[..].split(|&b| b == b';').next().unwrap_or(&[]);
            let size = std::str::from_utf8(size)
                .ok()
                .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                .ok_or_else(|| Failure::Broken("bad chunk size".into()))?;
            if size == 0 {
                // Trailer fields, up to the empty line.
                for _ in 0..MAX_HEADERS {
                    if self.read_line().await?.is_empty() {
                        return Ok(());
                    }
                }
                return Err(Failure::Broken("too many trailer fields".into()));
            }
            self.skip(size).await?;
            if !self.read_line().await?.is_empty() {
                return Err(Failure::Broken("chunk not followed by CRLF".into()));
            }
        }
    }

    async fn skip_to_eof(&mut self) -> Result<(), Failure> {
        self.buf.clear();
        loop {
            match self.fill().await {
                Ok(()) => self.buf.clear(),
                Err(Failure::Closed(_)) => return Ok(()),
                Err(failure) => return Err(failure),
            }
        }
    }
}

/// A close in the middle of a body is a cut-off response.
fn cut_off(failure: Failure) -> Failure {
    match failure {
        Failure::Closed(kind) => Failure::Broken(format!("response cut off by {kind:?}")),
        other => other,
    }
}
