//! What an answer's stream may do after its headers: stall (bounded by
//! `first_byte_timeout` and `stream_idle_timeout`) or break off (the
//! upstream reset it, closed its connection, or sent less than it
//! declared). Either way the caller sees the stream end at once, with
//! what happened, and the upstream is held to account: a cut or broken
//! stream is counted and reported to the circuit breaker as a reset, so an
//! upstream that always truncates its answers does not look healthy.
//!
//! `first_byte_timeout` bounds the wait from an answer's headers to its
//! first body frame (a model still reading its prompt);
//! `stream_idle_timeout` bounds the gap between two frames after that (an
//! LLM's server-sent events, a gRPC server stream).
//!
//! - gRPC: the answer ends with trailers, as a status and not a reset:
//!   `grpc-status: 4` (`DEADLINE_EXCEEDED`) for a stall, `14`
//!   (`UNAVAILABLE`) for a stream the upstream broke or ended without a
//!   status; a `grpc-message` that says what happened, and
//!   `x-breakwater-error`. The headers have gone, so the trailers are
//!   where the status goes.
//! - Other HTTP: the body fails, which the caller sees as an HTTP/2
//!   `RST_STREAM` or an HTTP/1.1 body cut short.
//!
//! Counted in `breakwater_timeouts_total{kind="first-byte"}` or
//! `{kind="stream-idle"}`, and `breakwater_broken_streams_total{kind=
//! "truncated"}` or `{kind="no-status"}`. The idle timer restarts with
//! every frame, so a long answer that keeps coming is never cut, whatever
//! its length.
//!
//! The timer starts when the upstream makes the stream wait (its body is
//! polled and has nothing), not when a frame passes: a body that is ready
//! whenever it is read (most answers, read whole at once) never reads the
//! clock nor arms a timer, and a caller that reads slowly is not taken for
//! an upstream that stalls.
//!
//! The same `stream_idle_timeout` bounds the other side: a caller that
//! stops reading (`transport::pace`) has its stream cut after that long
//! without asking for the next frame, so that it frees its slot. That cut
//! is the caller's: counted in `breakwater_timeouts_total{kind=
//! "caller-idle"}`, never against the upstream (the breaker hears of the
//! answer as the success it was until then, as of a caller that left).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Frame, SizeHint};

use crate::body::{self, Body, BoxError, WaitTimer};
use crate::grpc;
use crate::transport::pace;

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

/// What ended a stream early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// No first frame within `first_byte_timeout`.
    FirstByte,
    /// No next frame within `stream_idle_timeout`.
    Idle,
    /// The upstream broke the stream off.
    Truncated,
    /// A gRPC answer ended without a status.
    NoStatus,
    /// The caller stopped reading for `stream_idle_timeout`
    /// (`transport::pace`): its fault, not the upstream's.
    Caller,
}

impl Cut {
    /// The `kind` label of `breakwater_timeouts_total` (a stall) or of
    /// `breakwater_broken_streams_total`.
    pub fn label(self) -> &'static str {
        match self {
            Cut::FirstByte => "first-byte",
            Cut::Idle => "stream-idle",
            Cut::Truncated => "truncated",
            Cut::NoStatus => "no-status",
            Cut::Caller => "caller-idle",
        }
    }

    /// The `x-breakwater-error` of a cut gRPC answer.
    pub fn reason(self) -> &'static str {
        match self {
            Cut::FirstByte => "first-byte-timeout",
            Cut::Idle => "stream-idle-timeout",
            Cut::Truncated | Cut::NoStatus => "truncated",
            Cut::Caller => "caller-idle",
        }
    }

    /// Whether a timeout cut it (else the upstream broke it).
    pub fn is_timeout(self) -> bool {
        matches!(self, Cut::FirstByte | Cut::Idle)
    }
}

/// The error a stream the sidecar cut for stalling ends with: what
/// happened, in words, and the cut (which a JSON-RPC call's answer turns
/// into a last error event, `jsonrpc::close`).
#[derive(Debug)]
pub struct StreamCut {
    /// What cut it.
    pub cut: Cut,
    /// What happened.
    pub message: String,
}

impl std::fmt::Display for StreamCut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StreamCut {}

/// What happens when a stream ends: with the cut that ended it, or
/// `None` when it ended whole or the caller dropped it.
pub type OnEnd = Box<dyn FnOnce(Option<Cut>) + Send>;

/// `body`, watched: cut when it stalls longer than `timeouts` allow (if
/// any), reported when it breaks off. `grpc`: the answer is gRPC, ended
/// with a status rather than an error, and `status_seen` says its headers
/// carried one already (a trailers-only answer), so that an end without
/// trailers is not a broken stream. `on_end` runs once, when it ends.
pub fn watch(
    body: Body,
    timeouts: Option<StreamTimeouts>,
    grpc: bool,
    status_seen: bool,
    on_end: OnEnd,
) -> Body {
    body::boxed(Watched {
        inner: body,
        timeouts: timeouts.unwrap_or(StreamTimeouts {
            first_byte: None,
            idle: None,
        }),
        timer: WaitTimer::default(),
        started: false,
        grpc,
        status_seen: status_seen || !grpc,
        on_end: Some(on_end),
        ended: false,
    })
}

struct Watched {
    inner: Body,
    timeouts: StreamTimeouts,
    timer: WaitTimer,
    /// A first frame came.
    started: bool,
    grpc: bool,
    /// A gRPC status came (always true for other answers).
    status_seen: bool,
    on_end: Option<OnEnd>,
    ended: bool,
}

impl Watched {
    fn cut(&mut self, cut: Cut, error: Option<BoxError>) -> Result<Frame<Bytes>, BoxError> {
        self.ended = true;
        if let Some(on_end) = self.on_end.take() {
            on_end(Some(cut));
        }
        let after = |d: Option<Duration>| humantime::format_duration(d.unwrap_or_default());
        let message = match cut {
            Cut::FirstByte => format!(
                "the upstream's answer sent no data within {}",
                after(self.timeouts.first_byte.or(self.timeouts.idle))
            ),
            Cut::Idle => format!(
                "the upstream's answer stalled: no data for {}",
                after(self.timeouts.idle)
            ),
            Cut::Truncated => format!(
                "the upstream broke its answer off: {}",
                error
                    .as_deref()
                    .map(|e| crate::error::error_text(e))
                    .unwrap_or_default()
            ),
            Cut::NoStatus => "the upstream's answer ended without a gRPC status".to_owned(),
            Cut::Caller => format!("the caller read nothing for {}", after(self.timeouts.idle)),
        };
        if !self.grpc {
            return Err(error.unwrap_or_else(|| Box::new(StreamCut { cut, message })));
        }
        let code = match cut.is_timeout() {
            true => grpc::DEADLINE_EXCEEDED,
            false => grpc::UNAVAILABLE,
        };
        let mut trailers = HeaderMap::new();
        trailers.insert(grpc::STATUS, HeaderValue::from(u16::from(code)));
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

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(on_end) = self.on_end.take() {
            on_end(pace::cut().then_some(Cut::Caller));
        }
        pace::asked();
    }
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        pace::asked();
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.started = true;
                self.timer.stop();
                if frame.is_trailers() {
                    self.status_seen = true;
                } else if let Some(idle) = self.timeouts.idle {
                    // The caller has as long to read it as the upstream
                    // had to send it.
                    pace::handed(idle);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                Poll::Ready(Some(self.cut(Cut::Truncated, Some(error))))
            }
            Poll::Ready(None) if !self.status_seen => {
                Poll::Ready(Some(self.cut(Cut::NoStatus, None)))
            }
            Poll::Ready(None) => {
                self.ended = true;
                if let Some(on_end) = self.on_end.take() {
                    on_end(None);
                }
                Poll::Ready(None)
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
                    Poll::Ready(()) => {
                        let cut = match self.started {
                            true => Cut::Idle,
                            false => Cut::FirstByte,
                        };
                        Poll::Ready(Some(self.cut(cut, None)))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // A gRPC answer without its status yet is not over: the end is
        // read, so that a missing status can be put in.
        self.ended || (self.status_seen && self.inner.is_end_stream())
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
        let body = watch(
            frames(gaps),
            Some(timeouts),
            grpc,
            true,
            Box::new(move |cut| c.lock().unwrap().extend(cut)),
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

    #[tokio::test]
    async fn a_broken_or_statusless_grpc_answer_ends_unavailable_and_every_end_is_reported_once() {
        let ends = Arc::new(Mutex::new(Vec::new()));
        let watched = |frames: Vec<Result<Frame<Bytes>, BoxError>>, status_seen: bool| {
            let ends = ends.clone();
            watch(
                body::boxed(StreamBody::new(tokio_stream::iter(frames))),
                None,
                true,
                status_seen,
                Box::new(move |cut| ends.lock().unwrap().push(cut)),
            )
        };
        let message = || Ok(Frame::data(Bytes::from_static(b"m")));
        let mut broken = watched(vec![message(), Err("reset".into())], false);
        assert_eq!(data(&mut broken).await, "m");
        let trailers = broken
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        assert_eq!(trailers["grpc-status"], "14");
        assert_eq!(trailers["x-breakwater-error"], "truncated");
        let statusless = watched(vec![message()], false);
        assert!(
            !http_body::Body::is_end_stream(&statusless),
            "the end is read, to add a status"
        );
        let got = statusless.collect().await.unwrap();
        assert_eq!(got.trailers().unwrap()["grpc-status"], "14");
        let whole = watched(vec![message()], true);
        assert_eq!(whole.collect().await.unwrap().to_bytes(), "m");
        drop(watched(vec![message()], true));
        assert_eq!(
            *ends.lock().unwrap(),
            [Some(Cut::Truncated), Some(Cut::NoStatus), None, None]
        );
    }
}
