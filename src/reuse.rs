//! The one decision on whether an upstream connection may carry another request.
//!
//! A connection stays closed unless proven reusable: every early return names its reason,
//! and that reason reaches the metrics (`upstream_connections_closed_total{reason}`).

use std::time::Instant;

use crate::pool::{ConnMeta, Limits};

/// Why a connection was closed or not reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// `keepalive = 0`: every request gets its own connection.
    ReuseDisabled,
    /// The response body was not read to its end (client gone, error, timeout).
    ResponseIncomplete,
    /// The upstream said `Connection: close`, or answered HTTP/1.0 without keep-alive.
    UpstreamSaidClose,
    /// The connection carried `keepalive_requests` requests.
    RequestCap,
    /// The connection is older than `keepalive_time`.
    Lifetime,
    /// The connection sat idle for `keepalive_timeout`.
    IdleTimeout,
    /// The idle list was full; the least recently used connection made room.
    PoolFull,
    /// The upstream had closed the connection (FIN, RST or stray bytes) while it was idle.
    ClosedByUpstream,
    /// The exchange on the connection failed.
    Error,
    /// kaguard is shutting down.
    Shutdown,
}

impl Reason {
    pub const ALL: [Reason; 10] = [
        Reason::ReuseDisabled,
        Reason::ResponseIncomplete,
        Reason::UpstreamSaidClose,
        Reason::RequestCap,
        Reason::Lifetime,
        Reason::IdleTimeout,
        Reason::PoolFull,
        Reason::ClosedByUpstream,
        Reason::Error,
        Reason::Shutdown,
    ];

    /// The metric label; a contract pinned by tests.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ReuseDisabled => "reuse_disabled",
            Reason::ResponseIncomplete => "response_incomplete",
            Reason::UpstreamSaidClose => "upstream_said_close",
            Reason::RequestCap => "request_cap",
            Reason::Lifetime => "lifetime",
            Reason::IdleTimeout => "idle_timeout",
            Reason::PoolFull => "pool_full",
            Reason::ClosedByUpstream => "closed_by_upstream",
            Reason::Error => "error",
            Reason::Shutdown => "shutdown",
        }
    }

    pub fn index(self) -> usize {
        Reason::ALL
            .iter()
            .position(|r| *r == self)
            .expect("ALL lists every reason")
    }
}

/// What is known about the exchange that just ended on a connection.
#[derive(Clone, Copy, Debug)]
pub struct Returning {
    pub response_complete: bool,
    pub upstream_keep_alive: bool,
}

/// When the question is asked.
#[derive(Clone, Copy, Debug)]
pub enum Moment {
    /// A response just ended on the connection.
    Checkin(Returning),
    /// The connection has been idle in the pool since the given instant.
    Idle { since: Instant },
}

/// Decides whether `conn` may be (or stay) pooled for another request at `now`.
pub fn decide(
    conn: &ConnMeta,
    moment: Moment,
    limits: &Limits,
    now: Instant,
) -> Result<(), Reason> {
    if limits.keepalive == 0 {
        return Err(Reason::ReuseDisabled);
    }
    if let Moment::Checkin(returning) = moment {
        if !returning.response_complete {
            return Err(Reason::ResponseIncomplete);
        }
        if !returning.upstream_keep_alive {
            return Err(Reason::UpstreamSaidClose);
        }
    }
    if conn.requests >= limits.max_requests {
        return Err(Reason::RequestCap);
    }
    if now.saturating_duration_since(conn.created) >= limits.max_lifetime {
        return Err(Reason::Lifetime);
    }
    if let Moment::Idle { since } = moment
        && now.saturating_duration_since(since) >= limits.idle_timeout
    {
        return Err(Reason::IdleTimeout);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits() -> Limits {
        Limits {
            keepalive: 4,
            idle_timeout: Duration::from_millis(100),
            max_requests: 3,
            max_lifetime: Duration::from_secs(10),
        }
    }

    fn conn(now: Instant, requests: u64) -> ConnMeta {
        ConnMeta {
            id: 1,
            server: 0,
            created: now,
            requests,
        }
    }

    const DONE: Returning = Returning {
        response_complete: true,
        upstream_keep_alive: true,
    };

    #[test]
    fn complete_keep_alive_exchange_is_reusable() {
        let now = Instant::now();
        assert_eq!(
            decide(&conn(now, 1), Moment::Checkin(DONE), &limits(), now),
            Ok(())
        );
    }

    #[test]
    fn every_no_has_its_reason() {
        let now = Instant::now();
        let l = limits();
        let unread = Returning {
            response_complete: false,
            ..DONE
        };
        let close = Returning {
            upstream_keep_alive: false,
            ..DONE
        };
        assert_eq!(
            decide(&conn(now, 1), Moment::Checkin(unread), &l, now),
            Err(Reason::ResponseIncomplete)
        );
        assert_eq!(
            decide(&conn(now, 1), Moment::Checkin(close), &l, now),
            Err(Reason::UpstreamSaidClose)
        );
        assert_eq!(
            decide(&conn(now, 3), Moment::Checkin(DONE), &l, now),
            Err(Reason::RequestCap)
        );
        let later = now + Duration::from_secs(10);
        assert_eq!(
            decide(&conn(now, 1), Moment::Checkin(DONE), &l, later),
            Err(Reason::Lifetime)
        );
        let idle = Moment::Idle { since: now };
        assert_eq!(
            decide(&conn(now, 1), idle, &l, now + Duration::from_millis(100)),
            Err(Reason::IdleTimeout)
        );
        assert_eq!(
            decide(&conn(now, 1), idle, &l, now + Duration::from_millis(99)),
            Ok(())
        );
        let off = Limits { keepalive: 0, ..l };
        assert_eq!(
            decide(&conn(now, 1), Moment::Checkin(DONE), &off, now),
            Err(Reason::ReuseDisabled)
        );
    }

    #[test]
    fn reason_labels_are_stable() {
        let labels: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "reuse_disabled",
                "response_incomplete",
                "upstream_said_close",
                "request_cap",
                "lifetime",
                "idle_timeout",
                "pool_full",
                "closed_by_upstream",
                "error",
                "shutdown"
            ]
        );
    }
}
