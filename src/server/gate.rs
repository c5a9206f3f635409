//! The check a TCP connection passes at accept, before it takes a `server.max_connections`
//! slot: a peer outside `server.allowed_clients` is answered 403 and closed at once. Checked
//! only per request, a refused peer that sent nothing held its slot until
//! `server.header_read_timeout`, and a handful of them locked every allowed client out.
//!
//! Reads the live config (a reload may change `allowed_clients`) and uses
//! [`crate::proxy::admit`], so the accept check and the per-request check cannot disagree; the
//! per-request check still covers connections accepted before a reload narrowed the list.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::{ProxyError, REASON_HEADER};
use crate::proxy::ConnectionInfo;
use crate::runtime::state::SharedState;

/// How long a refused connection is given to take its 403, and for its request to be read and
/// discarded after the proxy's FIN (closing with unread input would send a reset, which can
/// destroy the 403 before the client reads it).
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// How long a refusal waits for the peer's request head before it is sent anyway.
const REFUSAL_HEAD_WAIT: Duration = Duration::from_millis(500);
/// The most a refused peer's input is read while lingering.
const REFUSAL_DRAIN_LIMIT: usize = 64 * 1024;
/// Refused connections lingering at once. Refusals take no connection slot, so without this a
/// flood of refused peers would hold a file descriptor each for [`REFUSAL_LINGER`]; past it a
/// refusal is written without waiting and the socket closed at once.
const MAX_LINGERING_REFUSALS: usize = 256;

static LINGERING: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(MAX_LINGERING_REFUSALS);

/// The refusal to send instead of serving `connection`, or `None` when its peer is allowed
/// (by the `allowed_clients` of the listener it came in on).
pub fn refusal(state: &SharedState, connection: &ConnectionInfo) -> Option<Bytes> {
    let generation = state.current();
    let error = crate::proxy::admit(&generation.config, connection).err()?;
    Some(raw_http1_response(&error))
}

/// The error as an HTTP/1.1 response written by hand (hyper never sees the connection), in
/// the same shape [`ProxyError::into_response`] gives, announcing the close.
pub fn raw_http1_response(error: &ProxyError) -> Bytes {
    let body = error.body_json();
    let status = error.status();
    let head = format!(
        "HTTP/1.1 {} {}\r\n{REASON_HEADER}: {}\r\ncontent-type: application/json\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        error.reason(),
        body.len()
    );
    [head.as_bytes(), &body].concat().into()
}

/// Sends `refusal` once the peer's request head is in (or after `REFUSAL_HEAD_WAIT`) and
/// closes the connection, then drains the peer's input for the rest of `REFUSAL_LINGER` so
/// the close does not turn into a reset. Holds no connection slot meanwhile.
pub fn refuse(mut stream: TcpStream, peer: SocketAddr, refusal: Bytes) {
    tracing::info!(
        client = %peer.ip(),
        port = peer.port(),
        reason = "client-not-allowed",
        "refused a connection from outside allowed_clients"
    );
    let Ok(lingering) = LINGERING.try_acquire() else {
        // A fresh socket's send buffer takes the few hundred bytes at once.
        let _ = stream.try_write(&refusal);
        return;
    };
    tokio::spawn(async move {
        let _lingering = lingering;
        let deadline = tokio::time::Instant::now() + REFUSAL_LINGER;
        // An HTTP client that gets its answer before it has sent its request treats it as a
        // protocol error (hyper's does), so the refusal waits for the request head, briefly.
        let mut read = 0;
        let _ = tokio::time::timeout(
            REFUSAL_HEAD_WAIT,
            discard_input(&mut stream, &mut read, true),
        )
        .await;
        let _ = tokio::time::timeout_at(deadline, async {
            stream.write_all(&refusal).await?;
            stream.shutdown().await?;
            discard_input(&mut stream, &mut read, false).await
        })
        .await;
    });
}

/// Reads and drops the peer's input until it closes, or `REFUSAL_DRAIN_LIMIT` bytes in all
/// (counted in `read`), or, with `until_head`, the blank line that ends a request head.
async fn discard_input(
    stream: &mut TcpStream,
    read: &mut usize,
    until_head: bool,
) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut last_four: u32 = 0;
    while *read < REFUSAL_DRAIN_LIMIT {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        *read += n;
        if until_head {
            for &byte in &buf[..n] {
                last_four = (last_four << 8) | u32::from(byte);
            }
            if last_four == u32::from_be_bytes(*b"\r\n\r\n") {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raw_refusal_is_a_complete_http1_response_in_bitbucket_shape() {
        let raw = raw_http1_response(&ProxyError::ClientNotAllowed("192.0.2.7".into()));
        let text = std::str::from_utf8(&raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{head}");
        assert!(head.contains("\r\nx-bitbucket-auth-proxy: client-not-allowed\r\n"));
        assert!(head.contains("\r\nconnection: close\r\n"));
        assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["type"], "error");
        assert!(
            json["error"]["detail"]
                .as_str()
                .unwrap()
                .contains("192.0.2.7")
        );
    }
}
