//! The floor without hyper-util: one HTTP/2 connection driven by the `h2` crate directly, each
//! request a stream on it. No pool, no reconnection, and bodiless requests only (the benchmark
//! sends GETs): what a forwarder written straight on `h2::client` could at best save.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bitbucket_auth_proxy_floor::{Args, Error, runtime, serve, tls_config, upstream_request};
use bytes::Bytes;
use http::Version;
use http_body::{Body, Frame};

fn main() {
    bitbucket_auth_proxy_floor::main(run)
}

fn run(args: Args) -> Result<(), Error> {
    let tls = Arc::new(tls_config(&args.ca_file, &[b"h2"])?);
    runtime()?.block_on(async move {
        let authority = args.upstream.authority().ok_or("no authority")?.clone();
        let tcp = tokio::net::TcpStream::connect(authority.as_str())
            .await
            .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
        tcp.set_nodelay(true)?;
        let server_name = rustls_pki_types::ServerName::try_from(authority.host().to_owned())?;
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(server_name, tcp)
            .await?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(format!("{authority} did not agree to h2").into());
        }
        let (streams, connection) = h2::client::handshake(tls).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                eprintln!("upstream connection failed: {error}");
                std::process::exit(1);
            }
        });
        let Args {
            listen,
            upstream,
            authorization,
            ..
        } = args;
        serve(
            &listen,
            move |request: http::Request<hyper::body::Incoming>| {
                let streams = streams.clone();
                let request = upstream_request(request, &upstream, &authorization);
                async move {
                    let request = request?;
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
