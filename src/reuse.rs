//! The one decision on whether an upstream connection may carry another request.
//!
//! A connection stays closed unless proven reusable: every early return names its reason,
//! and that reason reaches the metrics (`upstream_connections_closed_total{reason}`).

use std::time::{Duration, Instant};

use crate::pool::ConnMeta;

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
    /// The connection reached the idle budget the upstream's hint or its learned idle timeout
    /// set below `keepalive_timeout`: kaguard closed it before the upstream would.
    IdleBudget,
    /// The connection carried as many requests as the upstream's hint or its learned cap allow.
    RequestBudget,
    /// The idle list was full; the least recently used connection made room.
    PoolFull,
    /// The upstream had closed the connection (FIN, RST or stray bytes) while it was idle,
    /// or closed it (FIN or RST) by the time its response ended.
    ClosedByUpstream,
    /// The exchange on the connection failed.
    Error,
    /// kaguard is shutting down.
    Shutdown,
    /// The server's address left its name's DNS answer: the connection is drained.
    ServerRemoved,
}

impl Reason {
    pub const ALL: [Reason; 13] = [
        Reason::ReuseDisabled,
        Reason::ResponseIncomplete,
        Reason::UpstreamSaidClose,
        Reason::RequestCap,
        Reason::Lifetime,
        Reason::IdleTimeout,
        Reason::IdleBudget,
        Reason::RequestBudget,
        Reason::PoolFull,
        Reason::ClosedByUpstream,
        Reason::Error,
        Reason::Shutdown,
        Reason::ServerRemoved,
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
            Reason::IdleBudget => "idle_budget",
            Reason::RequestBudget => "request_budget",
            Reason::PoolFull => "pool_full",
            Reason::ClosedByUpstream => "closed_by_upstream",
            Reason::Error => "error",
            Reason::Shutdown => "shutdown",
            Reason::ServerRemoved => "server_removed",
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
    /// A FIN or RST had arrived by the time the response ended.
    pub upstream_closed: bool,
    /// The server left DNS while the request was out.
    pub server_removed: bool,
}

/// When the question is asked.
#[derive(Clone, Copy, Debug)]
pub enum Moment {
    /// A response just ended on the connection.
    Checkin(Returning),
    /// The connection has been idle in the pool since the given instant.
    Idle { since: Instant },
}

/// The limits that apply to one connection at one moment: the configured ones, lowered by
/// the upstream's hints and by what was learned about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// `keepalive > 0`.
    pub reuse: bool,
    pub idle: Duration,
    /// `idle` comes from a hint or from learning, not from `keepalive_timeout`.
    pub idle_lowered: bool,
    pub max_requests: u64,
    /// `max_requests` comes from a hint or from learning, not from `keepalive_requests`.
    pub requests_lowered: bool,
    pub max_lifetime: Duration,
}

/// Decides whether `conn` may be (or stay) pooled for another request at `now`.
pub fn decide(
    conn: &ConnMeta,
    moment: Moment,
    budget: &Budget,
    now: Instant,
) -> Result<(), Reason> {
    if !budget.reuse {
        return Err(Reason::ReuseDisabled);
    }
    if let Moment::Checkin(returning) = moment {
        if !returning.response_complete {
            return Err(Reason::ResponseIncomplete);
        }
        if !returning.upstream_keep_alive {
            return Err(Reason::UpstreamSaidClose);
        }
        if returning.upstream_closed {
            return Err(Reason::ClosedByUpstream);
        }
        if returning.server_removed {
            return Err(Reason::ServerRemoved);
        }
    }
    if conn.requests >= budget.max_requests {
        return Err(if budget.requests_lowered {
            Reason::RequestBudget
        } else {
            Reason::RequestCap
        });
    }
    if now.saturating_duration_since(conn.created) >= budget.max_lifetime {
        return Err(Reason::Lifetime);
    }
    if let Moment::Idle { since } = moment
        && now.saturating_duration_since(since) >= budget.idle
    {
        return Err(if budget.idle_lowered {
            Reason::IdleBudget
        } else {
            Reason::IdleTimeout
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Budget {
        Budget {
            reuse: true,
            idle: Duration::from_millis(100),
            idle_lowered: false,
            max_requests: 3,
            requests_lowered: false,
            max_lifetime: Duration::from_secs(10),
        }
    }

    fn conn(now: Instant, requests: u64) -> ConnMeta {
        ConnMeta {
            requests,
            ..ConnMeta::new(1, 0, now)
        }
    }

    const DONE: Returning = Returning {
        response_complete: true,
        upstream_keep_alive: true,
        upstream_closed: false,
        server_removed: false,
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
        let closed = Returning {
            upstream_closed: true,
            ..DONE
        };
        assert_eq!(
            decide(&conn(now, 1), Moment::Checkin(closed), &l, now),
            Err(Reason::ClosedByUpstream)
        );
        let removed = Returning {
            server_removed: true,
            ..DONE
        };
        assert_eq!(
            decide(&conn(now, 1), Moment::Checkin(removed), &l, now),
            Err(Reason::ServerRemoved)
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
        let lowered = Budget {
            idle_lowered: true,
            requests_lowered: true,
            ..l
        };
        assert_eq!(
            decide(&conn(now, 3), Moment::Checkin(DONE), &lowered, now),
            Err(Reason::RequestBudget)
        );
        let late = now + Duration::from_millis(100);
        assert_eq!(
            decide(&conn(now, 1), idle, &lowered, late),
            Err(Reason::IdleBudget)
        );
        let off = Budget { reuse: false, ..l };
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
                "idle_budget",
                "request_budget",
                "pool_full",
                "closed_by_upstream",
                "error",
                "shutdown",
                "server_removed",
            ]
        );
    }
}
