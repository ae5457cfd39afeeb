//! Timeouts for streamed answers. `first_byte_timeout` bounds the wait
//! from an answer's headers to its first body frame (a model still
//! reading its prompt); `stream_idle_timeout` bounds the gap between two
//! frames after that (an LLM's server-sent events, a gRPC server stream).
//! A stream that stalls is cut, and the caller sees it end at once instead
//! of waiting for its own timeout:
//!
//! - gRPC: the answer ends with trailers, `grpc-status: 4`
//!   (`DEADLINE_EXCEEDED`), a `grpc-message` that says which timeout, and
//!   `x-breakwater-error`. The headers have gone, so the trailers are
//!   where the status goes; the client reads a status, not a reset.
//! - Other HTTP: the body fails, which the caller sees as an HTTP/2
//!   `RST_STREAM` or an HTTP/1.1 chunked body cut short.
//!
//! Each cut is counted (`breakwater_timeouts_total{kind="first-byte"}` or
//! `{kind="stream-idle"}`) and reported to the circuit breaker as a reset.
//! The idle timer restarts with every frame, so a long answer that keeps
//! coming is never cut, whatever its length.
//!
//! The timer starts when the upstream makes the stream wait (its body is
//! polled and has nothing), not when a frame passes: a body that is ready
//! whenever it is read (most answers, read whole at once) never reads the
//! clock nor arms a timer, and a caller that reads slowly is not taken for
//! an upstream that stalls.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Frame, SizeHint};

use crate::body::{self, Body, BoxError, WaitTimer};
use crate::grpc;

/// An upstream's timeouts for the body of its answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamTimeouts {
    /// From the headers to the first body frame.
    pub first_byte: Option<Duration>,
    /// Between two frames after the first.
    pub idle: Option<Duration>,
}

impl StreamTimeouts {
    /// The timeouts, if any is set.
    pub fn new(first_byte: Option<Duration>, idle: Option<Duration>) -> Option<Self> {
        (first_byte.is_some() || idle.is_some()).then_some(Self { first_byte, idle })
    }
}

/// Which timeout cut a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// No first frame within `first_byte_timeout`.
    FirstByte,
    /// No next frame within `stream_idle_timeout`.
    Idle,
}

impl Cut {
    /// The `kind` label of `breakwater_timeouts_total`.
    pub fn label(self) -> &'static str {
        match self {
            Cut::FirstByte => "first-byte",
            Cut::Idle => "stream-idle",
        }
    }

    /// The `x-breakwater-error` of a cut gRPC answer.
    pub fn reason(self) -> &'static str {
        match self {
            Cut::FirstByte => "first-byte-timeout",
            Cut::Idle => "stream-idle-timeout",
        }
    }
}

/// What happens when a stream is cut.
pub type OnCut = Box<dyn FnOnce(Cut) + Send>;

/// `body`, cut when it stalls longer than `timeouts` allow (`grpc`: end
/// it with a `DEADLINE_EXCEEDED` status); `on_cut` runs when it is.
pub fn cut_when_stalled(body: Body, timeouts: StreamTimeouts, grpc: bool, on_cut: OnCut) -> Body {
    body::boxed(Stalls {
        inner: body,
        timeouts,
        timer: WaitTimer::default(),
        started: false,
        grpc,
        on_cut: Some(on_cut),
        ended: false,
    })
}

struct Stalls {
    inner: Body,
    timeouts: StreamTimeouts,
    timer: WaitTimer,
    /// A first frame came.
    started: bool,
    grpc: bool,
    on_cut: Option<OnCut>,
    ended: bool,
}

impl Stalls {
    fn cut(&mut self) -> Result<Frame<Bytes>, BoxError> {
        self.ended = true;
        let (cut, after) = if self.started {
            (Cut::Idle, self.timeouts.idle)
        } else {
            (
                Cut::FirstByte,
                self.timeouts.first_byte.or(self.timeouts.idle),
            )
        };
        if let Some(on_cut) = self.on_cut.take() {
            on_cut(cut);
        }
        let after = after.unwrap_or_default();
        let message = match cut {
            Cut::FirstByte => format!("the upstream's answer sent no data within {after:?}"),
            Cut::Idle => format!("the upstream's answer stalled: no data for {after:?}"),
        };
        if !self.grpc {
            return Err(message.into());
        }
        let mut trailers = HeaderMap::new();
        trailers.insert(
            grpc::STATUS,
            HeaderValue::from(u16::from(grpc::DEADLINE_EXCEEDED)),
        );
        if let Ok(value) = HeaderValue::from_str(&grpc::percent_encode(&message)) {
            trailers.insert(grpc::MESSAGE, value);
        }
        trailers.insert(
            crate::edge::ERROR_HEADER,
            HeaderValue::from_static(cut.reason()),
        );
        Ok(Frame::trailers(trailers))
    }
}

impl http_body::Body for Stalls {
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
                self.started = true;
                self.timer.stop();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => {
                self.ended = other.is_none();
                Poll::Ready(other)
            }
            Poll::Pending => {
                let limit = match self.started {
                    false => self.timeouts.first_byte.or(self.timeouts.idle),
                    true => self.timeouts.idle,
                };
                let Some(limit) = limit else {
                    return Poll::Pending;
                };
                match self.timer.poll_wait(limit, cx) {
                    Poll::Ready(()) => Poll::Ready(Some(self.cut())),
                    Poll::Pending => Poll::Pending,
                }
            }
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
    use std::sync::{Arc, Mutex};
    use tokio::time::Instant;

    /// A body sending frame `i` after `gaps[i]` milliseconds.
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

    type Cuts = Arc<Mutex<Vec<Cut>>>;

    fn cut(
        gaps: &'static [u64],
        first_byte: Option<u64>,
        idle: Option<u64>,
        grpc: bool,
    ) -> (Body, Cuts) {
        let cuts = Cuts::default();
        let c = cuts.clone();
        let ms = |v: Option<u64>| v.map(Duration::from_millis);
        let timeouts = StreamTimeouts::new(ms(first_byte), ms(idle)).unwrap();
        let body = cut_when_stalled(
            frames(gaps),
            timeouts,
            grpc,
            Box::new(move |cut| c.lock().unwrap().push(cut)),
        );
        (body, cuts)
    }

    async fn data(body: &mut Body) -> Bytes {
        body.frame().await.unwrap().unwrap().into_data().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_keeps_coming_is_never_cut() {
        let (body, cuts) = cut(&[90, 90, 90, 90, 90, 90], None, Some(100), false);
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(
            all, "0;1;2;3;4;5;",
            "540 ms in all, never 100 ms without data"
        );
        assert!(cuts.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_is_cut_once_after_the_idle_time() {
        let (mut body, cuts) = cut(&[10, 10, 5_000], None, Some(100), false);
        let started = Instant::now();
        assert_eq!(data(&mut body).await, "0;");
        assert_eq!(data(&mut body).await, "1;");
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.to_string().contains("stalled"), "{error}");
        assert_eq!(started.elapsed(), Duration::from_millis(120));
        assert!(
            body.frame().await.is_none(),
            "the stream ends after the cut"
        );
        assert_eq!(*cuts.lock().unwrap(), [Cut::Idle]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_frame_has_its_own_timeout_then_the_idle_one_applies() {
        // A slow first token is allowed for up to 1 s; after it, 100 ms.
        let (mut body, cuts) = cut(&[900, 90, 5_000], Some(1_000), Some(100), false);
        let started = Instant::now();
        assert_eq!(data(&mut body).await, "0;");
        assert_eq!(data(&mut body).await, "1;");
        assert!(body.frame().await.unwrap().is_err());
        assert_eq!(started.elapsed(), Duration::from_millis(1_090));
        assert_eq!(*cuts.lock().unwrap(), [Cut::Idle]);

        let (mut body, cuts) = cut(&[5_000], Some(1_000), Some(100), false);
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.to_string().contains("no data within 1s"), "{error}");
        assert_eq!(started.elapsed(), Duration::from_millis(2_090));
        assert_eq!(*cuts.lock().unwrap(), [Cut::FirstByte]);
    }

    #[tokio::test(start_paused = true)]
    async fn with_only_a_first_byte_timeout_later_gaps_are_unbounded() {
        let (body, cuts) = cut(&[50, 3_000, 3_000], Some(100), None, false);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "0;1;2;");
        assert!(cuts.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_grpc_stream_ends_with_deadline_exceeded_in_its_trailers() {
        let (mut body, cuts) = cut(&[10, 5_000], None, Some(100), true);
        assert_eq!(data(&mut body).await, "0;");
        let trailers = body
            .frame()
            .await
            .unwrap()
            .expect("a status, not an error")
            .into_trailers()
            .unwrap();
        assert_eq!(trailers["grpc-status"], "4");
        assert_eq!(trailers["x-breakwater-error"], "stream-idle-timeout");
        let message = grpc::percent_decode(trailers["grpc-message"].to_str().unwrap()).unwrap();
        assert!(message.contains("no data for 100ms"), "{message}");
        assert!(body.frame().await.is_none());
        assert_eq!(*cuts.lock().unwrap(), [Cut::Idle]);
    }
}
