//! `[admin]`: validates the admin listener's addresses and the clients it admits. Owns nothing
//! else; the listener itself is started in `crate::server::listener`.

use super::fields::{loopback_clients, parse_cidr, parse_listen};
use super::file::AdminSection;
use super::{AdminSettings, ConfigIssue, ListenAddr, ServerSettings};

pub(super) fn admin_settings(
    section: &AdminSection,
    server: &ServerSettings,
    issues: &mut Vec<ConfigIssue>,
) -> AdminSettings {
    let mut error = |key: String, message: String| {
        issues.push(ConfigIssue {
            key,
            message,
            missing_env: None,
        })
    };
    let listen: Vec<ListenAddr> = match &section.listen {
        None => Vec::new(),
        Some(specs) if specs.is_empty() => {
            error(
                "admin.listen".into(),
                "must name at least one address, e.g. [\"127.0.0.1:9090\"]; or remove admin.listen to serve the admin endpoints on server.listen".into(),
            );
            Vec::new()
        }
        Some(specs) => specs
            .iter()
            .enumerate()
            .filter_map(|(i, spec)| {
                let key = format!("admin.listen[{i}]");
                let Some(addr) = parse_listen(spec) else {
                    error(key, format!("`{spec}` is not an IP:port address or unix socket (valid: \"127.0.0.1:9090\", \"[::1]:9090\", \"0.0.0.0:9090\", \"unix:/run/bitbucket-auth-proxy/admin.sock\")"));
                    return None;
                };
                if clashes_with(&addr, &server.listen) {
                    error(key, format!("`{spec}` is also in server.listen; the admin listener needs an address of its own"));
                    return None;
                }
                Some(addr)
            })
            .collect(),
    };
    let allowed_clients = match &section.allowed_clients {
        None => loopback_clients(),
        Some(_) if section.listen.is_none() => {
            error(
                "admin.allowed_clients".into(),
                "applies to the admin listener only, and admin.listen is not set; set admin.listen (e.g. [\"127.0.0.1:9090\"]) or control access to the admin endpoints with server.allowed_clients".into(),
            );
            Vec::new()
        }
        Some(specs) => specs
            .iter()
            .enumerate()
            .filter_map(|(i, spec)| {
                let net = parse_cidr(spec);
                if net.is_none() {
                    error(
                        format!("admin.allowed_clients[{i}]"),
                        format!("`{spec}` is not a CIDR block (valid: \"127.0.0.1/32\", \"10.0.0.0/8\", \"::1/128\")"),
                    );
                }
                net
            })
            .collect(),
    };
    AdminSettings {
        listen,
        allowed_clients,
    }
}

/// The same unix path, or the same TCP address with a fixed port (port 0 picks a free one).
fn clashes_with(addr: &ListenAddr, server: &[ListenAddr]) -> bool {
    server.iter().any(|other| match (addr, other) {
        (ListenAddr::Tcp(a), ListenAddr::Tcp(b)) => a.port() != 0 && a == b,
        (ListenAddr::Unix(a), ListenAddr::Unix(b)) => a == b,
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, ListenAddr};

    const ROUTES: &str = r#"
[credentials.widgets-ci]
kind = "repository_access_token"
repository = "acme/widgets"
token = { value = "repo-token" }

[[routes]]
prefix = "/2.0/repositories/acme/widgets"
credential = "widgets-ci"
"#;

    fn load(head: &str) -> Result<Config, String> {
        Config::from_toml(
            Path::new("/etc/bbap/admin.toml"),
            &format!("{head}\n{ROUTES}"),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn without_an_admin_section_the_endpoints_stay_on_the_main_listener() {
        let config = load("").unwrap();
        assert!(!config.admin.is_separate());
        assert!(config.admin.listen.is_empty());
    }

    #[test]
    fn an_admin_listener_takes_addresses_and_defaults_to_loopback_clients() {
        let config =
            load("[admin]\nlisten = [\"127.0.0.1:9090\", \"unix:/run/bbap/admin.sock\"]\n")
                .unwrap();
        assert!(config.admin.is_separate());
        assert_eq!(
            config.admin.listen,
            [
                ListenAddr::Tcp("127.0.0.1:9090".parse().unwrap()),
                ListenAddr::Unix("/run/bbap/admin.sock".into())
            ]
        );
        let loopback: Vec<String> = config
            .admin
            .allowed_clients
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(loopback, ["127.0.0.0/8", "::1/128"]);

        let config = load(
            "[admin]\nlisten = [\"0.0.0.0:9090\"]\nallowed_clients = [\"10.0.0.0/8\", \"192.168.1.7\"]\n",
        )
        .unwrap();
        let allowed: Vec<String> = config
            .admin
            .allowed_clients
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(allowed, ["10.0.0.0/8", "192.168.1.7/32"]);
    }

    #[test]
    fn bad_admin_settings_name_the_file_the_key_and_what_is_valid() {
        let cases = [
            (
                "[admin]\nlisten = []\n",
                "/etc/bbap/admin.toml: admin.listen: must name at least one address",
            ),
            (
                "[admin]\nlisten = [\"localhost:9090\"]\n",
                "/etc/bbap/admin.toml: admin.listen[0]: `localhost:9090` is not an IP:port address",
            ),
            (
                "[server]\nlisten = [\"127.0.0.1:8080\"]\n[admin]\nlisten = [\"127.0.0.1:8080\"]\n",
                "/etc/bbap/admin.toml: admin.listen[0]: `127.0.0.1:8080` is also in server.listen",
            ),
            (
                "[admin]\nallowed_clients = [\"10.0.0.0/8\"]\n",
                "/etc/bbap/admin.toml: admin.allowed_clients: applies to the admin listener only, and admin.listen is not set",
            ),
            (
                "[admin]\nlisten = [\"127.0.0.1:9090\"]\nallowed_clients = [\"10.0.0.0/33\"]\n",
                "/etc/bbap/admin.toml: admin.allowed_clients[0]: `10.0.0.0/33` is not a CIDR block",
            ),
            (
                "[admin]\nlisten = [\"127.0.0.1:9090\"]\nport = 9090\n",
                "unknown field `port`",
            ),
        ];
        for (head, expected) in cases {
            let error = load(head).expect_err(head);
            assert!(error.contains(expected), "{head}\n{error}");
        }
    }

    #[test]
    fn port_zero_on_both_listeners_is_no_clash() {
        let config =
            load("[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = [\"127.0.0.1:0\"]\n")
                .unwrap();
        assert!(config.admin.is_separate());
    }
}
