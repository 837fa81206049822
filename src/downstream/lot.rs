//! Where idle client connections wait: one lot per accept loop, so on the worker that accepted
//! the connection (a worker runs an accept loop per listen address). A parked
//! connection is its socket and a few fields in a slot here, with no task of its own, until
//! the client sends again (it gets a task back), its idle hold passes, or shutdown begins.
//!
//! A task per parked connection would cost its whole future, the largest state of its life,
//! for every idle client; here each slot has a waker of its own, so a readable socket wakes
//! the lot with its slot's index, and one timer stands for every idle hold.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use tokio::io::AsyncWrite;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::io::Wait;
use super::{Connection, Shutdown};
use crate::metrics::Metrics;

/// Hands a parked connection to its lot.
/// Boxed: the box becomes the connection's slot.
pub(super) type Entrance = UnboundedSender<Box<Connection>>;

/// What the lot needs from the client side.
pub(super) struct Setup {
    pub shutdown: Arc<Shutdown>,
    pub metrics: Arc<Metrics>,
    pub timeouts: super::Timeouts,
    /// Gives a connection whose client sent again a task to serve it.
    pub resume: Box<dyn Fn(Box<Connection>) + Send + Sync>,
}

/// Starts a lot on the current runtime. It runs until every entrance is dropped.
pub(super) fn open(cx: Setup) -> Entrance {
    let (entrance, arrivals) = unbounded_channel();
    tokio::spawn(run(arrivals, cx));
    entrance
}

/// Parks `conn` in `entrance`'s lot; closes it if the lot is gone.
pub(super) fn park(entrance: &Entrance, conn: Connection, metrics: &Metrics) {
    if let Err(refused) = entrance.send(Box::new(conn)) {
        close(*refused.0, metrics);
    }
}

/// A connection leaving the lot for good: the close its HTTP/1 state would have made.
pub(super) fn close(mut conn: Connection, metrics: &Metrics) {
    // A TCP shutdown completes at once; nothing is left to flush on a parked connection, and
    // the park's "keep open" mark was cleared when its HTTP/1 state ended.
    let _ = Pin::new(&mut conn.io).poll_shutdown(&mut Context::from_waker(Waker::noop()));
    metrics.downstream_active.dec();
}

async fn run(mut arrivals: UnboundedReceiver<Box<Connection>>, cx: Setup) {
    let Setup {
        shutdown,
        metrics,
        timeouts,
        resume,
    } = cx;
    let mut lot = Lot::default();
    let mut stop = pin!(shutdown.begun());
    let mut stopping = false;
    let mut hold = pin!(tokio::time::sleep(Duration::ZERO));
    poll_fn(|task| {
        if !stopping && stop.as_mut().poll(task).is_ready() {
            stopping = true;
            for conn in lot.take_all() {
                metrics.downstream_parked.dec();
                close(*conn, &metrics);
            }
        }
        loop {
            match arrivals.poll_recv(task) {
                Poll::Ready(Some(conn)) if stopping => close(*conn, &metrics),
                Poll::Ready(Some(conn)) => match conn.tracker.wait(&timeouts) {
                    Wait::Idle(deadline) => match lot.admit(conn, deadline) {
                        Ok(()) => drop(metrics.downstream_parked.inc()),
                        Err(ready) => resume(ready),
                    },
                    // Something began since the park: serve it.
                    Wait::Busy | Wait::Abort(_) => resume(conn),
                },
                // Every entrance is gone, so every connection too: nothing is parked.
                Poll::Ready(None) => return Poll::Ready(()),
                Poll::Pending => break,
            }
        }
        for conn in lot.readable(task.waker()) {
            metrics.downstream_parked.dec();
            resume(conn);
        }
        let mut due = Instant::now();
        loop {
            for conn in lot.expired(due) {
                metrics.downstream_parked.dec();
                close(*conn, &metrics);
            }
            let Some(next) = lot.next_deadline() else {
                break;
            };
            if hold.deadline() != next.into() {
                hold.as_mut().reset(next.into());
            }
            if hold.as_mut().poll(task).is_pending() {
                break;
            }
            // The timer fired: its hold is due even if the clock reads a hair earlier, so the
            // loop always moves on.
            due = due.max(next);
        }
        Poll::Pending
    })
    .await
}

/// The parked connections. Pure bookkeeping but for the readiness check, which polls each
/// socket with its slot's waker.
#[derive(Default)]
struct Lot {
    slots: Vec<Option<Slot>>,
    /// One waker per slot index, kept for the slot's next occupant.
    wakers: Vec<Waker>,
    free: Vec<usize>,
    /// Idle holds, earliest first. A slot resumed since leaves its entry behind, told apart
    /// by the ticket; the heap is rebuilt when such entries outnumber the live ones.
    holds: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    parked: usize,
    next_ticket: u64,
    woken: Arc<Woken>,
}

struct Slot {
    /// Boxed, so that a free slot costs a pointer.
    conn: Box<Connection>,
    deadline: Instant,
    ticket: u64,
}

#[allow(
    clippy::vec_box,
    reason = "the boxes are the slots' own, handed on as they are"
)]
impl Lot {
    /// Takes `conn` in until `deadline`, or gives it back at once if its client has sent.
    fn admit(&mut self, conn: Box<Connection>, deadline: Instant) -> Result<(), Box<Connection>> {
        let index = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            let woken = self.woken.clone();
            let index = self.wakers.len();
            self.wakers
                .push(Waker::from(Arc::new(SlotWaker { index, woken })));
            index
        });
        if readable(&conn, &self.wakers[index]) {
            self.free.push(index);
            return Err(conn);
        }
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        self.slots[index] = Some(Slot {
            conn,
            deadline,
            ticket,
        });
        self.holds.push(Reverse((deadline, ticket, index)));
        self.parked += 1;
        Ok(())
    }

    /// The connections whose sockets woke the lot and are readable. `lot` is the lot task's
    /// waker, for the next wake.
    fn readable(&mut self, lot: &Waker) -> Vec<Box<Connection>> {
        let woken = self.woken.take(lot);
        let mut ready = Vec::new();
        for index in woken {
            let is_ready = self.slots[index]
                .as_ref()
                .is_some_and(|slot| readable(&slot.conn, &self.wakers[index]));
            if is_ready && let Some(conn) = self.vacate(index) {
                ready.push(conn);
            }
        }
        self.compact();
        ready
    }

    /// Drops the holds of slots resumed since, once they outnumber the live ones: a client
    /// that comes back every second would otherwise leave an entry per second for the whole
    /// idle hold.
    fn compact(&mut self) {
        if self.holds.len() > 2 * self.parked + 64 {
            self.holds = self
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.as_ref().map(|s| Reverse((s.deadline, s.ticket, i))))
                .collect();
        }
    }

    /// The connections whose idle hold has passed at `now`.
    fn expired(&mut self, now: Instant) -> Vec<Box<Connection>> {
        let mut out = Vec::new();
        while let Some(Reverse((deadline, ticket, index))) = self.holds.peek().copied()
            && deadline <= now
        {
            self.holds.pop();
            if self.slots[index]
                .as_ref()
                .is_some_and(|s| s.ticket == ticket)
                && let Some(conn) = self.vacate(index)
            {
                out.push(conn);
            }
        }
        out
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.holds.peek().map(|Reverse((deadline, ..))| *deadline)
    }

    fn take_all(&mut self) -> Vec<Box<Connection>> {
        (0..self.slots.len())
            .filter_map(|index| self.vacate(index))
            .collect()
    }

    fn vacate(&mut self, index: usize) -> Option<Box<Connection>> {
        let slot = self.slots[index].take()?;
        self.free.push(index);
        self.parked -= 1;
        Some(slot.conn)
    }
}

/// Whether the client sent something (or closed, or failed: the connection sees and
/// reports it).
/// Polling registers `waker` with the socket.
fn readable(conn: &Connection, waker: &Waker) -> bool {
    let mut cx = Context::from_waker(waker);
    conn.io.stream().poll_read_ready(&mut cx).is_ready()
}

/// Slot indexes whose sockets woke, and the lot's own waker.
#[derive(Default)]
struct Woken(Mutex<(Vec<usize>, Option<Waker>)>);

impl Woken {
    fn take(&self, lot: &Waker) -> Vec<usize> {
        let mut woken = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        woken.1 = Some(lot.clone());
        std::mem::take(&mut woken.0)
    }
}

struct SlotWaker {
    index: usize,
    woken: Arc<Woken>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let lot = {
            let mut woken = self.woken.0.lock().unwrap_or_else(PoisonError::into_inner);
            woken.0.push(self.index);
            woken.1.take()
        };
        if let Some(lot) = lot {
            lot.wake();
        }
    }
}
