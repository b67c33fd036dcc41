//! The response body (a complete buffer, or a live event stream read from the stream's outbox),
//! and the constructors of the complete responses handlers answer with.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body::{Frame, SizeHint};

use super::HttpResponse;
use crate::hub::Lease;

pub enum Body {
    Full(Option<Bytes>),
    /// Owns the stream's place in the hub: when hyper drops the body (client gone, or stream ended),
    /// the stream leaves the hub and the registry.
    Stream(Lease),
}

impl Body {
    pub fn empty() -> Body {
        Body::Full(None)
    }

    pub fn full(bytes: Bytes) -> Body {
        Body::Full(Some(bytes))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(lease) => lease
                .conn()
                .poll_next(cx)
                .map(|next| next.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

/// A response with no body: 204s, the redirect of `/`.
pub fn empty(status: StatusCode) -> HttpResponse {
    let mut resp = HttpResponse::new(Body::empty());
    *resp.status_mut() = status;
    resp
}

/// A JSON response.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> HttpResponse {
    json_bytes(status, value.to_string().into_bytes())
}

/// A JSON response already serialised (to keep the fields in the order they were written).
pub fn json_bytes(status: StatusCode, body: Vec<u8>) -> HttpResponse {
    let mut resp = HttpResponse::new(Body::full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
