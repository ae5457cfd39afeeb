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

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;

use crate::resilience::retry::replay::ReplayBody;

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
            Kind::Replay(body) => body.is_end_stream(),
            Kind::Boxed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Incoming(incoming) => incoming.size_hint(),
            Kind::Prefixed(..) => SizeHint::default(),
            Kind::Replay(body) => body.size_hint(),
            Kind::Boxed(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use std::sync::Arc;

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
}
