//! The truncate fault: an answer cut after a number of body bytes.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use super::FaultKind;
use crate::body::{self, Body, BoxError};
use crate::telemetry::metrics::UpstreamMetrics;

/// Cuts `body` after `after` bytes: the caller gets that many bytes, then
/// the stream fails (an HTTP/2 reset, a closed HTTP/1.1 connection). A
/// body shorter than that passes whole.
pub fn truncate(body: Body, after: u64, metrics: UpstreamMetrics) -> Body {
    body::boxed(Truncated {
        inner: body,
        left: after,
        state: Cut::Passing,
        metrics,
    })
}

struct Truncated {
    inner: Body,
    left: u64,
    state: Cut,
    metrics: UpstreamMetrics,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Bytes pass until `left` runs out.
    Passing,
    /// The last bytes were passed: yield once, so that the server flushes
    /// them (hyper drops its unflushed buffer when a body fails).
    Flushing,
    /// The stream fails.
    Failed,
}

impl http_body::Body for Truncated {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.state {
            Cut::Passing => {}
            Cut::Flushing => {
                self.state = Cut::Failed;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Cut::Failed => {
                return Poll::Ready(Some(Err("injected fault: answer truncated".into())));
            }
        }
        if self.left == 0 {
            self.state = Cut::Flushing;
            self.metrics.fault(FaultKind::Truncate.label());
            return self.poll_frame(cx);
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let Some(data) = frame.data_ref() else {
            return Poll::Ready(Some(Ok(frame)));
        };
        let len = data.len() as u64;
        if len < self.left {
            self.left -= len;
            return Poll::Ready(Some(Ok(frame)));
        }
        let keep = self.left as usize;
        let mut data = frame.into_data().expect("checked above");
        self.left = 0;
        self.state = Cut::Flushing;
        self.metrics.fault(FaultKind::Truncate.label());
        Poll::Ready(Some(Ok(Frame::data(data.split_to(keep)))))
    }

    fn is_end_stream(&self) -> bool {
        self.state == Cut::Passing && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
