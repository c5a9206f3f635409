//! Shared integration-test support: a throw-away PKI, in-process mock
//! upstreams (TLS and plain, h2 + HTTP/1.1), fault injectors, streaming
//! body helpers and small HTTP clients.
//!
//! Self-contained but for [`proxy`], the in-process proxy fixture. Everything
//! listens on 127.0.0.1 only. Constructors that spawn tasks must be called
//! from inside a Tokio runtime (e.g. a `#[tokio::test]`).
#![allow(dead_code)]

pub mod fleet;
pub mod numbering;
pub mod proxy;
pub mod redis;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Deref;
use std::path::Path;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// ALPN list offering both h2 and HTTP/1.1 (server preference order).
pub const ALPN_H2_H1: &[&[u8]] = &[b"h2", b"http/1.1"];
/// ALPN list offering only HTTP/1.1.
pub const ALPN_H1: &[&[u8]] = &[b"http/1.1"];

// ---------------------------------------------------------------------------
// PKI
// ---------------------------------------------------------------------------

fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn new_ca(common_name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
    CertifiedIssuer::self_signed(params, key).expect("self-sign CA")
}

/// A leaf certificate plus its PKCS#8 private key.
struct Leaf {
    cert: CertificateDer<'static>,
    key_pkcs8: Vec<u8>,
}

fn new_leaf(issuer: &Issuer<'_, KeyPair>, sans: &[&str], expired: bool) -> Leaf {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans.clone()).expect("leaf params (invalid SAN?)");
    params.distinguished_name.push(
        DnType::CommonName,
        sans.first().map_or("leaf", |s| s.as_str()),
    );
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    if expired {
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    Leaf {
        cert: cert.der().clone(),
        key_pkcs8: key.serialize_der(),
    }
}

fn build_server_config(leaf: &Leaf, alpn: &[&[u8]]) -> Arc<ServerConfig> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_pkcs8.clone()));
    let mut cfg = ServerConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.cert.clone()], key)
        .expect("server cert/key");
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// A throw-away test CA (ECDSA P-256) plus a server leaf for
/// `IP:127.0.0.1` and `DNS:localhost`.
pub struct TestPki {
    /// CA certificate, PEM.
    pub ca_pem: String,
    /// CA certificate, DER.
    pub ca_der: CertificateDer<'static>,
    /// Temp file containing `ca_pem` (lives as long as the `TestPki`).
    pub ca_file: tempfile::NamedTempFile,
    issuer: CertifiedIssuer<'static, KeyPair>,
    server_leaf: Leaf,
}

impl TestPki {
    pub fn new() -> TestPki {
        let issuer = new_ca("bitbucket-auth-proxy test CA");
        let ca_pem = issuer.pem();
        let ca_der = issuer.der().clone();
        let mut ca_file = tempfile::Builder::new()
            .prefix("test-ca-")
            .suffix(".pem")
            .tempfile()
            .expect("create CA temp file");
        ca_file.write_all(ca_pem.as_bytes()).expect("write CA file");
        ca_file.flush().expect("flush CA file");
        let server_leaf = new_leaf(&issuer, &["127.0.0.1", "localhost"], false);
        TestPki {
            ca_pem,
            ca_der,
            ca_file,
            issuer,
            server_leaf,
        }
    }

    /// Path of a PEM file holding the CA certificate (the proxy's `ca_file`).
    pub fn ca_path(&self) -> &Path {
        self.ca_file.path()
    }

    /// Server config for the 127.0.0.1/localhost leaf, ALPN `h2`, `http/1.1`.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server_config_with_alpn(ALPN_H2_H1)
    }

    /// Server config for the 127.0.0.1/localhost leaf with the given ALPN
    /// list (empty = no ALPN, which means HTTP/1.1).
    pub fn server_config_with_alpn(&self, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        build_server_config(&self.server_leaf, alpn)
    }

    /// A fresh leaf signed by this CA for arbitrary SANs (IP literals become
    /// IP SANs, everything else DNS SANs).
    pub fn server_config_for_names(&self, sans: &[&str], alpn: &[&[u8]]) -> Arc<ServerConfig> {
        build_server_config(&new_leaf(&self.issuer, sans, false), alpn)
    }

    /// Leaf signed by the trusted CA but only valid for `DNS:other.example`.
    pub fn wrong_name_server_config(&self) -> Arc<ServerConfig> {
        self.server_config_for_names(&["other.example"], ALPN_H2_H1)
    }

    /// Leaf for 127.0.0.1/localhost signed by the trusted CA but expired
    /// (valid 2000-01-01 .. 2001-01-01).
    pub fn expired_server_config(&self) -> Arc<ServerConfig> {
        let leaf = new_leaf(&self.issuer, &["127.0.0.1", "localhost"], true);
        build_server_config(&leaf, ALPN_H2_H1)
    }

    /// Leaf for 127.0.0.1/localhost issued by a different, untrusted CA.
    pub fn untrusted_server_config() -> Arc<ServerConfig> {
        let other = new_ca("untrusted test CA");
        build_server_config(
            &new_leaf(&other, &["127.0.0.1", "localhost"], false),
            ALPN_H2_H1,
        )
    }

    /// Writes the 127.0.0.1/localhost leaf and its key as PEM files into `dir`, for servers
    /// that read files (redis-server's TLS port); returns (certificate, key) paths.
    pub fn write_server_pem(&self, dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        fn pem(label: &str, der: &[u8]) -> String {
            use base64::Engine as _;
            let text = base64::engine::general_purpose::STANDARD.encode(der);
            let mut out = format!("-----BEGIN {label}-----\n");
            for line in text.as_bytes().chunks(64) {
                out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
                out.push('\n');
            }
            out.push_str(&format!("-----END {label}-----\n"));
            out
        }
        let cert = dir.join("server.pem");
        let key = dir.join("server.key");
        std::fs::write(&cert, pem("CERTIFICATE", &self.server_leaf.cert)).expect("write cert");
        std::fs::write(&key, pem("PRIVATE KEY", &self.server_leaf.key_pkcs8)).expect("write key");
        (cert, key)
    }

    /// rustls client config (ring provider) trusting only this CA, no ALPN.
    pub fn client_config(&self) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("add CA root");
        ClientConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------
// Mock upstream
// ---------------------------------------------------------------------------

/// What the mock upstream saw of a request (everything but the body).
#[derive(Clone, Debug)]
pub struct RecordedRequestHead {
    pub method: Method,
    /// Request target exactly as received: path-and-query for origin-form
    /// (and for h2 `:path`), the full URI otherwise.
    pub uri: String,
    /// URI authority if any (h2 `:authority`, or absolute-form HTTP/1.1).
    pub authority: Option<String>,
    pub version: Version,
    pub headers: HeaderMap,
}

impl RecordedRequestHead {
    fn from_parts(parts: &http::request::Parts) -> Self {
        let uri = match (parts.uri.scheme(), parts.uri.path_and_query()) {
            (None, Some(pq)) => pq.as_str().to_owned(),
            (Some(_), Some(pq)) if parts.version == Version::HTTP_2 => pq.as_str().to_owned(),
            _ => parts.uri.to_string(),
        };
        RecordedRequestHead {
            method: parts.method.clone(),
            uri,
            authority: parts.uri.authority().map(|a| a.as_str().to_owned()),
            version: parts.version,
            headers: parts.headers.clone(),
        }
    }

    /// First value of header `name` as a string (None if absent or not
    /// visible ASCII).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// All values of header `name`, lossily converted to strings.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }
}

type Handler = Arc<
    dyn Fn(RecordedRequestHead, Incoming) -> Pin<Box<dyn Future<Output = Response<BoxBody>> + Send>>
        + Send
        + Sync,
>;

/// In-process HTTPS (or plain HTTP) server speaking h2 and HTTP/1.1 that
/// records every request head. Dropping it stops the accept loop and all
/// its connections.
pub struct MockUpstream {
    addr: SocketAddr,
    scheme: &'static str,
    requests: Arc<Mutex<Vec<RecordedRequestHead>>>,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl MockUpstream {
    /// TLS server. The handler gets the recorded head and the request body.
    pub fn start<H, F>(tls: Arc<ServerConfig>, handler: H) -> MockUpstream
    where
        H: Fn(RecordedRequestHead, Incoming) -> F + Send + Sync + 'static,
        F: Future<Output = Response<BoxBody>> + Send + 'static,
    {
        Self::start_inner(Some(TlsAcceptor::from(tls)), boxed_handler(handler))
    }

    /// TLS server with a synchronous handler; the request body is drained
    /// before the handler runs.
    pub fn start_simple<H>(tls: Arc<ServerConfig>, handler: H) -> MockUpstream
    where
        H: Fn(&RecordedRequestHead) -> Response<Full<Bytes>> + Send + Sync + 'static,
    {
        Self::start_inner(Some(TlsAcceptor::from(tls)), simple_handler(handler))
    }

    /// Plain-HTTP server (HTTP/1.1, or h2 with prior knowledge).
    pub fn start_plain<H, F>(handler: H) -> MockUpstream
    where
        H: Fn(RecordedRequestHead, Incoming) -> F + Send + Sync + 'static,
        F: Future<Output = Response<BoxBody>> + Send + 'static,
    {
        Self::start_inner(None, boxed_handler(handler))
    }

    /// Plain-HTTP server with a synchronous handler (body drained first).
    pub fn start_plain_simple<H>(handler: H) -> MockUpstream
    where
        H: Fn(&RecordedRequestHead) -> Response<Full<Bytes>> + Send + Sync + 'static,
    {
        Self::start_inner(None, simple_handler(handler))
    }

    fn start_inner(tls: Option<TlsAcceptor>, handler: Handler) -> MockUpstream {
        let listener = bind_local();
        let addr = listener.local_addr().expect("local_addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let scheme = if tls.is_some() { "https" } else { "http" };

        let reqs = requests.clone();
        let conns = connections.clone();
        let task = tokio::spawn(accept_loop(listener, conns, move |stream| {
            serve_connection(stream, tls.clone(), handler.clone(), reqs.clone())
        }));

        MockUpstream {
            addr,
            scheme,
            requests,
            connections,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT` (or `http://` for the plain variants).
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// All request heads received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequestHead> {
        self.requests.lock().unwrap().clone()
    }

    /// The most recent request head, if any.
    pub fn last_request(&self) -> Option<RecordedRequestHead> {
        self.requests.lock().unwrap().last().cloned()
    }

    pub fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// TCP connections accepted so far.
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Polls until at least `n` requests were recorded; false on timeout.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.request_count() >= n {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn boxed_handler<H, F>(handler: H) -> Handler
where
    H: Fn(RecordedRequestHead, Incoming) -> F + Send + Sync + 'static,
    F: Future<Output = Response<BoxBody>> + Send + 'static,
{
    Arc::new(move |head, body| Box::pin(handler(head, body)))
}

fn simple_handler<H>(handler: H) -> Handler
where
    H: Fn(&RecordedRequestHead) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    Arc::new(move |head, body| {
        let handler = handler.clone();
        Box::pin(async move {
            drain_body(body).await;
            handler(&head).map(|b| b.map_err(|never| match never {}).boxed())
        })
    })
}

async fn serve_connection(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    handler: Handler,
    requests: Arc<Mutex<Vec<RecordedRequestHead>>>,
) {
    let service = service_fn(move |req: Request<Incoming>| {
        let handler = handler.clone();
        let requests = requests.clone();
        async move {
            let (parts, body) = req.into_parts();
            let head = RecordedRequestHead::from_parts(&parts);
            requests.lock().unwrap().push(head.clone());
            Ok::<_, Infallible>(handler(head, body).await)
        }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    match tls {
        Some(acceptor) => {
            let Ok(stream) = acceptor.accept(stream).await else {
                return;
            };
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
        None => {
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    }
}

fn bind_local() -> TcpListener {
    let std_listener =
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    std_listener.set_nonblocking(true).expect("set_nonblocking");
    TcpListener::from_std(std_listener).expect("tokio listener (inside a runtime?)")
}

/// Accepts forever, spawning `on_conn` per connection into a `JoinSet` owned
/// by this future, so aborting the accept task also kills its connections.
async fn accept_loop<C, F>(listener: TcpListener, connections: Arc<AtomicUsize>, on_conn: C)
where
    C: Fn(TcpStream) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                connections.fetch_add(1, Ordering::SeqCst);
                while tasks.try_join_next().is_some() {}
                tasks.spawn(on_conn(stream));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

// ---------------------------------------------------------------------------
// Fault helpers
// ---------------------------------------------------------------------------

/// An address on 127.0.0.1 that nothing listens on (bound, then released).
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr")
}

/// A listener that hands each accepted TCP connection (optionally after a
/// TLS handshake) to a user function. Dropping it stops everything.
pub struct RawUpstream {
    addr: SocketAddr,
    scheme: &'static str,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl RawUpstream {
    /// `f` gets each accepted plain TCP stream.
    pub fn start<H, F>(f: H) -> RawUpstream
    where
        H: Fn(TcpStream) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let listener = bind_local();
        let addr = listener.local_addr().expect("local_addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(accept_loop(listener, connections.clone(), f));
        RawUpstream {
            addr,
            scheme: "http",
            connections,
            task,
        }
    }

    /// `f` gets each stream after a successful TLS handshake with `tls`.
    pub fn start_tls<H, F>(tls: Arc<ServerConfig>, f: H) -> RawUpstream
    where
        H: Fn(TlsStream<TcpStream>) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let acceptor = TlsAcceptor::from(tls);
        let f = Arc::new(f);
        let mut upstream = Self::start(move |stream| {
            let acceptor = acceptor.clone();
            let f = f.clone();
            async move {
                if let Ok(tls) = acceptor.accept(stream).await {
                    f(tls).await;
                }
            }
        });
        upstream.scheme = "https";
        upstream
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, or `https://` for [`RawUpstream::start_tls`].
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// TCP connections accepted so far.
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads and discards until the peer closes; never writes anything.
async fn swallow<S: AsyncRead + Unpin>(mut stream: S) {
    let mut buf = [0u8; 8192];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Accepts TCP connections and never answers (not even a TLS handshake).
pub struct HangingUpstream(RawUpstream);

impl HangingUpstream {
    pub fn start() -> HangingUpstream {
        HangingUpstream(RawUpstream::start(swallow))
    }
}

impl Deref for HangingUpstream {
    type Target = RawUpstream;
    fn deref(&self) -> &RawUpstream {
        &self.0
    }
}

/// Completes the TLS handshake with `tls`, then never sends a byte.
pub struct TlsThenHang(RawUpstream);

impl TlsThenHang {
    pub fn start(tls: Arc<ServerConfig>) -> TlsThenHang {
        TlsThenHang(RawUpstream::start_tls(tls, swallow))
    }
}

impl Deref for TlsThenHang {
    type Target = RawUpstream;
    fn deref(&self) -> &RawUpstream {
        &self.0
    }
}

/// Reads from `stream` until the end of an HTTP/1.x head (`\r\n\r\n`) or
/// EOF; returns everything read (may include the start of a body).
pub async fn read_http_head<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------

pub fn full_body(data: impl Into<Bytes>) -> BoxBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty_body() -> BoxBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// Chunk size used by the pattern bodies.
pub const PATTERN_CHUNK: usize = 64 * 1024;

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with the deterministic pattern bytes starting at stream
/// offset `offset` (byte `n` depends only on `n`).
pub fn pattern_fill(offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    while i < buf.len() {
        let word = splitmix64(pos / 8).to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[start..start + n]);
        i += n;
        pos += n as u64;
    }
}

/// `len` pattern bytes starting at `offset`, materialised (small sizes only).
pub fn pattern_bytes(offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    pattern_fill(offset, &mut v);
    v
}

/// Streaming body of `len` pattern bytes in 64 KiB chunks, generated lazily.
struct PatternBody {
    offset: u64,
    len: u64,
    exact_size: bool,
    /// Bytes handed out so far, for observing backpressure from outside.
    produced: Option<Arc<AtomicU64>>,
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.offset >= this.len {
            return Poll::Ready(None);
        }
        let n = (this.len - this.offset).min(PATTERN_CHUNK as u64) as usize;
        let mut chunk = vec![0u8; n];
        pattern_fill(this.offset, &mut chunk);
        this.offset += n as u64;
        if let Some(produced) = &this.produced {
            produced.store(this.offset, Ordering::SeqCst);
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.offset >= self.len
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact_size {
            SizeHint::with_exact(self.len - self.offset)
        } else {
            SizeHint::default()
        }
    }
}

/// `len` pattern bytes with an exact size hint (sent with Content-Length).
pub fn pattern_body(len: u64) -> BoxBody {
    BoxBody::new(PatternBody {
        offset: 0,
        len,
        exact_size: true,
        produced: None,
    })
}

/// `len` pattern bytes without a size hint (HTTP/1.1 sends it chunked).
pub fn pattern_body_unsized(len: u64) -> BoxBody {
    BoxBody::new(PatternBody {
        offset: 0,
        len,
        exact_size: false,
        produced: None,
    })
}

/// Like [`pattern_body`], plus a counter of the bytes generated so far: a
/// reader that stops reading should make it stop growing (backpressure).
pub fn pattern_body_counted(len: u64) -> (BoxBody, Arc<AtomicU64>) {
    let produced = Arc::new(AtomicU64::new(0));
    let body = BoxBody::new(PatternBody {
        offset: 0,
        len,
        exact_size: true,
        produced: Some(produced.clone()),
    });
    (body, produced)
}

/// A body fed chunk by chunk from the returned sender (no size hint); it
/// ends when the sender is dropped.
pub fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, BoxBody) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let body = http_body_util::StreamBody::new(futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }));
    (tx, BoxBody::new(body))
}

/// SHA-256 of the first `len` pattern bytes, computed in 64 KiB chunks
/// (memoised per length: SHA-256 is slow in unoptimised test builds).
pub fn sha256_of_pattern(len: u64) -> [u8; 32] {
    static CACHE: OnceLock<Mutex<HashMap<u64, [u8; 32]>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hash) = cache.lock().unwrap().get(&len) {
        return *hash;
    }
    let hash = compute_sha256_of_pattern(len);
    cache.lock().unwrap().insert(len, hash);
    hash
}

fn compute_sha256_of_pattern(len: u64) -> [u8; 32] {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; PATTERN_CHUNK];
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(PATTERN_CHUNK as u64) as usize;
        pattern_fill(offset, &mut buf[..n]);
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    hasher.finalize().into()
}

/// Streams `body` through SHA-256 without collecting it; returns the hash
/// and the byte count, or the body's error.
pub async fn try_sha256_and_len_of_body<B: Body>(body: B) -> Result<([u8; 32], u64), B::Error> {
    let mut body = pin!(body);
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.as_mut().frame().await {
        if let Ok(mut data) = frame?.into_data() {
            while data.has_remaining() {
                let chunk = data.chunk();
                hasher.update(chunk);
                len += chunk.len() as u64;
                let n = chunk.len();
                data.advance(n);
            }
        }
    }
    Ok((hasher.finalize().into(), len))
}

/// Like [`try_sha256_and_len_of_body`] but panics on a body error.
pub async fn sha256_and_len_of_body<B>(body: B) -> ([u8; 32], u64)
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    try_sha256_and_len_of_body(body)
        .await
        .expect("body stream failed")
}

/// Streams `body` and checks it is exactly the first `len` pattern bytes;
/// the error names the first mismatching offset. Much cheaper than hashing
/// in debug builds (~0.3 s vs ~2 s per 64 MiB), so prefer it for big bodies.
pub async fn check_pattern_body<B>(body: B, len: u64) -> Result<(), String>
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    let mut body = pin!(body);
    let mut offset = 0u64;
    let mut expected = Vec::new();
    while let Some(frame) = body.as_mut().frame().await {
        let frame = frame.map_err(|e| format!("body error after {offset} bytes: {e:?}"))?;
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        while data.has_remaining() {
            let chunk = data.chunk();
            let n = chunk.len();
            if offset + n as u64 > len {
                return Err(format!("body longer than expected {len} bytes"));
            }
            expected.resize(n, 0);
            pattern_fill(offset, &mut expected);
            if chunk != expected.as_slice() {
                let i = chunk
                    .iter()
                    .zip(&expected)
                    .take_while(|(a, b)| a == b)
                    .count();
                return Err(format!("pattern mismatch at offset {}", offset + i as u64));
            }
            offset += n as u64;
            data.advance(n);
        }
    }
    if offset != len {
        return Err(format!("body ended after {offset} of {len} bytes"));
    }
    Ok(())
}

/// Collects a body into memory (small bodies only); panics on error.
pub async fn collect_body<B>(body: B) -> Bytes
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    body.collect().await.expect("collect body").to_bytes()
}

/// Collects a body into a (lossy UTF-8) string; panics on error.
pub async fn body_string<B>(body: B) -> String
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    String::from_utf8_lossy(&collect_body(body).await).into_owned()
}

/// Reads and discards a body, ignoring errors.
pub async fn drain_body<B: Body>(body: B) {
    let mut body = pin!(body);
    while let Some(Ok(_)) = body.as_mut().frame().await {}
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// Pooling hyper-util HTTP/1.1 client for plain `http://` URLs.
pub fn http1_client() -> Client<HttpConnector, BoxBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends `req` over a fresh TCP connection with a one-shot HTTP/1.1
/// client. The URI is sent as-is as the request target (use origin-form,
/// e.g. `/path?q`); a `Host: <addr>` header is added if missing.
pub async fn send(
    addr: SocketAddr,
    mut req: Request<BoxBody>,
) -> Result<Response<Incoming>, BoxError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    if !req.headers().contains_key(http::header::HOST) {
        let host = HeaderValue::from_str(&addr.to_string()).expect("host header");
        req.headers_mut().insert(http::header::HOST, host);
    }
    Ok(sender.send_request(req).await?)
}

/// `GET path_and_query` via [`send`]; panics on transport errors.
pub async fn get(addr: SocketAddr, path_and_query: &str) -> Response<Incoming> {
    let uri: Uri = path_and_query.parse().expect("valid request target");
    let req = Request::get(uri).body(empty_body()).expect("request");
    send(addr, req).await.expect("send request")
}

/// Writes `bytes` to a fresh TCP connection and returns everything read
/// until the peer closes or 2 s elapse (lossy UTF-8).
pub async fn raw_request(addr: SocketAddr, bytes: &[u8]) -> String {
    raw_request_timeout(addr, bytes, Duration::from_secs(2)).await
}

/// [`raw_request`] with a custom overall deadline. Write errors are ignored
/// (the peer may legitimately close early); reading still happens.
pub async fn raw_request_timeout(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> String {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let _ = tokio::time::timeout_at(deadline, stream.write_all(bytes)).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An HTTP/1.x response as read by [`raw_request`]: status, headers (names
/// lower-cased, in order) and whatever followed the head.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    /// Parses the *last* response head in `text` (skipping any interim
    /// `1xx` responses); None if there is no complete head.
    pub fn parse(text: &str) -> Option<RawResponse> {
        let mut rest = text;
        loop {
            let (head, body) = rest.split_once("\r\n\r\n")?;
            let mut lines = head.split("\r\n");
            let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
            if (100..200).contains(&status) && body.starts_with("HTTP/") {
                rest = body;
                continue;
            }
            let headers = lines
                .filter_map(|line| line.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            return Some(RawResponse {
                status,
                headers,
                body: body.to_owned(),
            });
        }
    }

    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl RawResponse {
    /// Splits pipelined responses (framed by `content-length`, which every response the
    /// proxy or the mocks send to raw clients has; a response without one takes the rest).
    /// Interim `1xx` responses are skipped. Stops at the first incomplete head.
    pub fn parse_all(text: &str) -> Vec<RawResponse> {
        let mut all = Vec::new();
        let mut rest = text;
        while let Some((head, after)) = rest.split_once("\r\n\r\n") {
            let Some(mut response) = RawResponse::parse(&format!("{head}\r\n\r\n")) else {
                break;
            };
            if (100..200).contains(&response.status) {
                rest = after;
                continue;
            }
            let len = response
                .header("content-length")
                .and_then(|l| l.parse::<usize>().ok())
                .unwrap_or(after.len())
                .min(after.len());
            response.body = after[..len].to_owned();
            rest = &after[len..];
            all.push(response);
        }
        all
    }
}

/// How the peer ended a [`raw_exchange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Orderly close (EOF).
    Closed,
    /// Connection reset (or another read error).
    Reset,
    /// Still open when the deadline passed.
    Open,
}

/// What a [`raw_exchange`] read back, how it ended and when.
#[derive(Debug, Clone)]
pub struct RawExchange {
    pub bytes: Vec<u8>,
    pub ending: Ending,
    /// From connecting until the peer closed (or the deadline).
    pub elapsed: Duration,
}

impl RawExchange {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    pub fn responses(&self) -> Vec<RawResponse> {
        RawResponse::parse_all(&self.text())
    }

    /// True when the peer hung up (orderly or not) before the deadline.
    pub fn closed(&self) -> bool {
        self.ending != Ending::Open
    }
}

/// Writes `bytes` on a fresh connection while reading everything back until the peer closes
/// or `deadline` passes. Writing runs beside reading, so a peer that answers and closes
/// before reading everything (a 431 to a megabyte of headers) is still heard.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], deadline: Duration) -> RawExchange {
    let started = tokio::time::Instant::now();
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let bytes = bytes.to_vec();
    let writing = tokio::spawn(async move {
        let _ = writer.write_all(&bytes).await;
        // Keep the write half open: a half-close would read as a client that went away.
        std::future::pending::<()>().await;
        drop(writer);
    });
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let ending = loop {
        match tokio::time::timeout_at(started + deadline, reader.read(&mut buf)).await {
            Err(_) => break Ending::Open,
            Ok(Ok(0)) => break Ending::Closed,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break Ending::Reset,
        }
    };
    writing.abort();
    RawExchange {
        bytes: out,
        ending,
        elapsed: started.elapsed(),
    }
}

/// Lower-case hex of a digest, for readable assertion messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
