//! What the two floor forwarders share: arguments, the verified TLS client configuration, and
//! an HTTP/1.1 server that hands each request to a forwarding function.
//!
//! A floor does the job of the proxy and nothing more: plain HTTP/1.1 in, `Host` dropped,
//! `Authorization: Bearer <FLOOR_TOKEN>` set, TLS out to one upstream with its certificate
//! verified. No routes, limits, timeouts, metrics, logs or link rewriting. It is a lower bound
//! for what this stack costs per request, not a proxy to run.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// `<listen addr> <upstream origin> <CA file>`, and the token in `FLOOR_TOKEN` (not on the
/// command line, where `ps` would show it).
pub struct Args {
    pub listen: String,
    pub upstream: http::Uri,
    pub ca_file: String,
    pub authorization: HeaderValue,
}

impl Args {
    pub fn from_env() -> Result<Args, Error> {
        let usage =
            "usage: FLOOR_TOKEN=<token> <binary> <listen addr> <https://host:port> <CA PEM file>";
        let mut args = std::env::args().skip(1);
        let (Some(listen), Some(upstream), Some(ca_file), None) =
            (args.next(), args.next(), args.next(), args.next())
        else {
            return Err(usage.into());
        };
        let upstream: http::Uri = upstream
            .parse()
            .map_err(|e| format!("upstream origin {upstream:?}: {e}"))?;
        if upstream.scheme() != Some(&http::uri::Scheme::HTTPS) || upstream.authority().is_none() {
            return Err(format!("upstream origin must be https://host:port; {usage}").into());
        }
        let token =
            std::env::var("FLOOR_TOKEN").map_err(|_| format!("FLOOR_TOKEN is not set; {usage}"))?;
        let mut authorization = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "FLOOR_TOKEN holds bytes a header cannot carry")?;
        authorization.set_sensitive(true);
        Ok(Args {
            listen,
            upstream,
            ca_file,
            authorization,
        })
    }
}

/// Runs a floor on its arguments; an error is printed and the process exits 1.
pub fn main(run: fn(Args) -> Result<(), Error>) {
    if let Err(error) = Args::from_env().and_then(run) {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

/// rustls with ring, trusting only the given CA, offering `alpn`.
pub fn tls_config(ca_file: &str, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| format!("{ca_file}: {e}"))? {
        roots.add(cert.map_err(|e| format!("{ca_file}: {e}"))?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A TLS connection to the upstream that agreed to h2 in ALPN.
pub type H2Stream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Runs a floor that drives one h2 connection itself: `forward_on` gets the arguments and the
/// connection, made on the floor's runtime.
pub fn main_h2<F, Fut>(forward_on: F)
where
    F: FnOnce(Args, H2Stream) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let run = |args: Args| {
        let tls = tls_config(&args.ca_file, &[b"h2"])?;
        runtime()?.block_on(async move {
            let stream = connect_h2(&args.upstream, tls).await?;
            forward_on(args, stream).await
        })
    };
    if let Err(error) = Args::from_env().and_then(run) {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

/// Drives an upstream connection; the floor exits if it fails, as it has no other.
pub fn drive<E: std::fmt::Display>(
    connection: impl Future<Output = Result<(), E>> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            eprintln!("upstream connection failed: {error}");
            std::process::exit(1);
        }
    });
}

async fn connect_h2(upstream: &http::Uri, tls: rustls::ClientConfig) -> Result<H2Stream, Error> {
    let authority = upstream.authority().ok_or("no authority")?.clone();
    let tcp = tokio::net::TcpStream::connect(authority.as_str())
        .await
        .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
    tcp.set_nodelay(true)?;
    let server_name = rustls_pki_types::ServerName::try_from(authority.host().to_owned())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(server_name, tcp)
        .await?;
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Err(format!("{authority} did not agree to h2").into());
    }
    Ok(tls)
}

/// The runtime the proxy would run with (src/cli/mod.rs): `TOKIO_WORKER_THREADS` workers, or
/// one per usable CPU; tokio's current-thread scheduler when that is one.
pub fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    let workers = match std::env::var("TOKIO_WORKER_THREADS") {
        Ok(value) => value
            .trim()
            .parse::<usize>()
            .map_err(|_| format!("TOKIO_WORKER_THREADS={value:?} is not a number"))?,
        Err(_) => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
    };
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    };
    Ok(builder.enable_all().build()?)
}

/// Serves HTTP/1.1 on `args.listen` for ever; every request goes to `forward` as the upstream
/// request (see `upstream_request`). A failed forward is answered 502.
pub async fn serve<F, Fut, B>(args: Args, forward: F) -> Result<(), Error>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Response<B>, Error>> + Send,
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<Error>,
{
    let Args {
        listen,
        upstream,
        authorization,
        ..
    } = args;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("accept failed: {error}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let forward = forward.clone();
        let (upstream, authorization) = (upstream.clone(), authorization.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let forward = forward.clone();
                let request = upstream_request(request, &upstream, &authorization);
                async move {
                    let forwarded = match request {
                        Ok(request) => forward(request).await,
                        Err(error) => Err(error),
                    };
                    Ok::<_, Infallible>(match forwarded {
                        Ok(response) => response.map(Either::Forwarded),
                        Err(error) => {
                            eprintln!("forwarding failed: {error}");
                            let mut response = Response::new(Either::Failed);
                            *response.status_mut() = http::StatusCode::BAD_GATEWAY;
                            response
                        }
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The upstream's body, or the empty body of a 502.
enum Either<B> {
    Forwarded(B),
    Failed,
}

impl<B> http_body::Body for Either<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<Error>,
{
    type Data = bytes::Bytes;
    type Error = Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Error>>> {
        match self.get_mut() {
            Either::Forwarded(body) => std::pin::Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(Into::into))),
            Either::Failed => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Either::Forwarded(body) => body.is_end_stream(),
            Either::Failed => true,
        }
    }
}

/// The upstream request: the client's, with the upstream's origin, no `Host` (the client
/// library sets the upstream's) and the credential.
fn upstream_request<B>(
    request: Request<B>,
    upstream: &http::Uri,
    authorization: &HeaderValue,
) -> Result<Request<B>, Error> {
    let (mut parts, body) = request.into_parts();
    let mut uri = http::uri::Parts::default();
    uri.scheme = upstream.scheme().cloned();
    uri.authority = upstream.authority().cloned();
    uri.path_and_query = parts.uri.path_and_query().cloned();
    parts.uri = http::Uri::from_parts(uri)?;
    parts.headers.remove(http::header::HOST);
    parts.headers.remove(http::header::CONNECTION);
    parts
        .headers
        .insert(http::header::AUTHORIZATION, authorization.clone());
    Ok(Request::from_parts(parts, body))
}
