//! The floor of the proxy's h2 lanes as they first were, before they moved to the `h2` crate: one
//! HTTP/2 connection opened through hyper's connection API (`hyper::client::conn::http2`), each
//! request sent with a clone of its `SendRequest`. No pool, no reconnection: what hyper costs per
//! request without hyper-util's pooled client on top.

use bitbucket_auth_proxy_floor::{drive, main_h2, serve};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

fn main() {
    main_h2(|args, stream| async move {
        let (sender, connection) = hyper::client::conn::http2::handshake::<_, _, Incoming>(
            TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await?;
        drive(connection);
        serve(args, move |request: http::Request<Incoming>| {
            let mut sender = sender.clone();
            async move { Ok(sender.send_request(request).await?) }
        })
        .await
    })
}
