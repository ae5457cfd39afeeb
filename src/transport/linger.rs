//! Early answers from HTTP/1.1 upstreams. An upstream may answer before
//! it has read the whole request (a `413` for a body too large, a `401`,
//! a `200` that needs no more) and close its connection; the rest of the
//! request then meets a reset. hyper fails the whole exchange on that
//! write error, though the answer is already in the socket, and the
//! caller would get `502 upstream-reset` for a request the upstream
//! answered, counted against it by the breaker.
//!
//! [`Lingering`] keeps the answer: once a write finds the connection
//! reset, later writes are dropped as if sent, so hyper goes on to read
//! what the upstream answered. A connection reset with no answer still
//! fails, on the read that finds the reset; a reset connection is never
//! reused, since its reads fail. Envoy forwards early answers the same
//! way.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::TryFutureExt;
use futures_util::future::MapOk;
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};

/// Connects as `C` does, each connection [`Lingering`].
#[derive(Debug, Clone)]
pub struct LingeringConnector<C>(pub C);

impl<C> tower::Service<Uri> for LingeringConnector<C>
where
    C: tower::Service<Uri>,
{
    type Response = Lingering<C::Response>;
    type Error = C::Error;
    type Future = MapOk<C::Future, fn(C::Response) -> Lingering<C::Response>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        self.0.call(uri).map_ok(Lingering::new)
    }
}

/// A connection whose writes are dropped once the peer reset it.
#[derive(Debug)]
pub struct Lingering<T> {
    inner: T,
    reset: bool,
}

impl<T> Lingering<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            reset: false,
        }
    }

    /// A write's outcome, with a reset taken as the end of writing.
    fn written<R>(&mut self, polled: Poll<io::Result<R>>, dropped: R) -> Poll<io::Result<R>> {
        match polled {
            Poll::Ready(Err(e)) if is_reset(&e) => {
                self.reset = true;
                Poll::Ready(Ok(dropped))
            }
            other => other,
        }
    }
}

fn is_reset(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

impl<T: Connection> Connection for Lingering<T> {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Lingering<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Lingering<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.reset {
            return Poll::Ready(Ok(buf.len()));
        }
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.written(polled, buf.len())
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        if self.reset {
            return Poll::Ready(Ok(len));
        }
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.written(polled, len)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.reset {
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.written(polled, ())
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.reset {
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.written(polled, ())
    }
}
