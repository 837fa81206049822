//! Servers given by name follow DNS: every `resolve_interval` (or the answer's TTL) each
//! name is resolved again, and [`Group::resolved`] drains the addresses that left and adds
//! the new ones.
//!
//! A failed or empty answer changes nothing: a resolver that is down for a moment must not
//! take every server out, so the addresses last seen keep taking requests.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::check;
use super::group::Group;
use crate::resolve::{self, Resolver};

/// Starts the resolver task of `group` if it has servers given by name and a
/// `resolve_interval`; it ends when the group is gone.
pub(super) fn spawn(group: &Arc<Group>, resolver: &Resolver) {
    let names = group.servers.names();
    if names.is_empty() || group.resolve_interval.is_zero() {
        return;
    }
    tokio::spawn(run(
        Arc::downgrade(group),
        names,
        resolver.clone(),
        group.resolve_interval,
    ));
}

async fn run(
    group: Weak<Group>,
    names: Vec<(usize, String)>,
    resolver: Resolver,
    interval: Duration,
) {
    let mut wait = interval;
    loop {
        tokio::time::sleep(wait).await;
        let mut ttls = Vec::with_capacity(names.len());
        for (entry, name) in &names {
            let answer = tokio::time::timeout(resolve::TIMEOUT, resolver.resolve(name)).await;
            let Some(g) = group.upgrade() else { return };
            match answer {
                Ok(Ok(answer)) if !answer.addrs.is_empty() => {
                    ttls.push(answer.ttl);
                    let update = g.resolved(*entry, &answer.addrs);
                    let added = update.added.iter().map(|&(server, _)| server);
                    for server in added.chain(update.relisted.iter().copied()) {
                        check::spawn_one(&g, server);
                    }
                }
                Ok(Ok(_)) => {
                    tracing::warn!(upstream = %g.name, "{name} resolved to no address; keeping the addresses it had");
                }
                Ok(Err(err)) => {
                    tracing::warn!(upstream = %g.name, "cannot resolve {name}: {err}; keeping the addresses it had");
                }
                Err(_) => {
                    tracing::warn!(upstream = %g.name, "no answer for {name} within {}; keeping the addresses it had", humantime::format_duration(resolve::TIMEOUT));
                }
            }
        }
        wait = resolve::next_wait(interval, ttls);
    }
}
