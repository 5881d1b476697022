//! Deadlines that keep a slow or silent HTTP client from holding a connection (and what its
//! request holds) forever, beside hyper's header-read timeout:
//!
//! - [`body_deadline`]: a request's body must arrive within `body_timeout` of its headers; a
//!   body that never ends, or dribbles, is cut off with `408 Request Timeout` and the
//!   connection closed;
//! - [`StallGuardedIo`]: a response write that makes no progress for `write_stall_timeout`
//!   (the client does not read) fails, and hyper closes the connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use hyper::rt::{Read, ReadBufCursor, Write};
use tokio::time::{Instant, Sleep};

use crate::ApiError;

/// Middleware: the request's body must be complete within the timeout given as state.
pub async fn body_deadline(
    State(timeout): State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    let deadline = Instant::now() + timeout;
    let expired = Arc::new(AtomicBool::new(false));
    let flag = expired.clone();
    let request = request.map(move |body| {
        let stream = futures::stream::unfold(Some(body.into_data_stream()), move |stream| {
            let flag = flag.clone();
            async move {
                let mut stream = stream?;
                match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(Some(item)) => Some((item, Some(stream))),
                    Ok(None) => None,
                    Err(_) => {
                        flag.store(true, Ordering::Relaxed);
                        let error = axum::Error::new(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "request body not complete in time",
                        ));
                        Some((Err(error), None))
                    }
                }
            }
        });
        Body::from_stream(stream)
    });
    let response = next.run(request).await;
    if !expired.load(Ordering::Relaxed) {
        return response;
    }
    let mut response = ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        format!(
            "the request body did not arrive within {} s (http_request_body_timeout_seconds)",
            timeout.as_secs()
        ),
    )
    .into_response();
    // The rest of the body is never read: the connection cannot carry another request.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// An HTTP connection's socket whose writes fail once they make no progress for a while (the
/// client does not read its response). Reads pass through.
pub struct StallGuardedIo<T> {
    inner: T,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> StallGuardedIo<T> {
    pub fn new(inner: T, timeout: Duration) -> Self {
        StallGuardedIo {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// Maps a pending write: starts the stall timer, or fails once it has run out.
    fn pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<R>> {
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read nothing of its response in time",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn outcome<R>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        match poll {
            Poll::Ready(result) => {
                self.stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => self.pending(cx),
        }
    }
}

impl<T: Read + Unpin> Read for StallGuardedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for StallGuardedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.outcome(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.outcome(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.outcome(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.outcome(cx, poll)
    }
}
