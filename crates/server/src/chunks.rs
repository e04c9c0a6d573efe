//! A response body of byte chunks already in memory, sent one by one: the Bundles written by
//! [`search::BundleBytes`] (a search page, a history page), whose resources are their stored
//! JSON moved in as chunks of their own. Its exact length is known, so the answer carries a
//! `Content-Length`; each chunk is freed once hyper has written it, not at the end of the
//! answer, and no chunk is copied into one contiguous buffer first.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};

/// The chunks of a body, front first.
pub struct ChunksBody {
    chunks: VecDeque<Bytes>,
    remaining: u64,
}

impl ChunksBody {
    /// A body of `chunks` in order (empty chunks left out).
    pub fn new(chunks: Vec<Vec<u8>>) -> ChunksBody {
        let chunks: VecDeque<Bytes> = chunks
            .into_iter()
            .filter(|c| !c.is_empty())
            .map(Bytes::from)
            .collect();
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        ChunksBody { chunks, remaining }
    }
}

impl http_body::Body for ChunksBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.chunks.pop_front().map(|c| {
            self.remaining -= c.len() as u64;
            Ok(Frame::data(c))
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// An `application/fhir+json` answer whose body is `chunks` in order.
pub fn fhir_chunks(chunks: Vec<Vec<u8>>) -> Response {
    crate::fhir_json_type(Response::new(Body::new(ChunksBody::new(chunks))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    #[tokio::test]
    async fn the_chunks_in_order_with_their_exact_length() {
        let body = ChunksBody::new(vec![b"{\"a\":".to_vec(), Vec::new(), b"[1,2]}".to_vec()]);
        assert_eq!(body.size_hint().exact(), Some(11));
        let bytes = axum::body::to_bytes(Body::new(body), usize::MAX)
            .await
            .unwrap();
        assert_eq!(&bytes[..], b"{\"a\":[1,2]}");
        let empty = ChunksBody::new(Vec::new());
        assert!(empty.is_end_stream());
        assert_eq!(empty.size_hint().exact(), Some(0));
    }
}
