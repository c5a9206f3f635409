//! Turns a parsed `ConfigFile` into a `Config`, collecting every problem rather than stopping at
//! the first: the walk, `[server]`, and the parsers the sections share. `[upstream]`,
//! `[[credentials]]` and `[[routes]]` have modules of their own.

use std::path::Path;

use super::fields::{Issues, Mode, loopback_clients, parse_cidr, parse_duration, parse_listen};
use super::file::ConfigFile;
use super::{
    Config, ConfigError, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_LISTEN,
    DEFAULT_MAX_CONCURRENT_STREAMS, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_SEND_TIMEOUT, DEFAULT_SHUTDOWN_GRACE, DEFAULT_UNIX_SOCKET_MODE, ServerSettings,
};

pub(super) fn validate(path: &Path, file: ConfigFile, mode: Mode) -> Result<Config, ConfigError> {
    let mut issues = Issues {
        mode,
        issues: Vec::new(),
        warnings: Vec::new(),
        secret_sources: Vec::new(),
    };
    // Absolute, so that paths in messages say which file was really meant.
    let parent = path.parent().unwrap_or(Path::new("."));
    let base_dir = std::path::absolute(parent).unwrap_or_else(|_| parent.to_owned());
    let base_dir = base_dir.as_path();

    let server = server_settings(&mut issues, &file);
    let admin = super::admin::admin_settings(&file.admin, &server, &mut issues.issues);
    let upstream = super::upstream::upstream_settings(&mut issues, &file, base_dir);
    let credentials = super::credential::credentials(&mut issues, file.credentials, base_dir);
    let routes = super::route::routes(&mut issues, &file.routes, &credentials);
    let cache = super::cache::cache_limits(&mut issues, &file.cache);
    issues
        .warnings
        .extend(super::checks::unreachable_listener_warnings(&server));
    let store = file
        .store
        .as_ref()
        .and_then(|section| super::store::store_settings(&mut issues, section, base_dir));

    if issues.issues.is_empty() {
        Ok(Config {
            path: path.to_owned(),
            server,
            admin,
            upstream,
            credentials: credentials.into_values().flatten().collect(),
            routes,
            cache,
            store,
            secret_sources: issues.secret_sources,
            // The same `FILE: ` prefix errors carry: with several configs (CI linting deploy/),
            // a warning must say which file it is about.
            warnings: issues
                .warnings
                .into_iter()
                .map(|warning| format!("{}: {warning}", path.display()))
                .collect(),
        })
    } else {
        Err(ConfigError {
            path: path.to_owned(),
            issues: issues.issues,
        })
    }
}

fn server_settings(issues: &mut Issues, file: &ConfigFile) -> ServerSettings {
    let listen_specs = file
        .server
        .listen
        .clone()
        .unwrap_or_else(|| vec![DEFAULT_LISTEN.to_owned()]);
    if listen_specs.is_empty() {
        issues.error(
            "server.listen",
            "must name at least one address, e.g. [\"127.0.0.1:8080\"]",
        );
    }
    let listen = listen_specs
        .iter()
        .enumerate()
        .filter_map(|(i, spec)| match parse_listen(spec) {
            Some(addr) => Some(addr),
            None => {
                issues.error(
                    format!("server.listen[{i}]"),
                    format!("`{spec}` is not an IP:port address or unix socket (valid: \"127.0.0.1:8080\", \"[::1]:8080\", \"0.0.0.0:8080\", \"unix:/run/bitbucket-auth-proxy.sock\")"),
                );
                None
            }
        })
        .collect();
    let unix_socket_mode = match file.server.unix_socket_mode.as_deref() {
        None => DEFAULT_UNIX_SOCKET_MODE,
        Some(text) => match u32::from_str_radix(text.trim_start_matches("0o"), 8) {
            Ok(mode) if mode <= 0o777 => mode,
            _ => {
                issues.error(
                    "server.unix_socket_mode",
                    format!("`{text}` is not an octal file mode (valid: \"0660\", \"0600\")"),
                );
                DEFAULT_UNIX_SOCKET_MODE
            }
        },
    };
    let shutdown_grace = parse_duration(
        issues,
        "server.shutdown_grace",
        file.server.shutdown_grace.as_deref(),
        DEFAULT_SHUTDOWN_GRACE,
    );

    let allowed_clients = match &file.server.allowed_clients {
        None => loopback_clients(),
        Some(specs) => specs
            .iter()
            .enumerate()
            .filter_map(|(i, spec)| match parse_cidr(spec) {
                Some(net) => Some(net),
                None => {
                    issues.error(
                        format!("server.allowed_clients[{i}]"),
                        format!("`{spec}` is not a CIDR block (valid: \"127.0.0.1/32\", \"10.0.0.0/8\", \"::1/128\")"),
                    );
                    None
                }
            })
            .collect(),
    };

    let public_url = file.server.public_url.as_deref().and_then(|url| {
        super::upstream::parse_origin(url)
            .map_err(|why| issues.error("server.public_url", format!("`{url}` {why}")))
            .ok()
    });

    let header_read_timeout = parse_duration(
        issues,
        "server.header_read_timeout",
        file.server.header_read_timeout.as_deref(),
        DEFAULT_HEADER_READ_TIMEOUT,
    );
    let send_timeout = parse_duration(
        issues,
        "server.send_timeout",
        file.server.send_timeout.as_deref(),
        DEFAULT_SEND_TIMEOUT,
    );
    let mut positive = |key: &str, value: Option<usize>, default: usize| match value {
        Some(0) => {
            issues.error(key, "must be at least 1");
            default
        }
        Some(n) => n,
        None => default,
    };
    let max_connections = positive(
        "server.max_connections",
        file.server.max_connections,
        DEFAULT_MAX_CONNECTIONS,
    );
    let max_in_flight = positive(
        "server.max_in_flight",
        file.server.max_in_flight,
        DEFAULT_MAX_IN_FLIGHT,
    );
    let max_concurrent_streams = match file.server.max_concurrent_streams {
        Some(0) => {
            issues.error("server.max_concurrent_streams", "must be at least 1");
            DEFAULT_MAX_CONCURRENT_STREAMS
        }
        Some(n) => n,
        None => DEFAULT_MAX_CONCURRENT_STREAMS,
    };
    ServerSettings {
        listen,
        allowed_clients,
        public_url,
        unix_socket_mode,
        shutdown_grace,
        max_connections,
        max_in_flight,
        max_concurrent_streams,
        header_read_timeout,
        send_timeout,
    }
}
