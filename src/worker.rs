//! Which worker thread runs the current code, how a task gives way to the worker's other
//! tasks, and when a worker has gone quiet.
//!
//! `kaguard run` gives each worker thread its own single-threaded runtime, and a client
//! connection, its requests and the upstream connections they open all stay on the worker that
//! accepted it. Each upstream group keeps a pool per worker, and lends a request another
//! worker's connection, whose wake-ups then cross threads, only when its own has none (see
//! [`crate::proxy::group::Group`]).

use std::cell::Cell;
use std::task::Poll;
use std::time::Duration;

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

/// Lets the worker's other ready tasks run before this one goes on: the task wakes itself and
/// waits, so the scheduler puts it back at the end of the worker's queue.
///
/// A request gives way before it takes an upstream connection, so that the requests one pass
/// over the queue made ready leave for the upstream together. The upstream then wakes once for
/// several and finds them all, where it often woke for one and slept again when they left one
/// at a time. `tokio::task::yield_now` will not do: it holds
/// the task until the worker next polls its sockets, which a busy worker does only every few
/// dozen tasks; tried in its place, it cost p99 at one worker and throughput at two.
pub async fn give_way() {
    let mut gave = false;
    std::future::poll_fn(|cx| {
        if gave {
            return Poll::Ready(());
        }
        gave = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// How often a worker looks at whether it has gone quiet. A look reads a counter tokio keeps,
/// so it may be often; memory a burst freed goes back within about twice this after the
/// burst, inside the second that `bench/idle.sh` waits before it reads.
const QUIET_CHECK: Duration = Duration::from_millis(250);

/// Busy time in one [`QUIET_CHECK`] below which a worker counts as quiet: 1 % of its thread,
/// above what the reapers' and health checks' timers cost an idle worker, far below any load.
const QUIET_BUSY: Duration = Duration::from_micros(2_500);

/// Busy time since the last release below which another is not worth its cost: a worker with
/// a trickle of requests would otherwise hand memory back and fault it in again all day.
const WORK_SINCE_RELEASE: Duration = Duration::from_millis(50);

/// Calls `release` on this worker's thread each time the worker goes quiet after work, so that
/// memory freed by a burst (the buffers of connections now parked, say) goes back to the
/// system while the server idles. A busy worker is never interrupted; a release may hand back
/// memory other workers freed too, as mimalloc's arenas are shared. Runs for as long as the
/// runtime does; the runtime must have one worker thread, as `kaguard run`'s have.
pub async fn release_when_quiet(release: impl Fn()) {
    let metrics = tokio::runtime::Handle::current().metrics();
    let busy = || metrics.worker_total_busy_duration(0);
    let mut tick = tokio::time::interval(QUIET_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last, mut at_release) = (busy(), busy());
    loop {
        tick.tick().await;
        let now = busy();
        if went_quiet(last, now, at_release) {
            release();
            at_release = busy();
        }
        last = now;
    }
}

/// Whether a worker busy for `last` and then `now` in all has gone quiet after work since it
/// was busy for `at_release` at the last release.
fn went_quiet(last: Duration, now: Duration, at_release: Duration) -> bool {
    now.saturating_sub(last) < QUIET_BUSY && now.saturating_sub(at_release) >= WORK_SINCE_RELEASE
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn memory_is_released_once_a_worker_goes_quiet_after_work() {
        // Busy through the last check: not yet.
        assert!(!went_quiet(100 * MS, 300 * MS, Duration::ZERO));
        // Quiet now, after 300 ms of work since the last release.
        assert!(went_quiet(300 * MS, 301 * MS, Duration::ZERO));
        // Quiet, and nothing worth a release happened since the last one.
        assert!(!went_quiet(301 * MS, 302 * MS, 300 * MS));
        // A trickle of work adds up to another release, once quiet.
        assert!(!went_quiet(349 * MS, 352 * MS, 300 * MS));
        assert!(went_quiet(352 * MS, 353 * MS, 300 * MS));
    }

    /// The order a worker runs tasks in after one gives way, on a runtime of one worker thread
    /// as `kaguard run` builds them: the task goes on once the tasks waiting when it gave way
    /// have had a turn, even when one of them stays busy. (Tokio's `yield_now` would wait for
    /// the busy one to end; no giving way would go on first.)
    #[test]
    fn a_task_that_gives_way_goes_on_after_one_turn_of_the_waiting_tasks() {
        use std::sync::{Arc, Mutex};

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let order = Arc::new(Mutex::new(Vec::new()));
        let log = order.clone();
        rt.block_on(rt.spawn(async move {
            let push = |log: &Arc<Mutex<Vec<&str>>>, what| log.lock().unwrap().push(what);
            // Spawned in this order, the giver runs first: a worker runs the task spawned last
            // before its queue.
            let waiting = {
                let log = log.clone();
                tokio::spawn(async move { push(&log, "ready") })
            };
            let busy = {
                let log = log.clone();
                tokio::spawn(async move {
                    // Ready again at once, three times: a task with more work than one turn.
                    let mut turns = 0;
                    std::future::poll_fn(|cx| {
                        turns += 1;
                        if turns > 3 {
                            return Poll::Ready(());
                        }
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    })
                    .await;
                    push(&log, "busy done");
                })
            };
            let giver = {
                let log = log.clone();
                tokio::spawn(async move {
                    push(&log, "giving way");
                    give_way().await;
                    push(&log, "gave way");
                })
            };
            for task in [giver, waiting, busy] {
                task.await.unwrap();
            }
        }))
        .expect("the tasks");
        assert_eq!(
            *order.lock().unwrap(),
            ["giving way", "ready", "gave way", "busy done"]
        );
    }

    /// On a runtime of one worker thread, as `kaguard run` builds them: a burst of work, then
    /// quiet, brings one release, and more quiet brings no other; a worker that never worked
    /// releases nothing.
    #[test]
    fn a_worker_releases_once_after_a_burst_and_never_while_idle() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};

        for burst in [true, false] {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let released = Arc::new(AtomicUsize::new(0));
            let count = released.clone();
            rt.spawn(release_when_quiet(move || {
                count.fetch_add(1, Ordering::SeqCst);
            }));
            if burst {
                // 200 ms of work on the worker, in one poll.
                rt.block_on(rt.spawn(async {
                    let until = std::time::Instant::now() + 200 * MS;
                    while std::time::Instant::now() < until {
                        std::hint::spin_loop();
                    }
                }))
                .expect("the burst");
            }
            // Bounded: a release is due within two checks of the burst's end.
            for _ in 0..40 {
                if released.load(Ordering::SeqCst) > 0 {
                    break;
                }
                std::thread::sleep(QUIET_CHECK / 5);
            }
            std::thread::sleep(QUIET_CHECK * 4);
            assert_eq!(
                released.load(Ordering::SeqCst),
                usize::from(burst),
                "after a burst: {burst}"
            );
        }
    }
}
