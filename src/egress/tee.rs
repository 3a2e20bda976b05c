//! A response body that streams to the app unchanged while keeping a copy (up to a
//! limit) for a cut-over shadow's comparison, handed over when the body ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http_body::{Body as _, Frame, SizeHint};
use tokio::sync::oneshot;

use crate::egress::{Body, BoxError};

/// Streams `inner`; once it ends, sends its status and bytes (`None` past `limit`). A
/// body dropped before its end (the app went away) or failing sends nothing.
pub struct Tee {
    inner: Body,
    kept: Option<BytesMut>,
    limit: usize,
    status: StatusCode,
    tx: Option<oneshot::Sender<(StatusCode, Option<Bytes>)>>,
}

impl Tee {
    pub fn new(inner: Body, limit: usize, status: StatusCode, tx: oneshot::Sender<(StatusCode, Option<Bytes>)>) -> Self {
        Self { inner, kept: Some(BytesMut::new()), limit, status, tx: Some(tx) }
    }

    fn keep(&mut self, chunk: &[u8]) {
        if let Some(b) = &mut self.kept {
            if b.len() + chunk.len() > self.limit {
                self.kept = None;
            } else {
                b.extend_from_slice(chunk);
            }
        }
    }

    fn end(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.status, self.kept.take().map(BytesMut::freeze)));
        }
    }
}

impl http_body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.keep(d);
                }
                if this.inner.is_end_stream() {
                    this.end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.tx = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.end();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tee {
    // hyper stops polling a body once `is_end_stream` says so, and an empty body is never
    // polled at all: what was read by then is the whole answer.
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.end();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn the_copy_is_the_body_until_the_limit() {
        let (tx, rx) = oneshot::channel();
        let body = Tee::new(crate::egress::full("hello"), 10, StatusCode::OK, tx).collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");
        assert_eq!(rx.await.unwrap(), (StatusCode::OK, Some(Bytes::from("hello"))));
        let (tx, rx) = oneshot::channel();
        let body = Tee::new(crate::egress::full("hello"), 3, StatusCode::OK, tx).collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");
        assert_eq!(rx.await.unwrap(), (StatusCode::OK, None));
    }
}
