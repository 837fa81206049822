//! One client connection of the race: sends one request when told to, on its keep-alive
//! connection, and opens a fresh connection only when the previous one is known to be gone.

use std::error::Error as _;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, USER_AGENT};
use http::{HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{RaceError, TransportErrorKinds};
use crate::tools::target::{self, TargetError};

/// Length of every POST body: small enough to fit in the packet with the request head, so the
/// request leaves in one write, and fixed so that a test can check it arrived whole.
pub(super) const POST_BODY_LEN: usize = 32;

/// Sent on every request so that a proxy's access log shows where the traffic came from.
const USER_AGENT_VALUE: &str = concat!("kaguard-race/", env!("CARGO_PKG_VERSION"));

/// Where every client connection goes, resolved once before the race starts.
#[derive(Debug)]
pub(super) struct Target {
    addr: SocketAddr,
    host: HeaderValue,
    path: Uri,
}

impl Target {
    /// Checks that `uri` is something the race can send to: `http://host[:port][/path]`.
    pub(super) fn check(uri: &Uri) -> Result<(), &'static str> {
        target::check(uri)
    }

    /// Checks `uri` and resolves its host; the first address is used for every connection.
    pub(super) async fn resolve(uri: &Uri) -> Result<Target, RaceError> {
        let resolved = target::resolve(uri).await.map_err(|err| match err {
            TargetError::Bad(reason) => RaceError::Target {
                target: uri.to_string(),
                reason,
            },
            TargetError::Resolve(source) => RaceError::Connect {
                target: uri.to_string(),
                source,
            },
        })?;
        let host =
            HeaderValue::from_str(resolved.authority.as_str()).map_err(|_| RaceError::Target {
                target: uri.to_string(),
                reason: "the host is not a valid Host header",
            })?;
        Ok(Target {
            addr: resolved.addr,
            host,
            path: Uri::from(resolved.path),
        })
    }

    fn request(&self, method: http::Method, serial: u64) -> Request<Full<Bytes>> {
        let builder = Request::builder()
            .method(method.clone())
            .uri(self.path.clone())
            .header(HOST, self.host.clone())
            .header(USER_AGENT, USER_AGENT_VALUE);
        let request = if method == http::Method::POST {
            builder
                .header(CONTENT_TYPE, "application/json")
                .header(CONTENT_LENGTH, POST_BODY_LEN)
                .body(Full::new(post_body(serial)))
        } else {
            builder.body(Full::new(Bytes::new()))
        };
        request.expect("method, path and headers were all validated before the race")
    }
}

/// `{"n":SERIAL}` padded with spaces (valid JSON whitespace) to exactly [`POST_BODY_LEN`].
fn post_body(serial: u64) -> Bytes {
    // The longest u64 has 20 digits, so the JSON is at most 26 bytes: padding never truncates.
    let json = format!("{{\"n\":{serial}}}");
    Bytes::from(format!("{json:<POST_BODY_LEN$}"))
}

/// How one request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// A complete response (head and body), whatever its status.
    Response { status: u16, latency: Duration },
    /// No complete response: the connection failed or the request timed out.
    Transport(TransportKind),
}

/// Why a request got no complete response; the keys of `transport_error_kinds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TransportKind {
    /// RST from the peer, seen on read (ECONNRESET) or write (EPIPE).
    Reset,
    /// The peer closed (FIN) before the response was complete.
    Eof,
    /// No complete response within the request timeout.
    Timeout,
    Other,
}

impl TransportKind {
    pub(super) fn count(self, kinds: &mut TransportErrorKinds) {
        let slot = match self {
            TransportKind::Reset => &mut kinds.reset,
            TransportKind::Eof => &mut kinds.eof,
            TransportKind::Timeout => &mut kinds.timeout,
            TransportKind::Other => &mut kinds.other,
        };
        *slot += 1;
    }

    fn of_io(error: &io::Error) -> TransportKind {
        match error.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => TransportKind::Reset,
            io::ErrorKind::UnexpectedEof => TransportKind::Eof,
            io::ErrorKind::TimedOut => TransportKind::Timeout,
            _ => TransportKind::Other,
        }
    }

    /// Reads hyper's error kind and the `io::Error` beneath it, never the message text.
    fn of_hyper(error: &hyper::Error) -> TransportKind {
        if error.is_incomplete_message() {
            return TransportKind::Eof;
        }
        if error.is_timeout() {
            return TransportKind::Timeout;
        }
        let mut source = error.source();
        // A cause chain is a handful of links; the bound only guards against a cycle.
        for _ in 0..16 {
            let Some(cause) = source else { break };
            if let Some(io) = cause.downcast_ref::<io::Error>() {
                return TransportKind::of_io(io);
            }
            if let Some(inner) = cause.downcast_ref::<hyper::Error>()
                && inner.is_incomplete_message()
            {
                return TransportKind::Eof;
            }
            source = cause.source();
        }
        TransportKind::Other
    }
}

/// The result of [`Client::exchange`].
#[derive(Debug)]
pub(super) struct Exchange {
    pub(super) outcome: Outcome,
    /// TCP connections this exchange opened (0, 1, or 2 when hyper handed back a request it
    /// had not written and it went out on a second fresh connection).
    pub(super) opened: u64,
    /// When the response body ended or the failure was seen; the next pause starts here.
    pub(super) finished: Instant,
}

/// One client connection, reopened after a transport error or `Connection: close`.
pub(super) struct Client {
    /// Position among the K clients; offsets the GET/POST alternation of `--method mix`.
    pub(super) index: u64,
    /// Requests this client has sent so far.
    pub(super) sent: u64,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    /// Opens the client's first connection.
    pub(super) async fn open(index: u64, target: &Target) -> io::Result<Client> {
        Ok(Client {
            index,
            sent: 0,
            sender: Some(connect(target.addr).await?),
        })
    }

    /// Sends one request and reads its response to the end, within `limit`.
    ///
    /// Never retries a request that may have been written: a transport error is returned as
    /// the outcome and the connection is dropped, so the next exchange opens a fresh one.
    pub(super) async fn exchange(
        &mut self,
        target: &Target,
        method: http::Method,
        serial: u64,
        limit: Duration,
    ) -> Exchange {
        self.sent += 1;
        let mut opened = 0;
        let outcome =
            match tokio::time::timeout(limit, self.send(target, method, serial, &mut opened)).await
            {
                Ok(Ok(response)) => response,
                Ok(Err(kind)) => Outcome::Transport(kind),
                Err(_elapsed) => Outcome::Transport(TransportKind::Timeout),
            };
        if matches!(outcome, Outcome::Transport(_)) {
            // Dropping the sender closes the connection, also one with a request in flight.
            self.sender = None;
        }
        Exchange {
            outcome,
            opened,
            finished: Instant::now(),
        }
    }

    async fn send(
        &mut self,
        target: &Target,
        method: http::Method,
        serial: u64,
        opened: &mut u64,
    ) -> Result<Outcome, TransportKind> {
        let mut fresh = false;
        if !self.usable().await {
            self.sender = Some(
                connect(target.addr)
                    .await
                    .map_err(|e| TransportKind::of_io(&e))?,
            );
            *opened += 1;
            fresh = true;
        }
        let mut started = Instant::now();
        let sent = self
            .sender_mut()
            .try_send_request(target.request(method, serial))
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(mut failed) => match failed.take_message() {
                // hyper saw the connection close before writing a byte of this request, so it
                // never reached the target: sending it on a new connection is not a retry.
                // Once only, and only if the first connection was a reused one.
                Some(request) if !fresh => {
                    self.sender = Some(
                        connect(target.addr)
                            .await
                            .map_err(|e| TransportKind::of_io(&e))?,
                    );
                    *opened += 1;
                    started = Instant::now();
                    self.sender_mut()
                        .try_send_request(request)
                        .await
                        .map_err(|failed| TransportKind::of_hyper(failed.error()))?
                }
                _ => return Err(TransportKind::of_hyper(failed.error())),
            },
        };
        let status = response.status().as_u16();
        let close = response
            .headers()
            .get_all(CONNECTION)
            .iter()
            .any(|value| has_token(value, "close"));
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| TransportKind::of_hyper(&e))?;
        let latency = started.elapsed();
        if close {
            // Not an error: the server said so, and the next request goes on a new connection.
            self.sender = None;
        }
        Ok(Outcome::Response { status, latency })
    }

    /// True when the current connection can take a request: it exists, hyper has not seen it
    /// close, and the previous exchange on it is finished.
    async fn usable(&mut self) -> bool {
        match self.sender.as_mut() {
            Some(sender) if !sender.is_closed() => sender.ready().await.is_ok(),
            _ => false,
        }
    }

    fn sender_mut(&mut self) -> &mut SendRequest<Full<Bytes>> {
        self.sender
            .as_mut()
            .expect("send() opens a connection before using it")
    }
}

/// Opens a TCP connection and starts hyper's HTTP/1.1 client on it. The connection task ends
/// when its [`SendRequest`] is dropped or the peer closes.
async fn connect(addr: SocketAddr) -> io::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    // A small request must leave at the instant it is sent, or the sweep's 1 ms steps blur.
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "race client connection ended");
        }
    });
    Ok(sender)
}

/// True when the comma-separated header `value` contains `token`, ignoring ASCII case.
fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .any(|part| part.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}
