//! The `http://host[:port][/path]` a tool sends to, checked and resolved once.

use std::io;
use std::net::SocketAddr;

use http::Uri;
use http::uri::{Authority, PathAndQuery};

/// A checked target: where to connect, what to put in `Host`, and the request path.
#[derive(Clone, Debug)]
pub struct HttpTarget {
    /// The first address the host resolved to; every connection goes there.
    pub addr: SocketAddr,
    pub authority: Authority,
    pub path: PathAndQuery,
}

#[derive(Debug)]
pub enum TargetError {
    /// The URL is not one the tools can send to.
    Bad(&'static str),
    /// Its host did not resolve.
    Resolve(io::Error),
}

/// Checks that `uri` is `http://host[:port][/path]`.
pub fn check(uri: &Uri) -> Result<(), &'static str> {
    match uri.scheme_str() {
        Some("http") => {}
        Some(_) => return Err("only http:// targets are supported (HTTP/1.1 over TCP)"),
        None => return Err("give a full URL, e.g. http://127.0.0.1:8080/"),
    }
    match uri.host() {
        Some(host) if !host.is_empty() => Ok(()),
        _ => Err("the URL has no host"),
    }
}

/// Checks `uri` and resolves its host.
pub async fn resolve(uri: &Uri) -> Result<HttpTarget, TargetError> {
    check(uri).map_err(TargetError::Bad)?;
    let authority = uri
        .authority()
        .ok_or(TargetError::Bad("the URL has no host"))?
        .clone();
    let path = match uri.path_and_query() {
        Some(p) if !p.as_str().is_empty() => p.clone(),
        _ => PathAndQuery::from_static("/"),
    };
    // IPv6 literals keep their brackets in `host()`; the resolver wants them off.
    let name = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((name, port))
        .await
        .map_err(TargetError::Resolve)?
        .next()
        .ok_or_else(|| {
            TargetError::Resolve(io::Error::new(
                io::ErrorKind::NotFound,
                "the host name resolved to no address",
            ))
        })?;
    Ok(HttpTarget {
        addr,
        authority,
        path,
    })
}
