//! Host and path prefix -> upstream group, decided per request without allocating.
//!
//! Rules, nginx-like (see docs/config.md): routes for the request's host win over host-less
//! routes; among either, the longest matching `path_prefix` wins; a prefix matches on a
//! path-segment boundary. With no routes and one group, that group takes everything.

use std::collections::HashMap;

use crate::config::{RouteConfig, UpstreamGroupConfig};

/// Longest host we look up; DNS names are at most 253 characters, so a longer Host header
/// cannot equal any configured host. Bounds the stack buffer used to lowercase it.
const MAX_HOST_LEN: usize = 256;

/// Chooses the upstream group for a request.
#[derive(Debug, Clone)]
pub struct Router {
    /// Lowercased host -> its prefixes, longest first.
    by_host: HashMap<Box<str>, Vec<Prefix>>,
    /// Routes without a host, longest prefix first.
    any_host: Vec<Prefix>,
    /// The group that takes every request when there are no routes and exactly one group.
    only_group: Option<usize>,
}

#[derive(Debug, Clone)]
struct Prefix {
    prefix: Box<str>,
    upstream: usize,
}

impl Router {
    /// Builds the lookup tables; a route naming a group not in `groups` is ignored, which
    /// only hand-built routes can do (config validation rejects them).
    pub fn new(routes: &[RouteConfig], groups: &[UpstreamGroupConfig]) -> Router {
        let mut by_host: HashMap<Box<str>, Vec<Prefix>> = HashMap::new();
        let mut any_host = Vec::new();
        for route in routes {
            let Some(upstream) = groups.iter().position(|g| g.name == route.upstream) else {
                continue;
            };
            let prefix = Prefix {
                prefix: route.path_prefix.as_str().into(),
                upstream,
            };
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
        let only_group = (routes.is_empty() && groups.len() == 1).then_some(0);
        Router {
            by_host,
            any_host,
            only_group,
        }
    }

    /// The index into `Config::upstreams` for this request, or `None` (the proxy answers 404).
    ///
    /// `host` is the Host header or the URI authority as received: any case, maybe with a
    /// port. `path` may still carry its query.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<usize> {
        if let Some(host) = host
            && !self.by_host.is_empty()
        {
            let mut buf = [0u8; MAX_HOST_LEN];
            if let Some(host) = lowercase(normalize_host(host), &mut buf)
                && let Some(prefixes) = self.by_host.get(host)
                && let Some(upstream) = longest_match(prefixes, path)
            {
                return Some(upstream);
            }
        }
        longest_match(&self.any_host, path).or(self.only_group)
    }
}

fn longest_match(prefixes: &[Prefix], path: &str) -> Option<usize> {
    prefixes
        .iter()
        .find(|p| prefix_matches(&p.prefix, path))
        .map(|p| p.upstream)
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
    use super::*;

    fn group(name: &str) -> UpstreamGroupConfig {
        UpstreamGroupConfig::with_defaults(name, Vec::new())
    }

    fn route(host: Option<&str>, path_prefix: &str, upstream: &str) -> RouteConfig {
        RouteConfig {
            host: host.map(str::to_owned),
            path_prefix: path_prefix.to_owned(),
            upstream: upstream.to_owned(),
        }
    }

    /// Groups a, b, c, d at indexes 0..4.
    fn router(routes: &[RouteConfig]) -> Router {
        Router::new(routes, &[group("a"), group("b"), group("c"), group("d")])
    }

    #[test]
    fn no_routes_and_one_group_sends_everything_to_it() {
        let router = Router::new(&[], &[group("only")]);
        assert_eq!(router.find(None, "/"), Some(0));
        assert_eq!(router.find(Some("any.host"), "/x/y?z"), Some(0));
        assert_eq!(router.find(None, "*"), Some(0));
    }

    #[test]
    fn no_routes_and_two_groups_matches_nothing() {
        let router = Router::new(&[], &[group("a"), group("b")]);
        assert_eq!(router.find(Some("x"), "/"), None);
    }

    #[test]
    fn prefix_matches_exactly_or_on_a_segment_boundary() {
        let router = router(&[route(None, "/api", "a")]);
        assert_eq!(router.find(None, "/api"), Some(0));
        assert_eq!(router.find(None, "/api/x"), Some(0));
        assert_eq!(router.find(None, "/api?q=1"), Some(0));
        assert_eq!(router.find(None, "/apix"), None);
        assert_eq!(router.find(None, "/ap"), None);
        assert_eq!(router.find(None, "/"), None);
    }

    #[test]
    fn prefix_ending_in_slash_matches_below_it_but_not_without_the_slash() {
        let router = router(&[route(None, "/static/", "a")]);
        assert_eq!(router.find(None, "/static/app.js"), Some(0));
        assert_eq!(router.find(None, "/static/"), Some(0));
        assert_eq!(router.find(None, "/static"), None);
    }

    #[test]
    fn root_prefix_matches_every_path() {
        let router = router(&[route(None, "/", "a")]);
        for path in ["/", "/x", "/x/y?z", "*"] {
            assert_eq!(router.find(None, path), Some(0), "{path}");
        }
    }

    #[test]
    fn longest_prefix_wins_whatever_the_file_order() {
        let router = router(&[
            route(None, "/", "a"),
            route(None, "/api/v2", "c"),
            route(None, "/api", "b"),
        ]);
        assert_eq!(router.find(None, "/"), Some(0));
        assert_eq!(router.find(None, "/apiv2"), Some(0));
        assert_eq!(router.find(None, "/api/v1"), Some(1));
        assert_eq!(router.find(None, "/api/v2/users"), Some(2));
    }

    #[test]
    fn host_route_wins_over_a_longer_host_less_route() {
        let router = router(&[
            route(None, "/api/v1", "a"),
            route(Some("api.example.com"), "/", "b"),
        ]);
        assert_eq!(router.find(Some("api.example.com"), "/api/v1/x"), Some(1));
        assert_eq!(router.find(Some("www.example.com"), "/api/v1/x"), Some(0));
        assert_eq!(router.find(None, "/api/v1/x"), Some(0));
    }

    #[test]
    fn host_without_a_matching_prefix_falls_back_to_host_less_routes() {
        let router = router(&[
            route(Some("api.example.com"), "/v1", "b"),
            route(None, "/", "a"),
        ]);
        assert_eq!(router.find(Some("api.example.com"), "/v1/x"), Some(1));
        assert_eq!(router.find(Some("api.example.com"), "/other"), Some(0));
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
            assert_eq!(router.find(Some(host), "/"), Some(1), "{host}");
        }
        assert_eq!(router.find(Some("example.com"), "/"), None);
        assert_eq!(router.find(None, "/"), None);
    }

    #[test]
    fn ipv6_host_matches_with_and_without_port() {
        let router = router(&[route(Some("[::1]"), "/", "c")]);
        assert_eq!(router.find(Some("[::1]"), "/"), Some(2));
        assert_eq!(router.find(Some("[::1]:8080"), "/"), Some(2));
    }

    #[test]
    fn overlong_or_non_ascii_host_does_not_panic_and_uses_host_less_routes() {
        let router = router(&[route(Some("a.example"), "/", "b"), route(None, "/", "a")]);
        let long = "a".repeat(MAX_HOST_LEN + 1);
        assert_eq!(router.find(Some(&long), "/"), Some(0));
        assert_eq!(router.find(Some("bücher.example"), "/"), Some(0));
        assert_eq!(router.find(Some(""), "/"), Some(0));
    }

    #[test]
    fn route_to_an_unknown_group_is_ignored() {
        let router = router(&[route(None, "/", "nope")]);
        assert_eq!(router.find(None, "/"), None);
    }
}
