//! A caller that stops reading: the answer it leaves unread is cut.
//!
//! An answer streams as fast as its caller reads it. While the caller's
//! HTTP/2 window or its socket is full, hyper does not ask the answer's
//! body for more, so the body cannot see a caller that stalls: it is
//! simply not polled. Yet the answer holds its call's concurrency slot, and
//! an upstream's slots are shared: a connection that opens a thousand
//! streams and reads none would hold them all, for ever.
//!
//! So the task that sends answers (an HTTP/2 stream's, an HTTP/1.1
//! connection's) runs [`paced`]: a body that hands it a frame says so
//! ([`handed`], with how long the caller may take to ask for the next),
//! and a body asked for a frame says so too ([`asked`]). When the task
//! then waits longer than that without the next ask, it is ended: the
//! HTTP/2 stream is reset (`CANCEL`), the HTTP/1.1 connection closed, the
//! body dropped and its slot freed. The body learns why from [`cut`] as
//! it is dropped, and counts it as the caller's, never the upstream's.
//!
//! A caller that reads slowly but steadily is never cut: every ask starts
//! the wait again. And nothing is paid while callers keep up: the clock is
//! read and a timer made only when a task waits with a frame unread (an
//! answer larger than the caller's window, a caller that stopped).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

tokio::task_local! {
    static PACE: Pace;
}

/// What the bodies of a paced task tell it.
#[derive(Debug, Default)]
struct Pace {
    /// A frame went to the caller and the next was not asked for yet: how
    /// long the caller may take.
    waiting: Cell<Option<Duration>>,
    /// Frames handed so far (wrapping): a change is progress.
    handed: Cell<u32>,
    /// The task is being ended because its caller stopped reading.
    cut: Cell<bool>,
}

/// A body asks for its next frame: the caller is reading.
pub fn asked() {
    let _ = PACE.try_with(|pace| pace.waiting.set(None));
}

/// A body handed a frame to the caller, who may take up to `limit` to ask
/// for the next.
pub fn handed(limit: Duration) {
    let _ = PACE.try_with(|pace| {
        pace.waiting.set(Some(limit));
        pace.handed.set(pace.handed.get().wrapping_add(1));
    });
}

/// Whether the running task is being ended because its caller stopped
/// reading (false outside a paced task).
pub fn cut() -> bool {
    PACE.try_with(|pace| pace.cut.get()).unwrap_or(false)
}

/// `future`, ended when a body it sends waits on its caller longer than
/// the body allows.
pub fn paced<F: Future<Output = ()>>(future: F) -> impl Future<Output = ()> {
    PACE.scope(
        Pace::default(),
        Watch::Running {
            inner: future,
            stall: None,
        },
    )
}

/// Since when a task has waited on its caller.
struct Stall {
    /// The frames handed when the wait began.
    handed: u32,
    since: Instant,
    timer: Pin<Box<Sleep>>,
}

pin_project_lite::pin_project! {
    #[project = WatchProj]
    #[project_replace = WatchDone]
    enum Watch<F> {
        Running {
            #[pin]
            inner: F,
            stall: Option<Stall>,
        },
        Done,
    }
}

impl<F: Future<Output = ()>> Future for Watch<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let WatchProj::Running { inner, stall } = self.as_mut().project() else {
            return Poll::Ready(());
        };
        if inner.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let (waiting, handed) = PACE.with(|pace| (pace.waiting.get(), pace.handed.get()));
        let Some(limit) = waiting else {
            return Poll::Pending;
        };
        let now = Instant::now();
        let stall = match stall {
            Some(stall) if stall.handed == handed => stall,
            Some(stall) => {
                // A new wait: the timer, set for an older one, is moved on
                // when it goes off.
                stall.handed = handed;
                stall.since = now;
                stall
            }
            None => stall.insert(Stall {
                handed,
                since: now,
                timer: Box::pin(tokio::time::sleep_until(now + limit)),
            }),
        };
        let due = stall.since + limit;
        if stall.timer.deadline() > due {
            stall.timer.as_mut().reset(due);
        }
        loop {
            if stall.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if Instant::now() < due {
                stall.timer.as_mut().reset(due);
                continue;
            }
            tracing::debug!(after = ?limit, "a caller stopped reading its answer: cut");
            PACE.with(|pace| pace.cut.set(true));
            // Dropped here, inside the scope, so that its bodies see why.
            self.project_replace(Watch::Done);
            return Poll::Ready(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A task that hands a frame, which its caller asks after each of
    /// `gaps`, then one more that is never asked after; `seen` says
    /// whether it was cut, as its body would see as it is dropped.
    async fn sender(gaps: &'static [u64], limit: Duration, seen: Arc<AtomicBool>) {
        struct Body(Arc<AtomicBool>);
        impl Drop for Body {
            fn drop(&mut self) {
                self.0.store(cut(), Ordering::SeqCst);
            }
        }
        let _body = Body(seen);
        for gap in gaps {
            handed(limit);
            tokio::time::sleep(Duration::from_millis(*gap)).await;
            asked();
        }
        handed(limit);
        std::future::pending::<()>().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_stops_asking_is_cut_after_the_limit_from_its_last_ask() {
        let seen = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let task = paced(sender(
            &[50, 80, 90],
            Duration::from_millis(100),
            seen.clone(),
        ));
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("cut");
        // Each ask came within 100 ms of its frame; the last frame (at
        // 220 ms) was never asked after.
        assert_eq!(started.elapsed(), Duration::from_millis(320));
        assert!(seen.load(Ordering::SeqCst), "the body saw its cut");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_whose_body_waits_on_its_upstream_is_never_cut() {
        let polls = Arc::new(AtomicUsize::new(0));
        let p = polls.clone();
        let task = paced(async move {
            asked();
            handed(Duration::from_millis(100));
            tokio::time::sleep(Duration::from_millis(10)).await;
            // Asked again, and the upstream makes it wait for an hour.
            asked();
            p.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(3600)).await;
            p.fetch_add(1, Ordering::SeqCst);
        });
        task.await;
        assert_eq!(polls.load(Ordering::SeqCst), 2, "it ran to its end");
        assert!(!cut(), "nothing is cut outside a paced task");
    }
}
