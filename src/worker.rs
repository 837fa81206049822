//! Which worker thread runs the current code.
//!
//! `kaguard run` gives each worker thread its own single-threaded runtime, and a client
//! connection, its requests and the upstream connections they open all stay on the worker that
//! accepted it: a wake-up never crosses threads on the request path. The pool, shared by the
//! workers, lends a request a connection of its own worker first (see
//! [`crate::pool::Pool::checkout_prefer`]).

use std::cell::Cell;

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The worker running this thread; 0 for the main thread and for any thread that is no
/// worker (tests, tools).
pub fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// Marks this thread as worker `index`.
pub fn set(index: usize) {
    CURRENT.with(|c| c.set(index));
}
