//! The one body type that flows through the sidecar.
//!
//! Request and response bodies are streamed, never collected. [`Body`]
//! names the few shapes the hot path needs without allocating: a body
//! straight from hyper, one whose first frame was read ahead, a replayable
//! request body, a small in-memory body; anything else is boxed. A body
//! can also hold the concurrency slot of its call, which is released when
//! the body ends or is dropped.
//!
//! Why not a boxed `dyn Body` alone? The benchmark counts the boxes: one
//! per request body and one or two per response body were a measurable
//! share of the sidecar's allocations.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

/// The error type carried by bodies and services.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A streamed HTTP body.
pub struct Body {
    kind: Kind,
    /// The call's concurrency slot, held until the body is done.
    permit: Option<OwnedSemaphorePermit>,
}

enum Kind {
    Empty,
    Full(Option<Bytes>),
    Incoming(Incoming),
    /// A frame read ahead (boxed: a frame is large, and this is the rare
    /// shape), then the rest.
    Prefixed(Option<Box<Frame<Bytes>>>, Incoming),
    /// Bytes read ahead (a JSON-RPC answer's start), then the rest.
    Ahead(Option<Bytes>, Box<Body>),
    /// Only trailers (boxed: a header map is large, and this is rare).
    Trailers(Option<Box<HeaderMap>>),
    Replay(ReplayBody),
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Body")
    }
}

impl Default for Body {
    fn default() -> Self {
        empty()
    }
}

impl Body {
    fn of(kind: Kind) -> Self {
        Self { kind, permit: None }
    }

    /// A body straight from hyper.
    pub fn incoming(incoming: Incoming) -> Self {
        Self::of(Kind::Incoming(incoming))
    }

    /// A replayable request body.
    pub fn replay(body: ReplayBody) -> Self {
        Self::of(Kind::Replay(body))
    }

    /// A body whose first frame was read ahead and is put back in front.
    pub fn prefixed(first: Frame<Bytes>, rest: Incoming) -> Self {
        Self::of(Kind::Prefixed(Some(Box::new(first)), rest))
    }

    /// The same body, holding `permit` until it ends.
    pub fn with_permit(mut self, permit: OwnedSemaphorePermit) -> Self {
        self.permit = Some(permit);
        self
    }
}

/// A body whose start, `read`, was read ahead and is put back in front
/// of `rest`.
pub fn ahead(read: Bytes, rest: Body) -> Body {
    Body::of(Kind::Ahead(
        (!read.is_empty()).then_some(read),
        Box::new(rest),
    ))
}

/// A body of only `trailers`.
pub fn trailers(trailers: HeaderMap) -> Body {
    Body::of(Kind::Trailers(Some(Box::new(trailers))))
}

/// An empty body.
pub fn empty() -> Body {
    Body::of(Kind::Empty)
}

/// A body holding `bytes` in one frame.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    let bytes = bytes.into();
    Body::of(Kind::Full((!bytes.is_empty()).then_some(bytes)))
}

/// A whole answer: a status, a content type and a body.
pub fn typed(
    status: http::StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> http::Response<Body> {
    let mut response = http::Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    Body::of(Kind::Boxed(body.map_err(Into::into).boxed_unsync()))
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = match &mut self.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Incoming(incoming) => Pin::new(incoming).poll_frame(cx).map_err(Into::into),
            Kind::Prefixed(first, rest) => match first.take() {
                Some(frame) => Poll::Ready(Some(Ok(*frame))),
                None => Pin::new(rest).poll_frame(cx).map_err(Into::into),
            },
            Kind::Ahead(read, rest) => match read.take() {
                Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                None => Pin::new(&mut **rest).poll_frame(cx),
            },
            Kind::Trailers(trailers) => {
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(*t))))
            }
            Kind::Replay(body) => Pin::new(body).poll_frame(cx),
            Kind::Boxed(body) => Pin::new(body).poll_frame(cx),
        };
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.permit = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Incoming(incoming) => incoming.is_end_stream(),
            Kind::Prefixed(first, rest) => first.is_none() && rest.is_end_stream(),
            Kind::Ahead(read, rest) => read.is_none() && rest.is_end_stream(),
            Kind::Trailers(trailers) => trailers.is_none(),
            Kind::Replay(body) => body.is_end_stream(),
            Kind::Boxed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Incoming(incoming) => incoming.size_hint(),
            Kind::Prefixed(..) | Kind::Trailers(_) => SizeHint::default(),
            Kind::Ahead(read, rest) => {
                let read = read.as_ref().map_or(0, |b| b.len() as u64);
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + read);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + read);
                }
                hint
            }
            Kind::Replay(body) => body.size_hint(),
            Kind::Boxed(body) => body.size_hint(),
        }
    }
}

// A request body that can be sent again.
//
// Why not collect the body before the first attempt? Because the sidecar
// must not wait for a body it could be streaming: a client-streaming gRPC
// call may keep its request open until it sees answers. Instead the first
// attempt streams the body through and a copy of each frame is kept, up to
// `buffer_limit` bytes. A later attempt replays the copy and then goes on
// reading the original where the last attempt left it. Once the body has
// outgrown the limit, the copy is dropped and the request can no longer
// be retried ([`ReplayBody::can_replay`]).
//
// Attempts read one after another (a retry starts after the previous
// attempt ended). Hedged attempts run at the same time, so hedging waits
// until the whole body is in the copy ([`ReplayBody::is_complete`]).
//
// The source is the caller's body, so its failures are the caller's: a
// body that broke off (a malformed chunk, an upload the caller aborted)
// or stalled longer than the idle timeout is recorded, and the attempt
// that was sending it reports the caller's fault, not the upstream's
// ([`Completion::source_failure`]). The idle timer is armed only when
// the source makes a reader wait, as for answers (`resilience::stream`).

#[derive(Debug)]
struct Shared {
    /// The original body, until it ends.
    source: Option<Body>,
    /// Every data frame read so far, while under the limit.
    chunks: Vec<Bytes>,
    buffered: u64,
    limit: u64,
    /// The body outgrew the limit (or failed): no replay possible.
    overflowed: bool,
    /// The source ended (trailers, if any, are kept).
    done: bool,
    trailers: Option<HeaderMap>,
    /// The original length, when the caller declared it.
    exact: Option<u64>,
    /// How long the source may keep a reader waiting.
    idle: Option<Duration>,
    timer: WaitTimer,
    /// How the source failed, if it did.
    failure: Option<SourceFailure>,
}

/// How the caller's request body failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceFailure {
    /// It broke off, for this reason.
    Broke(String),
    /// No frame came for this long.
    Stalled(Duration),
}

/// One attempt's view of a replayable body.
#[derive(Debug)]
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    /// Next chunk of the copy this reader will yield.
    position: usize,
    trailers_sent: bool,
}

impl ReplayBody {
    /// Wraps `body`, keeping a copy of at most `limit` bytes, and failing
    /// it when it keeps a reader waiting longer than `idle`.
    pub fn new(body: Body, limit: u64, idle: Option<Duration>) -> Self {
        let done = body.is_end_stream();
        let exact = body.size_hint().exact();
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source: (!done).then_some(body),
                chunks: Vec::new(),
                buffered: 0,
                limit,
                overflowed: exact.is_some_and(|n| n > limit),
                done,
                trailers: None,
                exact,
                idle,
                timer: WaitTimer::default(),
                failure: None,
            })),
            position: 0,
            trailers_sent: false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh reader for another attempt, starting from the beginning.
    pub fn replay(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            position: 0,
            trailers_sent: false,
        }
    }

    /// Whether another attempt can be sent the whole body.
    pub fn can_replay(&self) -> bool {
        !self.lock().overflowed
    }

    /// Whether the whole body is in the copy.
    pub fn is_complete(&self) -> bool {
        self.completion().is_complete()
    }

    /// A handle that tells, later, whether the body has been read whole.
    pub fn completion(&self) -> Completion {
        Completion(Some(self.shared.clone()))
    }
}

/// Tells whether a request body has been read to its end (and kept):
/// given to each attempt so the client can tell a unary-like call,
/// whose request is complete when its answer starts, from a streaming one.
#[derive(Debug, Clone)]
pub struct Completion(Option<Arc<Mutex<Shared>>>);

impl Completion {
    /// A request without a body: complete from the start.
    pub fn complete() -> Self {
        Self(None)
    }

    /// Whether the whole body has been read and kept.
    pub fn is_complete(&self) -> bool {
        let Some(shared) = &self.0 else {
            return true;
        };
        let shared = shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.done && !shared.overflowed
    }

    /// How the caller's body failed, if it did: an attempt that failed
    /// while sending it failed because of the caller.
    pub fn source_failure(&self) -> Option<SourceFailure> {
        let shared = self.0.as_ref()?;
        let shared = shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.failure.clone()
    }
}

impl http_body::Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut shared = this.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(chunk) = shared.chunks.get(this.position) {
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if shared.done {
            if this.trailers_sent {
                return Poll::Ready(None);
            }
            this.trailers_sent = true;
            return Poll::Ready(shared.trailers.clone().map(|t| Ok(Frame::trailers(t))));
        }
        if let Some(failure) = &shared.failure {
            return Poll::Ready(Some(Err(failure.to_string().into())));
        }
        let Some(source) = shared.source.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(source).poll_frame(cx);
        if !matches!(polled, Poll::Pending) {
            shared.timer.stop();
        }
        match polled {
            Poll::Pending => wait(&mut shared, cx),
            Poll::Ready(None) => {
                shared.done = true;
                shared.source = None;
                this.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => {
                shared.overflowed = true;
                shared.chunks.clear();
                shared.source = None;
                shared.failure = Some(SourceFailure::Broke(causes(&*error)));
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    record(&mut shared, data);
                    this.position = shared.chunks.len();
                    // Peers stop polling a body that says it has ended, so
                    // the end is noticed here, not only on `None`.
                    if shared.source.as_ref().is_some_and(|s| s.is_end_stream()) {
                        shared.done = true;
                        shared.source = None;
                        this.trailers_sent = true;
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    shared.trailers = Some(trailers.clone());
                    shared.done = true;
                    shared.source = None;
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.lock();
        shared.done
            && self.position >= shared.chunks.len()
            && (self.trailers_sent || shared.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        match self.lock().exact {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// An error and its causes, in one line.
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(error), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// The source made a reader wait: fails the body when it waited longer
/// than the idle timeout.
fn wait(shared: &mut Shared, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    let Some(idle) = shared.idle else {
        return Poll::Pending;
    };
    if shared.timer.poll_wait(idle, cx).is_pending() {
        return Poll::Pending;
    }
    let failure = SourceFailure::Stalled(idle);
    let error = failure.to_string().into();
    shared.failure = Some(failure);
    shared.overflowed = true;
    shared.chunks.clear();
    shared.source = None;
    Poll::Ready(Some(Err(error)))
}

/// Times how long a body keeps its reader waiting: armed when a wait
/// starts (no clock read while frames are ready), stopped when a frame
/// comes. The timer is made at the first wait and reused after.
#[derive(Debug, Default)]
pub(crate) struct WaitTimer {
    timer: Option<Pin<Box<Sleep>>>,
    /// Armed for the current wait.
    waiting: bool,
}

impl WaitTimer {
    /// The body has nothing yet: ready once this wait has lasted `limit`.
    pub(crate) fn poll_wait(&mut self, limit: Duration, cx: &mut Context<'_>) -> Poll<()> {
        if !self.waiting {
            let at = Instant::now() + limit;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(at),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
            self.waiting = true;
        }
        match &mut self.timer {
            Some(timer) => timer.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }

    /// A frame came: the wait is over.
    pub(crate) fn stop(&mut self) {
        self.waiting = false;
    }
}

impl std::fmt::Display for SourceFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceFailure::Broke(reason) => {
                write!(f, "the caller's request body broke off: {reason}")
            }
            SourceFailure::Stalled(after) => write!(
                f,
                "the caller's request body stalled: no data for {}",
                humantime::format_duration(*after)
            ),
        }
    }
}

/// Keeps a copy of `data` unless the body has outgrown the limit.
fn record(shared: &mut Shared, data: &Bytes) {
    if shared.overflowed {
        return;
    }
    shared.buffered += data.len() as u64;
    if shared.buffered > shared.limit {
        shared.overflowed = true;
        shared.chunks = Vec::new();
    } else {
        shared.chunks.push(data.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::Body;
    use super::*;
    use http_body_util::StreamBody;

    #[tokio::test]
    async fn a_permit_is_released_when_the_body_ends() {
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let permit = slots.clone().try_acquire_owned().unwrap();
        let body = full("answer").with_permit(permit);
        assert_eq!(slots.available_permits(), 0);
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "answer");
        assert_eq!(slots.available_permits(), 1);
        let permit = slots.clone().try_acquire_owned().unwrap();
        drop(full("dropped unread").with_permit(permit));
        assert_eq!(slots.available_permits(), 1);
    }

    #[test]
    fn sizes_and_ends() {
        assert!(empty().is_end_stream());
        assert!(full("").is_end_stream());
        assert_eq!(full("four").size_hint().exact(), Some(4));
    }

    fn streamed(chunks: &[&'static [u8]], trailers: bool) -> Body {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("x-sum", "9".parse().unwrap());
            frames.push(Ok(Frame::trailers(t)));
        }
        boxed(StreamBody::new(tokio_stream::iter(frames)))
    }

    #[tokio::test]
    async fn a_second_reader_replays_everything_the_first_read() {
        let first = ReplayBody::new(streamed(&[b"abc", b"def"], true), 1024, None);
        let second = first.replay();
        let got = first.collect().await.unwrap();
        assert_eq!(got.trailers().unwrap()["x-sum"], "9");
        assert_eq!(got.to_bytes(), "abcdef");
        assert!(second.is_complete());
        let again = second.collect().await.unwrap();
        assert_eq!(again.trailers().unwrap()["x-sum"], "9");
        assert_eq!(again.to_bytes(), "abcdef");
    }

    #[tokio::test]
    async fn a_retry_after_a_partial_read_continues_from_the_source() {
        let mut first = ReplayBody::new(streamed(&[b"ab", b"cd", b"ef"], false), 1024, None);
        let second = first.replay();
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        drop(first);
        assert!(!second.is_complete());
        assert!(second.can_replay());
        assert_eq!(second.collect().await.unwrap().to_bytes(), "abcdef");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_streams_but_cannot_be_replayed() {
        let first = ReplayBody::new(streamed(&[b"0123", b"4567", b"89"], false), 6, None);
        let handle = first.replay();
        assert_eq!(first.collect().await.unwrap().to_bytes(), "0123456789");
        assert!(!handle.can_replay());
        let declared = ReplayBody::new(full(vec![0u8; 100]), 10, None);
        assert!(
            !declared.can_replay(),
            "a declared length over the limit is known at once"
        );
    }

    #[tokio::test]
    async fn the_end_is_noticed_with_the_last_frame() {
        let mut reader = ReplayBody::new(full("all of it"), 64, None);
        let frame = reader.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "all of it");
        assert!(
            reader.is_complete(),
            "complete without polling past the end"
        );
        assert!(reader.is_end_stream());
    }

    #[tokio::test]
    async fn empty_bodies_are_complete_at_once_and_keep_their_length() {
        let empty = ReplayBody::new(empty(), 10, None);
        assert!(empty.is_complete());
        assert!(empty.is_end_stream());
        let full = ReplayBody::new(full("12345"), 10, None);
        assert_eq!(full.size_hint().exact(), Some(5));
    }

    #[tokio::test]
    async fn a_source_that_breaks_is_the_callers_failure() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err("bad chunk".into()),
        ];
        let reader = ReplayBody::new(boxed(StreamBody::new(tokio_stream::iter(frames))), 64, None);
        let completion = reader.completion();
        assert_eq!(completion.source_failure(), None);
        assert!(reader.collect().await.is_err());
        assert_eq!(
            completion.source_failure(),
            Some(SourceFailure::Broke("bad chunk".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_that_stalls_past_the_idle_timeout_fails() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        tx.send(Ok(Frame::data(Bytes::from_static(b"ab"))))
            .await
            .unwrap();
        let source = boxed(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ));
        let mut reader = ReplayBody::new(source, 64, Some(Duration::from_millis(200)));
        let completion = reader.completion();
        assert!(reader.frame().await.unwrap().is_ok());
        let started = Instant::now();
        let error = reader.frame().await.unwrap().unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(200));
        assert!(error.to_string().contains("stalled"), "{error}");
        assert_eq!(
            completion.source_failure(),
            Some(SourceFailure::Stalled(Duration::from_millis(200)))
        );
        drop(tx);
    }
}
