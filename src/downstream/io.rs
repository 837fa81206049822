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
    /// A new request head is expected: the first byte read starts the header timeout.
    recording: AtomicBool,
    conflict: AtomicBool,
    /// The driver wants the HTTP/1 state dropped: the next read that would wait ends instead.
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

    /// Whether the stream the connection saw end was ended by [`Tracker::ask_to_park`];
    /// clears both.
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
        // A client that stopped reading: the connection may have taken the whole response (the
        // request is over) and still be waiting to flush it, so this comes before everything else.
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

/// What the client socket reports to the connection: when bytes arrive and leave, and a copy
/// of each request head long enough to check its framing headers.
pub(super) struct ClientSide {
    tracker: Arc<Tracker>,
}

impl ClientSide {
    pub(super) fn new(tracker: Arc<Tracker>) -> ClientSide {
        ClientSide { tracker }
    }

    /// Bytes of a request head are waiting: its header timeout runs, if it does not yet.
    pub(super) fn head_begun(&self) {
        let t = &self.tracker;
        if t.head_started.load(Ordering::Relaxed) == 0 {
            t.head_started
                .store(t.stamp(crate::clock::now()), Ordering::Relaxed);
        }
    }

    /// A request head was read whole; `conflict` if it had both framing headers.
    pub(super) fn head_parsed(&self, conflict: bool) {
        self.tracker.conflict.store(conflict, Ordering::Relaxed);
    }
}

impl Observer for ClientSide {
    fn read(&mut self, added: &[u8], _closed: bool) {
        let t = &self.tracker;
        if added.is_empty() || !t.recording.load(Ordering::Relaxed) {
            return;
        }
        self.head_begun();
    }

    fn end_instead_of_waiting(&mut self) -> bool {
        let t = &self.tracker;
        // Only between requests: nothing in flight, no byte of a next head read (the read
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
