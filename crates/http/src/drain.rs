//! Reading what is left of a request before answering it.

use axum::body::Body;

/// How much of an oversized body is read and discarded before answering 413. An HTTP/2
/// client still sending when the answer comes sees its stream reset and no status; a
/// bounded drain lets ordinary clients read the precise error.
pub const DRAIN_CAP: usize = 1024 * 1024;

/// Reads and discards up to [`DRAIN_CAP`] bytes of `body`, with a 5 second deadline.
pub async fn drain(body: Body) {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut seen = 0usize;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > DRAIN_CAP {
                break;
            }
        }
    })
    .await;
}
