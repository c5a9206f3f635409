//! The floor of the proxy's h2 path since its h2 lanes (`src/upstream/lane.rs`): one HTTP/2
//! connection opened through hyper's connection API (`hyper::client::conn::http2`), each request
//! sent with a clone of its `SendRequest`. No pool, no reconnection: what hyper costs per request
//! without hyper-util's pooled client on top.

use std::sync::Arc;

use bitbucket_auth_proxy_floor::{Args, Error, runtime, serve, tls_config, upstream_request};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

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
        let (sender, connection) = hyper::client::conn::http2::handshake::<_, _, Incoming>(
            TokioExecutor::new(),
            TokioIo::new(tls),
        )
        .await?;
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
        serve(&listen, move |request: http::Request<Incoming>| {
            let mut sender = sender.clone();
            let request = upstream_request(request, &upstream, &authorization);
            async move { Ok(sender.send_request(request?).await?) }
        })
        .await
    })
}
