//! Host and path prefix -> upstream group, decided per request without allocating.
//!
//! Rules, nginx-like (see docs/config.md): routes for the request's host win over host-less
//! routes; among either, the longest matching `path_prefix` wins; a prefix matches on a
//! path-segment boundary. With no routes and one group, that group takes everything.

use std::collections::HashMap;

use crate::config::{Config, RetryPolicy};

/// Longest host we look up; DNS names are at most 253 characters, so a longer Host header
/// cannot equal any configured host. Bounds the stack buffer used to lowercase it.
const MAX_HOST_LEN: usize = 256;

/// Chooses the upstream group and retry policy for a request.
#[derive(Debug, Clone)]
pub struct Router {
    /// Lowercased host -> its prefixes, longest first.
    by_host: HashMap<Box<str>, Vec<Prefix>>,
    /// Routes without a host, longest prefix first.
    any_host: Vec<Prefix>,
    /// The group that takes every request when there are no routes and exactly one group,
    /// with `Config::retry`.
    only_group: Option<Target>,
    /// Every route's retry policy, then `Config::retry`. A [`Target`] names its policy by
    /// place, so that what a request keeps of its route borrows nothing from the router.
    policies: Vec<RetryPolicy>,
}

#[derive(Debug, Clone)]
struct Prefix {
    prefix: Box<str>,
    upstream: usize,
    policy: usize,
}

/// Where a request goes, and how it is retried there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Index into `Config::upstreams`.
    pub group: usize,
    /// The matched route's policy, or `Config::retry` when there are no routes: its place
    /// in the router's ([`Router::policy`]).
    policy: usize,
}

impl Router {
    /// Builds the lookup tables; a route naming a group not in `config.upstreams` is ignored,
    /// which only hand-built routes can do (config validation rejects them).
    pub fn new(config: &Config) -> Router {
        let groups = &config.upstreams;
        let mut by_host: HashMap<Box<str>, Vec<Prefix>> = HashMap::new();
        let mut any_host = Vec::new();
        let mut policies = Vec::with_capacity(config.routes.len() + 1);
        for route in &config.routes {
            let Some(upstream) = groups.iter().position(|g| g.name == route.upstream) else {
                continue;
            };
            let prefix = Prefix {
                prefix: route.path_prefix.as_str().into(),
                upstream,
                policy: policies.len(),
            };
            policies.push(route.retry.clone());
            match &route.host {
                Some(host) => by_host
                    .entry(normalize_host(host).to_ascii_lowercase().into())
                    .or_default()
                    .push(prefix),
                None => any_host.push(prefix),
            }
        }
        for prefixes in by_host.values_mut().chain(std::iter::once(&mut any_host)) {
            // Stable, so of two equal routes the first in the file wins, as validation would
            // have demanded.
            prefixes.sort_by_key(|p| std::cmp::Reverse(p.prefix.len()));
        }
        let only_group = (config.routes.is_empty() && groups.len() == 1).then_some(Target {
            group: 0,
            policy: policies.len(),
        });
        policies.push(config.retry.clone());
        Router {
            by_host,
            any_host,
            only_group,
            policies,
        }
    }

    /// The retry policy of a target this router found.
    pub fn policy(&self, target: Target) -> &RetryPolicy {
        &self.policies[target.policy]
    }

    /// The group and retry policy for this request, or `None` (the proxy answers 404).
    ///
    /// `host` is the Host header or the URI authority as received: any case, maybe with a
    /// port. `path` may still carry its query.
    pub fn find(&self, host: Option<&[u8]>, path: &str) -> Option<Target> {
        // The host is read as text only where hosts route: most configs route by path alone.
        if !self.by_host.is_empty()
            && let Some(host) = host.and_then(|h| std::str::from_utf8(h).ok())
        {
            let mut buf = [0u8; MAX_HOST_LEN];
            if let Some(host) = lowercase(normalize_host(host), &mut buf)
                && let Some(prefixes) = self.by_host.get(host)
                && let Some(target) = longest_match(prefixes, path)
            {
                return Some(target);
            }
        }
        longest_match(&self.any_host, path).or(self.only_group)
    }
}

fn longest_match(prefixes: &[Prefix], path: &str) -> Option<Target> {
    prefixes
        .iter()
        .find(|p| prefix_matches(&p.prefix, path))
        .map(|p| Target {
            group: p.upstream,
            policy: p.policy,
        })
}

/// "/api" matches "/api", "/api/x" and "/api?q" but not "/apix"; "/" matches everything.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?']),
    }
}

/// Drops the port and one trailing dot: "Example.com.:8080" -> "Example.com".
fn normalize_host(host: &str) -> &str {
    let host = if host.starts_with('[') {
        // IPv6 literal: the port, if any, follows the bracket.
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.split_once(':').map_or(host, |(name, _port)| name)
    };
    host.strip_suffix('.').unwrap_or(host)
}

/// ASCII-lowercases `host` into `buf`; `None` if it is too long to be a configured host.
fn lowercase<'b>(host: &str, buf: &'b mut [u8; MAX_HOST_LEN]) -> Option<&'b str> {
    let out = buf.get_mut(..host.len())?;
    out.copy_from_slice(host.as_bytes());
    out.make_ascii_lowercase();
    // Changing only ASCII bytes keeps valid UTF-8 valid, so this never fails.
    std::str::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{AccessLog, DownstreamConfig, RouteConfig, UpstreamGroupConfig};

    /// A config with these routes and groups and every other setting at its default.
    fn config(routes: &[RouteConfig], groups: &[&str]) -> Config {
        Config {
            listen: Vec::new(),
            workers: 1,
            drain_timeout: Duration::ZERO,
            downstream: DownstreamConfig::default(),
            upstreams: groups
                .iter()
                .map(|name| UpstreamGroupConfig::with_defaults(*name, Vec::new()))
                .collect(),
            routes: routes.to_vec(),
            retry: RetryPolicy::default(),
            access_log: AccessLog::Off,
            admin: None,
        }
    }

    fn route(host: Option<&str>, path_prefix: &str, upstream: &str) -> RouteConfig {
        RouteConfig {
            host: host.map(str::to_owned),
            path_prefix: path_prefix.to_owned(),
            upstream: upstream.to_owned(),
            retry: RetryPolicy::default(),
        }
    }

    fn with_attempts(mut route: RouteConfig, attempts: u32) -> RouteConfig {
        route.retry.attempts = attempts;
        route
    }

    /// Groups a, b, c, d at indexes 0..4.
    fn router(routes: &[RouteConfig]) -> Router {
        Router::new(&config(routes, &["a", "b", "c", "d"]))
    }

    /// The group index `router` picks.
    fn find(router: &Router, host: Option<&str>, path: &str) -> Option<usize> {
        router
            .find(host.map(str::as_bytes), path)
            .map(|target| target.group)
    }

    #[test]
    fn no_routes_and_one_group_sends_everything_to_it() {
        let router = Router::new(&config(&[], &["only"]));
        assert_eq!(find(&router, None, "/"), Some(0));
        assert_eq!(find(&router, Some("any.host"), "/x/y?z"), Some(0));
        assert_eq!(find(&router, None, "*"), Some(0));
    }

    #[test]
    fn no_routes_and_two_groups_matches_nothing() {
        let router = Router::new(&config(&[], &["a", "b"]));
        assert_eq!(find(&router, Some("x"), "/"), None);
    }

    #[test]
    fn prefix_matches_exactly_or_on_a_segment_boundary() {
        let router = router(&[route(None, "/api", "a")]);
        assert_eq!(find(&router, None, "/api"), Some(0));
        assert_eq!(find(&router, None, "/api/x"), Some(0));
        assert_eq!(find(&router, None, "/api?q=1"), Some(0));
        assert_eq!(find(&router, None, "/apix"), None);
        assert_eq!(find(&router, None, "/ap"), None);
        assert_eq!(find(&router, None, "/"), None);
    }

    #[test]
    fn prefix_ending_in_slash_matches_below_it_but_not_without_the_slash() {
        let router = router(&[route(None, "/static/", "a")]);
        assert_eq!(find(&router, None, "/static/app.js"), Some(0));
        assert_eq!(find(&router, None, "/static/"), Some(0));
        assert_eq!(find(&router, None, "/static"), None);
    }

    #[test]
    fn root_prefix_matches_every_path() {
        let router = router(&[route(None, "/", "a")]);
        for path in ["/", "/x", "/x/y?z", "*"] {
            assert_eq!(find(&router, None, path), Some(0), "{path}");
        }
    }

    #[test]
    fn longest_prefix_wins_whatever_the_file_order() {
        let router = router(&[
            route(None, "/", "a"),
            route(None, "/api/v2", "c"),
            route(None, "/api", "b"),
        ]);
        assert_eq!(find(&router, None, "/"), Some(0));
        assert_eq!(find(&router, None, "/apiv2"), Some(0));
        assert_eq!(find(&router, None, "/api/v1"), Some(1));
        assert_eq!(find(&router, None, "/api/v2/users"), Some(2));
    }

    #[test]
    fn host_route_wins_over_a_longer_host_less_route() {
        let router = router(&[
            route(None, "/api/v1", "a"),
            route(Some("api.example.com"), "/", "b"),
        ]);
        assert_eq!(find(&router, Some("api.example.com"), "/api/v1/x"), Some(1));
        assert_eq!(find(&router, Some("www.example.com"), "/api/v1/x"), Some(0));
        assert_eq!(find(&router, None, "/api/v1/x"), Some(0));
    }

    #[test]
    fn host_without_a_matching_prefix_falls_back_to_host_less_routes() {
        let router = router(&[
            route(Some("api.example.com"), "/v1", "b"),
            route(None, "/", "a"),
        ]);
        assert_eq!(find(&router, Some("api.example.com"), "/v1/x"), Some(1));
        assert_eq!(find(&router, Some("api.example.com"), "/other"), Some(0));
    }

    #[test]
    fn host_matches_in_any_case_with_or_without_port_and_trailing_dot() {
        let router = router(&[route(Some("api.example.com"), "/", "b")]);
        for host in [
            "api.example.com",
            "API.Example.COM",
            "api.example.com:8080",
            "api.example.com.",
            "Api.Example.Com.:443",
        ] {
            assert_eq!(find(&router, Some(host), "/"), Some(1), "{host}");
        }
        assert_eq!(find(&router, Some("example.com"), "/"), None);
        assert_eq!(find(&router, None, "/"), None);
    }

    #[test]
    fn ipv6_host_matches_with_and_without_port() {
        let router = router(&[route(Some("[::1]"), "/", "c")]);
        assert_eq!(find(&router, Some("[::1]"), "/"), Some(2));
        assert_eq!(find(&router, Some("[::1]:8080"), "/"), Some(2));
    }

    #[test]
    fn overlong_or_non_ascii_host_does_not_panic_and_uses_host_less_routes() {
        let router = router(&[route(Some("a.example"), "/", "b"), route(None, "/", "a")]);
        let long = "a".repeat(MAX_HOST_LEN + 1);
        assert_eq!(find(&router, Some(&long), "/"), Some(0));
        assert_eq!(find(&router, Some("bücher.example"), "/"), Some(0));
        assert_eq!(find(&router, Some(""), "/"), Some(0));
    }

    #[test]
    fn route_to_an_unknown_group_is_ignored() {
        let router = router(&[route(None, "/", "nope")]);
        assert_eq!(find(&router, None, "/"), None);
    }

    #[test]
    fn no_routes_and_one_group_uses_the_top_level_retry_policy() {
        let mut config = config(&[], &["only"]);
        config.retry.attempts = 5;
        let router = Router::new(&config);
        let target = router
            .find(None, "/")
            .expect("the only group takes everything");
        assert_eq!(router.policy(target), &config.retry);
    }

    #[test]
    fn matched_route_brings_its_own_retry_policy() {
        let router = router(&[
            with_attempts(route(None, "/", "a"), 1),
            with_attempts(route(None, "/api", "b"), 3),
            with_attempts(route(Some("api.example.com"), "/", "c"), 4),
        ]);
        let attempts = |host: Option<&[u8]>, path| {
            router
                .find(host, path)
                .map(|t| (t.group, router.policy(t).attempts))
        };
        assert_eq!(attempts(None, "/x"), Some((0, 1)));
        assert_eq!(attempts(None, "/api/x"), Some((1, 3)));
        assert_eq!(attempts(Some(b"API.example.com"), "/api/x"), Some((2, 4)));
    }
}
