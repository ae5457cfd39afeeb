//! The capture of a request body: teed as the upstream reads it, and the
//! unread rest read from the caller after a failure.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::Notify;

use super::REST_OF_BODY;
use crate::body::{self, Body, BoxError};

/// What has been read of a request body.
#[derive(Debug, Default)]
struct Captured {
    bytes: BytesMut,
    truncated: bool,
    ended: bool,
    /// The unread rest, put back when the body was dropped early.
    rest: Option<Body>,
    dropped: bool,
}

/// The capture of one request body.
#[derive(Debug, Clone)]
pub struct Capture {
    shared: Arc<Mutex<Captured>>,
    dropped: Arc<Notify>,
    max: usize,
}

impl Capture {
    /// A capture keeping up to `max` bytes.
    pub fn new(max: u64) -> Self {
        Self {
            shared: Arc::default(),
            dropped: Arc::new(Notify::new()),
            max: usize::try_from(max).unwrap_or(usize::MAX),
        }
    }

    /// Wraps the request body so that what is read is kept.
    pub fn wrap(&self, incoming: Body) -> Body {
        body::boxed(CaptureBody {
            inner: Some(incoming),
            capture: self.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Captured> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The body as far as it can be had: what was read, then the rest from
    /// the caller (within a second). `true` when it is not whole.
    pub async fn finish(self) -> (Bytes, bool) {
        let waited = tokio::time::timeout(REST_OF_BODY, async {
            loop {
                let notified = self.dropped.notified();
                let rest = {
                    let mut c = self.lock();
                    if c.ended || c.truncated {
                        return;
                    }
                    if !c.dropped {
                        None
                    } else {
                        match c.rest.take() {
                            Some(rest) => Some(rest),
                            None => return,
                        }
                    }
                };
                match rest {
                    None => notified.await,
                    Some(mut rest) => {
                        while let Some(frame) = rest.frame().await {
                            let Ok(frame) = frame else { return };
                            if let Ok(data) = frame.into_data() {
                                let mut c = self.lock();
                                let max = self.max;
                                keep(&mut c, &data, max);
                                if c.truncated {
                                    return;
                                }
                            }
                        }
                        self.lock().ended = true;
                        return;
                    }
                }
            }
        })
        .await;
        let mut c = self.lock();
        let whole = waited.is_ok() && c.ended && !c.truncated;
        (std::mem::take(&mut c.bytes).freeze(), !whole)
    }
}

fn keep(c: &mut Captured, data: &Bytes, max: usize) {
    let room = max.saturating_sub(c.bytes.len());
    if data.len() > room {
        c.bytes.extend_from_slice(&data[..room]);
        c.truncated = true;
    } else {
        c.bytes.extend_from_slice(data);
    }
}

/// A request body that keeps a copy of what is read.
struct CaptureBody {
    inner: Option<Body>,
    capture: Capture,
}

impl http_body::Body for CaptureBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let max = self.capture.max;
                    let mut c = self.capture.lock();
                    if !c.truncated {
                        keep(&mut c, data, max);
                    }
                }
            }
            Poll::Ready(None) => self.capture.lock().ended = true,
            _ => {}
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|i| i.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map(|i| i.size_hint())
            .unwrap_or_default()
    }
}

impl Drop for CaptureBody {
    fn drop(&mut self) {
        let mut c = self.capture.lock();
        if !c.ended {
            c.rest = self.inner.take();
        }
        c.dropped = true;
        drop(c);
        self.capture.dropped.notify_waiters();
    }
}
