//! Reading a request body whole, under a size limit and a deadline.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use super::errors::ApiError;

/// Longest a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of an oversized body is read (and thrown away) before answering 413: a client still
/// sending when the answer comes and the socket closes sees a broken pipe, not the 413.
const DRAIN_FACTOR: u64 = 8;

/// The body, if it is at most `limit` bytes and arrives within [`BODY_TIMEOUT`].
pub async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut buf = BytesMut::new();
    let mut total: u64 = 0;
    let deadline = tokio::time::Instant::now() + BODY_TIMEOUT;
    while let Some(frame) = tokio::time::timeout_at(deadline, body.frame())
        .await
        .map_err(|_| ApiError::BodyTimeout)?
    {
        let frame = frame.map_err(|e| ApiError::UnreadableBody(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        total += data.len() as u64;
        if total > limit as u64 {
            buf = BytesMut::new();
            if total > limit as u64 * DRAIN_FACTOR {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&data);
    }
    if total > limit as u64 {
        return Err(ApiError::BodyTooLarge { limit });
    }
    Ok(buf.freeze())
}
