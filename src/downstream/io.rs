//! The state of one client connection, and what its socket reports into it: when bytes arrive
//! and leave, and a copy of each request head long enough to check its framing headers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::observed::Observer;

/// What the connection is doing, shared by the socket wrapper, the service and the driver.
/// All of them run on the connection's task, and the lot reads it while the connection is
/// parked, after the hand-over; atomics only make the struct `Sync`.
#[derive(Debug)]
pub(super) struct Tracker {
    pub(super) accepted: Instant,
    in_flight: AtomicU32,
    requests: AtomicU64,
    /// Nanoseconds since `accepted`; each 0 means "not set".
    idle_since: AtomicU64,
    head_started: AtomicU64,
    write_blocked: AtomicU64,
    /// A new request head is expected: read bytes are copied to the head recorder.
    recording: AtomicBool,
    conflict: AtomicBool,
    /// The driver wants hyper's state dropped: the next read that would wait ends instead.
    park: AtomicBool,
    /// A read ended for that reason, not because the client closed.
    parked: AtomicBool,
}

/// The deadline the driver should wake at, and what it means when it passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Wait {
    /// Idle between requests: close gracefully.
    Idle(Instant),
    /// A request head is arriving too slowly, or the client does not read our response.
    Abort(Instant),
    /// A request is being handled; its own timeouts apply.
    Busy,
}

impl Tracker {
    pub(super) fn new(accepted: Instant) -> Tracker {
        Tracker {
            accepted,
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            write_blocked: AtomicU64::new(0),
            recording: AtomicBool::new(true),
            conflict: AtomicBool::new(false),
            park: AtomicBool::new(false),
            parked: AtomicBool::new(false),
        }
    }

    /// Requests begun on the connection.
    pub(super) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// When the connection last became idle after a response, if it is idle now.
    pub(super) fn idle_since(&self) -> Option<Instant> {
        let idle = self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == 0
            && self.write_blocked.load(Ordering::Relaxed) == 0;
        match self.idle_since.load(Ordering::Relaxed) {
            s @ 1.. if idle => Some(self.at(s)),
            _ => None,
        }
    }

    /// Asks the socket to end the stream at the next read that finds nothing, if the
    /// connection is still idle between requests then.
    pub(super) fn ask_to_park(&self) {
        self.park.store(true, Ordering::Relaxed);
    }

    /// Whether the stream hyper saw end was ended by [`Tracker::ask_to_park`]; clears both.
    pub(super) fn take_parked(&self) -> bool {
        self.park.store(false, Ordering::Relaxed);
        self.parked.swap(false, Ordering::Relaxed)
    }

    fn stamp(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.accepted).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn at(&self, stamp: u64) -> Instant {
        self.accepted + Duration::from_nanos(stamp)
    }

    /// A request head was parsed; returns its number on the connection and whether its
    /// raw head had conflicting framing headers.
    pub(super) fn begin(&self) -> (u64, bool) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        // A park asked for and not taken is for an idle spell that is over.
        self.park.store(false, Ordering::Relaxed);
        self.recording.store(false, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        (n, self.conflict.swap(false, Ordering::Relaxed))
    }

    /// A response was written (or abandoned): the connection is idle again.
    pub(super) fn end(&self) {
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle_since
                .store(self.stamp(crate::clock::now()), Ordering::Relaxed);
            self.recording.store(true, Ordering::Relaxed);
        }
    }

    pub(super) fn wait(&self, t: &super::Timeouts) -> Wait {
        // A client that stopped reading: hyper may have taken the whole response (the request
        // is over) and still be waiting to flush it, so this comes before everything else.
        if let s @ 1.. = self.write_blocked.load(Ordering::Relaxed) {
            return Wait::Abort(self.at(s) + t.send);
        }
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Wait::Busy;
        }
        match self.head_started.load(Ordering::Relaxed) {
            0 => {}
            s => return Wait::Abort(self.at(s) + t.header),
        }
        match self.idle_since.load(Ordering::Relaxed) {
            // Before the first request, a client gets the header timeout, as in nginx.
            0 => Wait::Abort(self.accepted + t.header),
            s => Wait::Idle(self.at(s) + t.idle_hold),
        }
    }
}

/// The copy of a request head as it arrives, until its end is seen.
#[derive(Debug, Default)]
struct HeadRecorder {
    buf: Vec<u8>,
}

/// Headers a client may send before hyper refuses the head; httparse needs room for them.
const MAX_HEADERS: usize = 100;

impl HeadRecorder {
    /// Feeds read bytes; returns `Some(conflict)` once the head is complete.
    fn feed(&mut self, data: &[u8], limit: usize) -> Option<bool> {
        if self.buf.is_empty()
            && let Some(end) = head_end(data)
        {
            return Some(conflicting_framing(&data[..end]));
        }
        self.buf.extend_from_slice(data);
        if let Some(end) = head_end(&self.buf) {
            let conflict = conflicting_framing(&self.buf[..end]);
            self.buf = Vec::new();
            return Some(conflict);
        }
        if self.buf.len() > limit {
            // hyper answers 431 for this head; nothing left to check.
            self.buf = Vec::new();
            return Some(false);
        }
        None
    }
}

/// Where the first CRLF CRLF ends. Found LF by LF: a head has a few short lines, where
/// `memmem`'s setup costs more than the search.
fn head_end(data: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', data)
        .find(|&lf| lf >= 3 && data[lf - 3..lf] == *b"\r\n\r")
        .map(|lf| lf + 1)
}

/// Whether a request head carries both Content-Length and Transfer-Encoding. hyper resolves
/// that case itself (Transfer-Encoding wins) without telling the service, but a message
/// framed two ways is the raw material of request smuggling, so kaguard refuses it.
fn conflicting_framing(head: &[u8]) -> bool {
    // Nearly every head has at most one of the two: a scan of line starts rules it out
    // without parsing the whole head. A header name starts a line (after LF or CRLF) in any
    // head httparse accepts.
    let starts_with = |line: &[u8], name: &[u8]| {
        line.get(..name.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(name))
    };
    let (mut te, mut cl) = (false, false);
    for lf in memchr::memchr_iter(b'\n', head) {
        let line = &head[lf + 1..];
        te |= starts_with(line, b"transfer-encoding");
        cl |= starts_with(line, b"content-length");
    }
    if !(te && cl) {
        return false;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    if req.parse(head).is_err() {
        return false;
    }
    let has = |name: &str| {
        req.headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case(name))
    };
    has("transfer-encoding") && has("content-length")
}

/// What the client socket reports to the connection: when bytes arrive and leave, and a copy
/// of each request head long enough to check its framing headers.
pub(super) struct ClientSide {
    tracker: Arc<Tracker>,
    head: HeadRecorder,
    head_limit: usize,
}

impl ClientSide {
    pub(super) fn new(tracker: Arc<Tracker>, head_limit: usize) -> ClientSide {
        ClientSide {
            tracker,
            head: HeadRecorder::default(),
            head_limit,
        }
    }
}

impl Observer for ClientSide {
    fn read(&mut self, added: &[u8], _closed: bool) {
        let t = &self.tracker;
        if added.is_empty() || !t.recording.load(Ordering::Relaxed) {
            return;
        }
        if t.head_started.load(Ordering::Relaxed) == 0 {
            t.head_started
                .store(t.stamp(crate::clock::now()), Ordering::Relaxed);
        }
        if let Some(conflict) = self.head.feed(added, self.head_limit) {
            t.conflict.store(conflict, Ordering::Relaxed);
            t.recording.store(false, Ordering::Relaxed);
        }
    }

    fn end_instead_of_waiting(&mut self) -> bool {
        let t = &self.tracker;
        // Only between requests: nothing in flight, no byte of a next head read (hyper's read
        // buffer is empty), and the last response flushed.
        if !t.park.load(Ordering::Relaxed) || t.idle_since().is_none() {
            return false;
        }
        t.park.store(false, Ordering::Relaxed);
        t.parked.store(true, Ordering::Relaxed);
        true
    }

    fn keeps_open(&self) -> bool {
        self.tracker.parked.load(Ordering::Relaxed)
    }

    fn wrote(&mut self, _written: usize, pending: bool) {
        let t = &self.tracker;
        if !pending {
            t.write_blocked.store(0, Ordering::Relaxed);
        } else if t.write_blocked.load(Ordering::Relaxed) == 0 {
            t.write_blocked
                .store(t.stamp(crate::clock::now()), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn head_end_is_the_end_of_the_first_crlf_crlf(
            data in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'a')], 0..40)
        ) {
            let expected = memchr::memmem::find(&data, b"\r\n\r\n").map(|at| at + 4);
            prop_assert_eq!(head_end(&data), expected);
        }
    }

    #[test]
    fn both_framing_headers_are_a_conflict() {
        let head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(conflicting_framing(head));
        assert!(!conflicting_framing(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n"
        ));
    }

    #[test]
    fn framing_headers_count_in_any_case_and_with_bare_line_feeds() {
        let head = b"POST / HTTP/1.1\nhost: a\ncontent-LENGTH: 3\nTRANSFER-encoding: chunked\n\n";
        assert!(conflicting_framing(head));
        // A name inside a value is not a header.
        assert!(!conflicting_framing(
            b"POST / HTTP/1.1\r\nX-Note: transfer-encoding\r\nContent-Length: 3\r\n\r\n"
        ));
    }

    #[test]
    fn head_split_across_reads_is_checked_once_complete() {
        let mut rec = HeadRecorder::default();
        assert_eq!(
            rec.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n", 1024),
            None
        );
        assert_eq!(rec.feed(b"Content-Length: 3\r\n\r\nabc", 1024), Some(true));
        assert!(rec.buf.is_empty());
    }
}
