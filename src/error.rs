//! Failures of one upstream exchange, typed by how far the exchange got.
//!
//! The status code, the Envoy-style response flag and the nginx-style log text all derive
//! from the variant, never from an error's text, so that the retry decision (which reads the
//! same variants) and what the operator sees can never disagree.

use std::io;
use std::time::Duration;

use http::StatusCode;

/// How an upstream connection failed at the transport level, as far as we can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The upstream closed its side (FIN) without a complete response.
    Eof,
    /// The upstream reset the connection (RST).
    Reset,
    /// Any other I/O or protocol error.
    Other,
}

impl Transport {
    pub fn from_io(err: &io::Error) -> Transport {
        match err.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Transport::Reset,
            io::ErrorKind::UnexpectedEof => Transport::Eof,
            _ => Transport::Other,
        }
    }
}

/// A failed attempt to get a response head from an upstream server.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Every server of the group is out (max_fails or health checks): nothing was sent.
    #[error("no live upstreams while connecting to upstream")]
    NoLiveUpstream,
    /// The TCP connect failed: nothing was sent.
    #[error("connect() failed ({}: {}) while connecting to upstream", errno(.0), os_text(.0))]
    Connect(io::Error),
    /// The TCP connect did not finish in time: nothing was sent.
    #[error("upstream timed out (110: Connection timed out) while connecting to upstream")]
    ConnectTimeout(Duration),
    /// The connection was found closed before any byte of the request was written.
    #[error("upstream connection was closed before the request was sent")]
    NotSent { reused: bool },
    /// Some or all of the request was written, and no byte of a response arrived.
    #[error("{}", no_response_text(*.transport))]
    NoResponse { reused: bool, transport: Transport },
    /// The upstream stopped taking the request body for longer than `send_timeout`.
    #[error("upstream timed out (110: Connection timed out) while sending request to upstream")]
    SendTimeout(Duration),
    /// The upstream went quiet for longer than `read_timeout` before the response head.
    #[error(
        "upstream timed out (110: Connection timed out) while reading response header from upstream"
    )]
    ReadTimeout(Duration),
    /// The upstream sent bytes that are not a valid HTTP/1 response head.
    #[error("upstream sent invalid header while reading response header from upstream")]
    InvalidResponse,
    /// The downstream request body failed while it was being forwarded.
    #[error("client request body failed: {0}")]
    RequestBody(#[source] crate::proxy::body::BodyError),
}

fn errno(err: &io::Error) -> i32 {
    err.raw_os_error().unwrap_or(0)
}

/// The strerror-like text without Rust's "(os error N)" suffix, since the errno is printed
/// in front as nginx does.
fn os_text(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

fn no_response_text(transport: Transport) -> &'static str {
    match transport {
        Transport::Eof => {
            "upstream prematurely closed connection while reading response header from upstream"
        }
        Transport::Reset => {
            "recv() failed (104: Connection reset by peer) while reading response header from upstream"
        }
        Transport::Other => "upstream failed while reading response header from upstream",
    }
}

impl Failure {
    /// The status a client gets when this failure is final.
    pub fn status(&self) -> StatusCode {
        match self {
            Failure::ConnectTimeout(_) | Failure::SendTimeout(_) | Failure::ReadTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Failure::RequestBody(err) => err.status(),
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// Envoy's response flag for this failure.
    pub fn flag(&self) -> &'static str {
        match self {
            Failure::Connect(_) | Failure::ConnectTimeout(_) => "UF",
            Failure::NoLiveUpstream => "UH",
            Failure::NotSent { .. } | Failure::NoResponse { .. } | Failure::InvalidResponse => "UC",
            Failure::SendTimeout(_) | Failure::ReadTimeout(_) => "UT",
            Failure::RequestBody(_) => "DC",
        }
    }

    /// Envoy's response details string for this failure.
    pub fn details(&self) -> &'static str {
        match self {
            Failure::Connect(_) => "upstream_reset_before_response_started{connection_failure}",
            Failure::NoLiveUpstream => "no_healthy_upstream",
            Failure::ConnectTimeout(_) => {
                "upstream_reset_before_response_started{connection_timeout}"
            }
            Failure::NotSent { .. }
            | Failure::NoResponse {
                transport: Transport::Eof,
                ..
            } => "upstream_reset_before_response_started{connection_termination}",
            Failure::NoResponse {
                transport: Transport::Reset,
                ..
            } => "upstream_reset_before_response_started{remote_reset}",
            Failure::NoResponse {
                transport: Transport::Other,
                ..
            } => "upstream_reset_before_response_started{protocol_error}",
            Failure::ReadTimeout(_) => "upstream_response_timeout",
            Failure::SendTimeout(_) => "upstream_request_send_timeout",
            Failure::InvalidResponse => "upstream_reset_before_response_started{protocol_error}",
            Failure::RequestBody(err) => err.details(),
        }
    }

    /// Whether the failure is the server's own and counts toward `max_fails`. A race on a
    /// reused connection is not (the server closed an idle connection, as it may), nor is a
    /// request that never left kaguard, nor the client's body.
    pub fn is_server_fault(&self) -> bool {
        matches!(
            self,
            Failure::Connect(_)
                | Failure::ConnectTimeout(_)
                | Failure::SendTimeout(_)
                | Failure::ReadTimeout(_)
                | Failure::InvalidResponse
                | Failure::NoResponse { reused: false, .. }
        )
    }

    /// Whether the upstream application cannot have seen the request.
    pub fn never_reached_upstream(&self) -> bool {
        matches!(
            self,
            Failure::NoLiveUpstream
                | Failure::Connect(_)
                | Failure::ConnectTimeout(_)
                | Failure::NotSent { .. }
        )
    }

    /// Whether the failure happened on a connection taken from the pool.
    pub fn on_reused(&self) -> bool {
        matches!(
            self,
            Failure::NotSent { reused: true } | Failure::NoResponse { reused: true, .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_refused_reads_like_nginx_and_is_502() {
        let err = io::Error::from_raw_os_error(111);
        let failure = Failure::Connect(err);
        assert_eq!(failure.status(), StatusCode::BAD_GATEWAY);
        assert!(
            failure
                .to_string()
                .starts_with("connect() failed (111: Connection refused) while"),
            "{failure}"
        );
        assert_eq!(failure.flag(), "UF");
    }

    #[test]
    fn premature_close_reads_like_nginx_and_envoy() {
        let failure = Failure::NoResponse {
            reused: true,
            transport: Transport::Eof,
        };
        assert_eq!(
            failure.to_string(),
            "upstream prematurely closed connection while reading response header from upstream"
        );
        assert_eq!(
            failure.details(),
            "upstream_reset_before_response_started{connection_termination}"
        );
        assert_eq!(failure.flag(), "UC");
        assert!(failure.on_reused());
    }

    #[test]
    fn races_and_unsent_requests_are_not_the_servers_fault() {
        assert!(
            !Failure::NoResponse {
                reused: true,
                transport: Transport::Reset
            }
            .is_server_fault()
        );
        assert!(!Failure::NotSent { reused: true }.is_server_fault());
        assert!(
            Failure::NoResponse {
                reused: false,
                transport: Transport::Reset
            }
            .is_server_fault()
        );
        assert!(Failure::Connect(io::Error::from_raw_os_error(111)).is_server_fault());
        assert!(Failure::NotSent { reused: false }.never_reached_upstream());
        assert!(
            !Failure::NoResponse {
                reused: false,
                transport: Transport::Eof
            }
            .never_reached_upstream()
        );
    }

    #[test]
    fn timeouts_are_504() {
        assert_eq!(
            Failure::ConnectTimeout(Duration::from_secs(1)).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            Failure::ReadTimeout(Duration::from_secs(1)).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(Failure::ReadTimeout(Duration::from_secs(1)).flag(), "UT");
    }
}
