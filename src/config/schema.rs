//! The config file's JSON Schema, generated from the serde types in `file` so it cannot drift
//! from what the proxy accepts. Committed as `config/schema.json` (a test keeps it current) and
//! printed by the `schema` subcommand; taplo and Even Better TOML use it through a
//! `#:schema` line at the top of a config.

use super::file::ConfigFile;

/// Where the committed copy lives, relative to the repository root.
pub const SCHEMA_FILE: &str = "config/schema.json";

/// The schema as pretty-printed JSON, ending in a newline.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(ConfigFile);
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema serialises to JSON");
    text.push('\n');
    text
}
