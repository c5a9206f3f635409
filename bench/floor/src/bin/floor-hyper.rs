//! The floor with the proxy's client: hyper-util's pooled legacy client over hyper-rustls,
//! offering h2 and http/1.1 by ALPN, as the proxy's `src/upstream.rs` builds it.

use bitbucket_auth_proxy_floor::{Args, Error, runtime, serve, tls_config};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

fn main() {
    bitbucket_auth_proxy_floor::main(run)
}

fn run(args: Args) -> Result<(), Error> {
    // hyper-rustls sets ALPN itself (h2, http/1.1) from enable_http1/enable_http2.
    let tls = tls_config(&args.ca_file, &[])?;
    runtime()?.block_on(async move {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client: Client<_, Incoming> = Client::builder(TokioExecutor::new()).build(https);
        serve(args, move |request| {
            let client = client.clone();
            async move { Ok(client.request(request).await?) }
        })
        .await
    })
}
