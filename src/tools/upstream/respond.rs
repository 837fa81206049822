//! One request in, one response out: query overrides, the request body read and counted without
//! buffering, headers that tell tests which connection answered and whether it will close.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::header::{CONNECTION, CONTENT_LENGTH, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::{Recorder, ResponseBody, Source};
use super::conn::{Activity, CloseMode, CloseReason};
use super::{Behaviour, SeenRequest, Shared};

const X_UPSTREAM_CONNECTION: HeaderName = HeaderName::from_static("x-upstream-connection");
const X_UPSTREAM_REQUEST: HeaderName = HeaderName::from_static("x-upstream-request");
const X_BODY_BYTES: HeaderName = HeaderName::from_static("x-body-bytes");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// The status code `code` if it can end an exchange: 1xx codes are interim and would leave the
/// client waiting for a final response.
pub(super) fn final_status(code: u16) -> Option<StatusCode> {
    StatusCode::from_u16(code)
        .ok()
        .filter(|s| !s.is_informational())
}

/// The hyper service of one connection.
pub(super) struct Handler {
    connection: u64,
    shared: Arc<Shared>,
    activity: Arc<Activity>,
    served: AtomicU64,
}

impl Handler {
    pub(super) fn new(connection: u64, shared: Arc<Shared>, activity: Arc<Activity>) -> Handler {
        Handler {
            connection,
            shared,
            activity,
            served: AtomicU64::new(0),
        }
    }
}

type Respond = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, hyper::Error>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Handler {
    type Response = Response<ResponseBody>;
    type Error = hyper::Error;
    type Future = Respond;

    fn call(&self, request: Request<Incoming>) -> Respond {
        let number = self.served.fetch_add(1, Ordering::SeqCst) + 1;
        let behaviour = self.shared.behaviour();
        self.activity.request_started(&behaviour);
        self.shared.record_head(SeenRequest {
            method: request.method().to_string(),
            uri: request.uri().to_string(),
            version: request.version(),
            headers: request.headers().clone(),
            body_bytes: 0,
            connection: self.connection,
            request_on_connection: number,
        });
        self.shared.handling.fetch_add(1, Ordering::SeqCst);
        let exchange = Exchange {
            connection: self.connection,
            request: number,
            shared: self.shared.clone(),
            activity: self.activity.clone(),
        };
        Box::pin(exchange.respond(request, behaviour))
    }
}

/// What one request asked for in its query string.
#[derive(Debug, Default, PartialEq, Eq)]
struct Overrides {
    status: Option<StatusCode>,
    size: Option<u64>,
    delay: Option<Duration>,
    echo: bool,
    close: Option<CloseMode>,
}

#[derive(Debug, thiserror::Error)]
#[error("query parameter {key}={value}: {expected}")]
struct BadOverride {
    key: String,
    value: String,
    expected: &'static str,
}

impl Overrides {
    /// Reads the known keys; unknown keys are ignored so tests can add cache busters.
    fn parse(query: Option<&str>) -> Result<Overrides, BadOverride> {
        let mut wants = Overrides::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let bad = |expected| BadOverride {
                key: key.to_owned(),
                value: value.to_owned(),
                expected,
            };
            match key {
                "status" => {
                    let status = value.parse().ok().and_then(final_status);
                    wants.status = Some(status.ok_or_else(|| bad("expected a code 200-999"))?);
                }
                "size" => {
                    let size = value.parse().map_err(|_| bad("expected a byte count"))?;
                    wants.size = Some(size);
                }
                "delay" => {
                    let delay = humantime::parse_duration(value)
                        .map_err(|_| bad("expected a duration such as 200ms"))?;
                    wants.delay = Some(delay);
                }
                "echo" => {
                    wants.echo = match value {
                        "" | "1" | "true" => true,
                        "0" | "false" => false,
                        _ => return Err(bad("expected 1 or 0")),
                    }
                }
                "close" => {
                    wants.close = Some(match value {
                        "fin" => CloseMode::Fin,
                        "rst" => CloseMode::Rst,
                        _ => return Err(bad("expected fin or rst")),
                    })
                }
                _ => {}
            }
        }
        Ok(wants)
    }
}

/// One request on one connection, from head to response.
struct Exchange {
    connection: u64,
    request: u64,
    shared: Arc<Shared>,
    activity: Arc<Activity>,
}

/// Counted in [`Shared`]'s `handling` from `Handler::call`; the handler's future owns the
/// exchange, so this runs when it has built its response or was dropped with its connection.
impl Drop for Exchange {
    fn drop(&mut self) {
        self.shared.handling.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Exchange {
    async fn respond(
        self,
        request: Request<Incoming>,
        behaviour: Behaviour,
    ) -> Result<Response<ResponseBody>, hyper::Error> {
        let (head, body) = request.into_parts();
        let wants = Overrides::parse(head.uri.query());
        if let Ok(Overrides {
            close: Some(mode), ..
        }) = wants
        {
            self.activity.close_now(mode, CloseReason::Requested);
            // `serve` drops the connection, and this future with it, as soon as it is notified.
            return std::future::pending().await;
        }
        let last = behaviour
            .max_requests
            .is_some_and(|max| self.request >= max);

        if let Ok(wants) = &wants
            && wants.echo
        {
            tokio::time::sleep(wants.delay.unwrap_or(behaviour.delay)).await;
            let status = wants.status.or(final_status(behaviour.status));
            let recorder = Recorder::new(self.connection, self.request, self.shared.clone());
            let echo = Source::echo(body, recorder);
            return Ok(self.response(status, echo, None, last, &behaviour));
        }

        let body_bytes = self.read_body(body).await?;
        let wants = match wants {
            Ok(wants) => wants,
            Err(bad) => {
                let text = Source::text(format!("{bad}\n"));
                let status = Some(StatusCode::BAD_REQUEST);
                return Ok(self.response(status, text, Some(body_bytes), last, &behaviour));
            }
        };
        tokio::time::sleep(wants.delay.unwrap_or(behaviour.delay)).await;
        let Some(status) = wants.status.or(final_status(behaviour.status)) else {
            let text = Source::text(format!("behaviour has status {}\n", behaviour.status));
            return Ok(self.response(None, text, Some(body_bytes), last, &behaviour));
        };
        let size = wants.size.unwrap_or(behaviour.body_size as u64);
        let fill = Source::fill(size);
        Ok(self.response(Some(status), fill, Some(body_bytes), last, &behaviour))
    }

    /// Reads the request body to its end, keeping only its length.
    async fn read_body(&self, mut body: Incoming) -> Result<u64, hyper::Error> {
        let mut bytes = 0;
        let result = loop {
            match body.frame().await {
                None => break Ok(bytes),
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        bytes += data.len() as u64;
                    }
                }
                Some(Err(error)) => break Err(error),
            }
        };
        self.shared
            .record_body(self.connection, self.request, bytes);
        result
    }

    /// `status` None: the behaviour's status is invalid, answered with 500.
    ///
    /// During a graceful stop every response is the last and says so, whatever the behaviour:
    /// the client must not reuse a connection that is about to close.
    fn response(
        &self,
        status: Option<StatusCode>,
        source: Source,
        body_bytes: Option<u64>,
        last: bool,
        behaviour: &Behaviour,
    ) -> Response<ResponseBody> {
        let draining = self.activity.draining();
        if draining {
            self.shared.drained.answered.fetch_add(1, Ordering::SeqCst);
        }
        let last = last || draining;
        let length = source.length();
        let body = ResponseBody::new(source, self.activity.clone(), last);
        let mut response = Response::new(body);
        *response.status_mut() = status.unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(X_UPSTREAM_CONNECTION, HeaderValue::from(self.connection));
        headers.insert(X_UPSTREAM_REQUEST, HeaderValue::from(self.request));
        if let Some(bytes) = body_bytes {
            headers.insert(X_BODY_BYTES, HeaderValue::from(bytes));
        }
        if let Some(length) = length {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        }
        if draining || (last && behaviour.announce_last) {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        } else if let Some(hint) = keep_alive_hint(behaviour, self.request) {
            headers.insert(KEEP_ALIVE, hint);
        }
        response
    }
}

/// `Keep-Alive: timeout=N, max=M` as Node (timeout rounded down) and Apache (max = requests
/// still allowed after this one) write it; None when there is nothing to announce.
fn keep_alive_hint(behaviour: &Behaviour, request: u64) -> Option<HeaderValue> {
    if !behaviour.hint {
        return None;
    }
    let mut parts = Vec::new();
    if let Some(idle) = behaviour.idle_timeout {
        parts.push(format!("timeout={}", idle.as_secs()));
    }
    if let Some(max) = behaviour.max_requests {
        parts.push(format!("max={}", max.saturating_sub(request)));
    }
    if parts.is_empty() {
        return None;
    }
    let value = HeaderValue::try_from(parts.join(", "))
        .expect("digits, letters, '=', ',' and spaces make a valid header value");
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_read_known_keys_and_ignore_unknown_ones() {
        let wants = Overrides::parse(Some(
            "status=503&size=10&delay=200ms&echo=1&close=rst&x=y&z",
        ))
        .expect("valid query");
        assert_eq!(
            wants,
            Overrides {
                status: Some(StatusCode::SERVICE_UNAVAILABLE),
                size: Some(10),
                delay: Some(Duration::from_millis(200)),
                echo: true,
                close: Some(CloseMode::Rst),
            }
        );
        assert_eq!(
            Overrides::parse(None).expect("no query"),
            Overrides::default()
        );
    }

    #[test]
    fn overrides_reject_bad_values_of_known_keys() {
        for query in [
            "status=abc",
            "status=100",
            "size=-1",
            "delay=soon",
            "close=now",
            "echo=2",
        ] {
            assert!(Overrides::parse(Some(query)).is_err(), "{query}");
        }
    }
}
