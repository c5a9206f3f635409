//! `bitbucket-auth-proxy health`: probes `/-/health` of a running proxy over TCP or a unix
//! socket, so a distroless container's HEALTHCHECK needs no shell or curl.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::config::{Config, ListenAddr};
use crate::proxy::admin::HEALTH_PATH;

const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
const DEFAULT_URL: &str = "http://127.0.0.1:8080/-/health";

/// Where to probe: `http://host:port/path` or `unix:/path/to.sock`.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    Tcp { authority: String, path: String },
    Unix(std::path::PathBuf),
}

pub fn parse_target(url: &str) -> Result<Target, String> {
    if let Some(path) = url.strip_prefix("unix:") {
        return Ok(Target::Unix(path.into()));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("`{url}` must be an http:// URL or unix:/path"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{url}` has no host"))?
        .to_string();
    let path = match uri.path() {
        "/" | "" => HEALTH_PATH.to_owned(),
        path => path.to_owned(),
    };
    Ok(Target::Tcp { authority, path })
}

/// The probe target for a config: its first listener, with wildcard addresses probed on loopback.
pub fn target_for_config(config: &Config) -> Option<Target> {
    Some(match config.server.listen.first()? {
        ListenAddr::Unix(path) => Target::Unix(path.clone()),
        ListenAddr::Tcp(addr) => Target::Tcp {
            authority: crate::config::dialable(*addr).to_string(),
            path: HEALTH_PATH.to_owned(),
        },
    })
}

pub async fn probe(target: &Target) -> Result<StatusCode, String> {
    let (authority, path) = match target {
        Target::Tcp { authority, path } => (authority.as_str(), path.as_str()),
        Target::Unix(_) => ("localhost", HEALTH_PATH),
    };
    let request = Request::get(path)
        .header(header::HOST, authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = match target {
        Target::Tcp { authority, .. } => {
            let stream = tokio::net::TcpStream::connect(authority.as_str())
                .await
                .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
            send(stream, request).await?
        }
        Target::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| format!("cannot connect to unix:{}: {e}", path.display()))?;
            send(stream, request).await?
        }
    };
    Ok(response)
}

async fn send<S>(stream: S, request: Request<Empty<Bytes>>) -> Result<StatusCode, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    Ok(response.status())
}

/// The `health` subcommand: exit 0 when `/-/health` answers 200.
pub fn probe_command(url: Option<&str>, config: Option<&Path>) -> ExitCode {
    let target = match (url, config) {
        (Some(url), _) => parse_target(url),
        (None, Some(path)) => Config::load(path)
            .map_err(|e| e.to_string())
            .and_then(|config| {
                target_for_config(&config).ok_or_else(|| "the config has no listener".to_owned())
            }),
        (None, None) => parse_target(DEFAULT_URL),
    };
    let target = match target {
        Ok(target) => target,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // The timeout's timer must be created inside the runtime, so it is built in the future.
    match runtime.block_on(async { tokio::time::timeout(PROBE_TIMEOUT, probe(&target)).await }) {
        Ok(Ok(status)) if status == StatusCode::OK => {
            println!("healthy");
            ExitCode::SUCCESS
        }
        Ok(Ok(status)) => {
            eprintln!("unhealthy: {status}");
            ExitCode::FAILURE
        }
        Ok(Err(error)) => {
            eprintln!("unhealthy: {error}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("unhealthy: no answer within {}s", PROBE_TIMEOUT.as_secs());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            parse_target("http://127.0.0.1:9000").unwrap(),
            Target::Tcp {
                authority: "127.0.0.1:9000".into(),
                path: "/-/health".into()
            }
        );
        assert_eq!(
            parse_target("unix:/run/x.sock").unwrap(),
            Target::Unix("/run/x.sock".into())
        );
        assert!(parse_target("https://x").is_err());
    }
}
