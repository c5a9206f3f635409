//! The floor of the proxy's h2 path (`src/upstream/lane.rs`): one HTTP/2 connection driven by
//! the `h2` crate directly, each request a stream on it. No pool, no reconnection, and bodiless
//! requests only (the benchmark sends GETs): what a forwarder written straight on `h2::client`
//! costs per request.

use std::pin::Pin;
use std::task::{Context, Poll};

use bitbucket_auth_proxy_floor::{drive, main_h2, serve};
use bytes::Bytes;
use http::Version;
use http_body::{Body, Frame};

fn main() {
    main_h2(|args, stream| async move {
        let (streams, connection) = h2::client::handshake(stream).await?;
        drive(connection);
        serve(
            args,
            move |request: http::Request<hyper::body::Incoming>| {
                let streams = streams.clone();
                async move {
                    if !request.body().is_end_stream() {
                        return Err("floor-h2 forwards bodiless requests only".into());
                    }
                    let (mut parts, _) = request.into_parts();
                    parts.version = Version::HTTP_2;
                    let mut streams = streams.ready().await?;
                    let (response, _) =
                        streams.send_request(http::Request::from_parts(parts, ()), true)?;
                    let (mut parts, body) = response.await?.into_parts();
                    parts.version = Version::HTTP_11;
                    Ok(http::Response::from_parts(parts, StreamBody(body)))
                }
            },
        )
        .await
    })
}

/// An h2 response stream as a body, handing flow-control credit back as data is taken.
struct StreamBody(h2::RecvStream);

impl Body for StreamBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let data = std::task::ready!(self.0.poll_data(cx));
        if let Some(Ok(data)) = &data {
            let _ = self.0.flow_control().release_capacity(data.len());
        }
        Poll::Ready(data.map(|data| data.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}
