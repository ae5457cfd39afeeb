//! The one body type that flows through the sidecar.
//!
//! Request and response bodies are streamed, never collected: a boxed
//! [`http_body::Body`] lets upstream bodies, synthetic answers and (later)
//! replayable request bodies share one type without generic plumbing in
//! every layer.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

/// The error type carried by bodies and services.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A streamed HTTP body.
///
/// A named type rather than an alias of `UnsyncBoxBody<Bytes, BoxError>`:
/// the alias hides a `dyn Error` whose elided lifetime makes the compiler
/// fail to prove `Send` for async code generic over services of it.
pub struct Body(UnsyncBoxBody<Bytes, BoxError>);

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

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

/// An empty body.
pub fn empty() -> Body {
    Body(Empty::new().map_err(|never| match never {}).boxed_unsync())
}

/// A body holding `bytes` in one frame.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Body(
        Full::new(bytes.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    )
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    Body(body.map_err(Into::into).boxed_unsync())
}

/// A body that holds `guard` until the body is finished or dropped: a
/// concurrency permit or an in-flight marker lives exactly as long as the
/// answer is being streamed.
pub fn with_guard<G: Send + Unpin + 'static>(body: Body, guard: G) -> Body {
    Body(
        Guarded {
            body,
            guard: Some(guard),
        }
        .boxed_unsync(),
    )
}

struct Guarded<G> {
    body: Body,
    guard: Option<G>,
}

impl<G: Unpin> http_body::Body for Guarded<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A body whose first frame was already read (to look at it) and is put
/// back in front of the rest.
pub fn prefixed(first: Option<http_body::Frame<Bytes>>, rest: Body) -> Body {
    Body(Prefixed { first, rest }.boxed_unsync())
}

struct Prefixed {
    first: Option<http_body::Frame<Bytes>>,
    rest: Body,
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.first.take() {
            return std::task::Poll::Ready(Some(Ok(frame)));
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }
}
