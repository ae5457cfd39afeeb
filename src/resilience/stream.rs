//! Timeouts for streamed answers: `stream_idle_timeout` bounds the gap
//! between two frames of an upstream's answer body (an LLM's server-sent
//! events, a gRPC server stream). A stream that stalls is cut: the caller
//! sees the stream fail (an HTTP/2 `RST_STREAM`, a truncated HTTP/1.1
//! chunked body) instead of waiting for its own timeout, and the cut is
//! counted (`breakwater_timeouts_total{kind="stream-idle"}`) and reported
//! to the circuit breaker as a reset.
//!
//! The timer is reset on every frame, so a long answer that keeps coming
//! is never cut, whatever its length.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::body::{self, Body, BoxError};

/// What happens when a stream is cut.
pub type OnCut = Box<dyn FnOnce() + Send>;

/// `body`, cut when no frame came for `idle`; `on_cut` runs when it is.
pub fn idle_timeout(body: Body, idle: Duration, on_cut: OnCut) -> Body {
    body::boxed(Idle {
        inner: body,
        idle,
        timer: Box::pin(tokio::time::sleep(idle)),
        on_cut: Some(on_cut),
        ended: false,
    })
}

struct Idle {
    inner: Body,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    on_cut: Option<OnCut>,
    ended: bool,
}

impl http_body::Body for Idle {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let idle = self.idle;
                self.timer.as_mut().reset(Instant::now() + idle);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => {
                self.ended = other.is_none();
                Poll::Ready(other)
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(()) => {
                    self.ended = true;
                    if let Some(on_cut) = self.on_cut.take() {
                        on_cut();
                    }
                    let idle = self.idle;
                    Poll::Ready(Some(Err(format!(
                        "the upstream's answer stalled: no data for {idle:?}"
                    )
                    .into())))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn frames(gaps: &'static [u64]) -> Body {
        let stream = futures_util::stream::unfold(0usize, move |i| async move {
            let gap = *gaps.get(i)?;
            tokio::time::sleep(Duration::from_millis(gap)).await;
            Some((
                Ok::<_, BoxError>(Frame::data(Bytes::from(format!("{i};")))),
                i + 1,
            ))
        });
        body::boxed(StreamBody::new(stream))
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_keeps_coming_is_never_cut() {
        let cuts = Arc::new(AtomicUsize::new(0));
        let c = cuts.clone();
        let body = idle_timeout(
            frames(&[90, 90, 90, 90, 90, 90]),
            Duration::from_millis(100),
            Box::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
            }),
        );
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(
            all, "0;1;2;3;4;5;",
            "540 ms in all, never 100 ms without data"
        );
        assert_eq!(cuts.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_is_cut_once_after_the_idle_time() {
        let cuts = Arc::new(AtomicUsize::new(0));
        let c = cuts.clone();
        let mut body = idle_timeout(
            frames(&[10, 10, 5_000]),
            Duration::from_millis(100),
            Box::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
            }),
        );
        let started = Instant::now();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "0;"
        );
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "1;"
        );
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.to_string().contains("stalled"), "{error}");
        assert_eq!(started.elapsed(), Duration::from_millis(120));
        assert!(
            body.frame().await.is_none(),
            "the stream ends after the cut"
        );
        assert_eq!(cuts.load(Ordering::SeqCst), 1);
    }
}
