//! Server names to addresses, at run time.
//!
//! The proxy asks a [`Resolve`] again every `resolve_interval`, or when the record's TTL
//! runs out if the resolver reports one. [`System`] asks the operating system's resolver
//! (`/etc/hosts`, then DNS, as every program on the host does); tests and embedders pass
//! their own.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// A TTL never makes kaguard resolve more often than this: a TTL of 0 (common behind service
/// discovery) would otherwise turn the resolver task into a loop that asks the resolver
/// thousands of times a second. A `resolve_interval` below it is the user's own choice.
pub const MIN_TTL: Duration = Duration::from_secs(1);

/// A resolver that answers in this long is broken or unreachable; the servers keep their
/// addresses and the next round tries again.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// What a resolver said of one name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    /// Every address, port included.
    pub addrs: Vec<SocketAddr>,
    /// How long the answer may be kept, when the resolver says.
    pub ttl: Option<Duration>,
}

pub type Lookup<'a> = Pin<Box<dyn Future<Output = io::Result<Answer>> + Send + 'a>>;

/// Resolves a server name as written in the config, "host:port".
pub trait Resolve: Send + Sync + 'static {
    fn resolve<'a>(&'a self, name: &'a str) -> Lookup<'a>;
}

pub type Resolver = Arc<dyn Resolve>;

/// The operating system's resolver (getaddrinfo). It reports no TTL.
pub struct System;

impl Resolve for System {
    fn resolve<'a>(&'a self, name: &'a str) -> Lookup<'a> {
        Box::pin(async move {
            let mut addrs: Vec<SocketAddr> = Vec::new();
            for addr in tokio::net::lookup_host(name).await? {
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
            Ok(Answer { addrs, ttl: None })
        })
    }
}

/// How long to wait before the next round: the shortest TTL among the answers when any gave
/// one (at least [`MIN_TTL`]), else `interval`.
pub fn next_wait(interval: Duration, ttls: impl IntoIterator<Item = Option<Duration>>) -> Duration {
    ttls.into_iter()
        .flatten()
        .min()
        .map_or(interval, |ttl| ttl.max(MIN_TTL))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shortest_ttl_wins_over_the_interval_but_never_goes_below_the_floor() {
        let s = Duration::from_secs;
        assert_eq!(next_wait(s(5), [None, None]), s(5));
        assert_eq!(next_wait(s(5), [None, Some(s(30)), Some(s(2))]), s(2));
        assert_eq!(next_wait(s(5), [Some(Duration::ZERO)]), MIN_TTL);
        let short = Duration::from_millis(100);
        assert_eq!(next_wait(short, []), short);
    }

    #[tokio::test]
    async fn the_system_resolver_answers_for_an_ip_and_for_localhost() {
        let answer = System
            .resolve("127.0.0.1:8080")
            .await
            .expect("an IP resolves");
        assert_eq!(answer.addrs, [SocketAddr::from(([127, 0, 0, 1], 8080))]);
        let answer = System
            .resolve("localhost:8080")
            .await
            .expect("localhost resolves");
        assert!(
            answer
                .addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 8080)
        );
    }
}
