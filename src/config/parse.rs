//! Config text to [`ConfigFile`], with every schema problem reported at once.
//!
//! serde stops at the first problem, names no key, and (inside a credential, which serde reads
//! as a whole table) points at the table rather than the key. This module parses the TOML into
//! a spanned tree first, then deserialises repeatedly: each error is attributed to the dotted
//! key path whose span holds it, that entry is dropped, and deserialisation runs again, until
//! it succeeds or nothing more can be attributed. The issues come back in file order, each with
//! its line, and type errors say what was expected first ("expected a duration like \"60s\",
//! found integer `60`"). Owns nothing but this; it may use only `file` and the toml crate.

use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::ConfigIssue;
use super::file::{ConfigFile, CredentialSection};

/// Enough rounds for every key of any sensible config to be at fault once.
const MAX_ROUNDS: usize = 200;

/// One key or array element of the parsed document.
struct Entry {
    /// `upstream.timeout`, `routes[2].methods[0]`.
    path: String,
    /// The last key of `path`; empty for array elements.
    key: String,
    key_span: Option<Range<usize>>,
    value_span: Range<usize>,
}

/// A schema problem before it is turned into a [`ConfigIssue`].
struct Found {
    offset: usize,
    key: String,
    message: String,
}

/// Parses `text`; on failure, every problem found, in file order.
pub(super) fn parse(text: &str) -> Result<ConfigFile, Vec<ConfigIssue>> {
    let (root, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        // The first is the cause; the parser's recovery makes the rest mostly its echoes.
        let found = syntax_errors
            .iter()
            .take(1)
            .map(|error| Found {
                offset: error.span().map_or(0, |span| span.start),
                key: String::new(),
                message: error.message().trim_end().to_owned(),
            })
            .collect();
        return Err(into_issues(text, found));
    }
    let mut entries = Vec::new();
    index_table(root.get_ref(), "", &mut entries);

    let mut tree = root;
    let mut found: Vec<Found> = Vec::new();
    // Keys dropped for a bad value: their table's "missing field" that follows is no news.
    let mut dropped: Vec<String> = Vec::new();
    for _ in 0..MAX_ROUNDS {
        let error = match ConfigFile::deserialize(toml::de::Deserializer::from(tree.clone())) {
            Ok(file) if found.is_empty() => return Ok(file),
            Ok(_) => return Err(into_issues(text, found)),
            Err(error) => error,
        };
        let (span, message) = match credential_key_error(&tree, &entries, &error) {
            Some(precise) => (precise.span().unwrap_or(0..0), precise.message().to_owned()),
            None => (error.span().unwrap_or(0..0), error.message().to_owned()),
        };
        let message = message.trim_end();
        let Some(at) = innermost(&entries, &span) else {
            // At the document itself: nothing to drop, so nothing more to learn.
            found.push(Found {
                offset: span.start,
                key: missing_field(message).unwrap_or_default().to_owned(),
                message: describe(message),
            });
            return Err(into_issues(text, found));
        };
        let (culprit, key, offset) = if let Some(field) = unknown_field(message) {
            // Inside a credential the span is the table's: find the key by name.
            let culprit = descendant_named(&entries, at, field).unwrap_or(at);
            let offset = entry_offset(culprit);
            (culprit, culprit.path.clone(), offset)
        } else if let Some(field) = missing_field(message) {
            let key = join(&at.path, field);
            if dropped.contains(&key) {
                if !prune(&mut tree, &at.value_span) {
                    return Err(into_issues(text, found));
                }
                continue;
            }
            (at, key, entry_offset(at))
        } else if message.starts_with("unknown variant") && at.key != "kind" {
            let kind = descendant_named(&entries, at, "kind");
            let offset = kind.map_or_else(|| entry_offset(at), entry_offset);
            (at, join(&at.path, "kind"), offset)
        } else {
            (at, at.path.clone(), span.start)
        };
        found.push(Found {
            offset,
            key: key.clone(),
            message: describe(message),
        });
        dropped.push(culprit.path.clone());
        if !prune(&mut tree, &culprit.value_span) {
            return Err(into_issues(text, found));
        }
    }
    Err(into_issues(text, found))
}

/// serde reads a credential (an internally tagged enum) as one buffered table, so its errors
/// carry the table's span. Deserialising the same keys as the kind's own struct yields the
/// error again with the offending key's span.
fn credential_key_error(
    tree: &Spanned<DeTable<'_>>,
    entries: &[Entry],
    error: &toml::de::Error,
) -> Option<toml::de::Error> {
    let at = innermost(entries, &error.span()?)?;
    let name = at.path.strip_prefix("credentials.")?;
    let credentials = tree
        .get_ref()
        .iter()
        .find(|(key, _)| key.get_ref() == "credentials")?
        .1;
    let DeValue::Table(credentials) = credentials.get_ref() else {
        return None;
    };
    let (_, credential) = credentials.iter().find(|(key, _)| key.get_ref() == name)?;
    let DeValue::Table(table) = credential.get_ref() else {
        return None;
    };
    let mut keys = table.clone();
    let kind_key = keys
        .iter()
        .find(|(key, _)| key.get_ref() == "kind")?
        .0
        .clone();
    let kind = match keys.remove(&kind_key)?.into_inner() {
        DeValue::String(kind) => kind,
        _ => return None,
    };
    let deserializer =
        toml::de::ValueDeserializer::from(Spanned::new(credential.span(), DeValue::Table(keys)));
    CredentialSection::check_keys(&kind, deserializer)?.err()
}

fn into_issues(text: &str, mut found: Vec<Found>) -> Vec<ConfigIssue> {
    found.sort_by_key(|found| found.offset);
    found
        .into_iter()
        .map(|found| {
            let line = text[..found.offset.min(text.len())].matches('\n').count() + 1;
            ConfigIssue {
                key: found.key,
                message: format!("{} (line {line})", found.message),
                missing_env: None,
            }
        })
        .collect()
}

/// serde's "invalid type: integer `60`, expected a string" leads with what the reader needs.
fn describe(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix)
            && let Some((found, expected)) = rest.rsplit_once(", expected ")
        {
            let expected = match expected {
                "a sequence" => "an array",
                "usize" | "u32" | "u64" => "a whole number",
                other => other,
            };
            return format!("expected {expected}, found {found}");
        }
    }
    if let Some(field) = missing_field(message) {
        return format!("`{field}` is required here");
    }
    message.to_owned()
}

fn unknown_field(message: &str) -> Option<&str> {
    message.strip_prefix("unknown field `")?.split('`').next()
}

fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn index_table(table: &DeTable<'_>, path: &str, out: &mut Vec<Entry>) {
    for (key, value) in table.iter() {
        let path = join(path, key.get_ref());
        out.push(Entry {
            path: path.clone(),
            key: key.get_ref().to_string(),
            key_span: Some(key.span()),
            value_span: value.span(),
        });
        index_value(value, &path, out);
    }
}

fn index_value(value: &Spanned<DeValue<'_>>, path: &str, out: &mut Vec<Entry>) {
    match value.get_ref() {
        DeValue::Table(table) => index_table(table, path, out),
        DeValue::Array(array) => {
            for (i, element) in array.iter().enumerate() {
                let path = format!("{path}[{i}]");
                out.push(Entry {
                    path: path.clone(),
                    key: String::new(),
                    key_span: None,
                    value_span: element.span(),
                });
                index_value(element, &path, out);
            }
        }
        _ => {}
    }
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// The deepest entry whose key or value span holds `span` (children follow their parents).
fn innermost<'a>(entries: &'a [Entry], span: &Range<usize>) -> Option<&'a Entry> {
    entries.iter().rev().find(|entry| {
        contains(&entry.value_span, span)
            || entry
                .key_span
                .as_ref()
                .is_some_and(|key| contains(key, span))
    })
}

/// The first entry under `parent` (at any depth) whose key is `key`.
fn descendant_named<'a>(entries: &'a [Entry], parent: &Entry, key: &str) -> Option<&'a Entry> {
    let under = format!("{}.", parent.path);
    let first = entries
        .iter()
        .filter(|entry| entry.path.starts_with(&under));
    first
        .clone()
        .find(|entry| entry.path[under.len()..] == *key)
        .or_else(|| first.clone().find(|entry| entry.key == key))
}

fn entry_offset(entry: &Entry) -> usize {
    entry
        .key_span
        .as_ref()
        .map_or(entry.value_span.start, |span| span.start)
}

/// Removes the value spanning exactly `span` from the tree; false if there is none. The deepest
/// match goes: an array of tables may share its first element's span.
fn prune(tree: &mut Spanned<DeTable<'_>>, span: &Range<usize>) -> bool {
    prune_table(tree.get_mut(), span)
}

fn prune_table(table: &mut DeTable<'_>, span: &Range<usize>) -> bool {
    if table.iter_mut().any(|(_, value)| prune_inside(value, span)) {
        return true;
    }
    let culprit = table
        .iter()
        .find(|(_, value)| value.span() == *span)
        .map(|(key, _)| key.clone());
    culprit.is_some_and(|key| table.remove(&key).is_some())
}

/// Removes a value strictly inside `value`.
fn prune_inside(value: &mut Spanned<DeValue<'_>>, span: &Range<usize>) -> bool {
    match value.get_mut() {
        DeValue::Table(table) => prune_table(table, span),
        DeValue::Array(array) => {
            if array.iter_mut().any(|element| prune_inside(element, span)) {
                return true;
            }
            let before = array.len();
            *array = std::mem::replace(array, toml::de::DeArray::new())
                .into_iter()
                .filter(|element| element.span() != *span)
                .collect();
            array.len() != before
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `check_keys` names the kinds by hand; the schema lists the ones serde really accepts.
    #[test]
    fn check_keys_knows_every_credential_kind() {
        let schema: serde_json::Value =
            serde_json::from_str(&super::super::schema::json_schema()).unwrap();
        let kinds: Vec<String> = schema["$defs"]["CredentialSection"]["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|variant| {
                variant["properties"]["kind"]["const"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(kinds.len(), 6, "{kinds:?}");
        for kind in kinds {
            let empty = Spanned::new(0..0, DeValue::Table(DeTable::new()));
            let checked =
                CredentialSection::check_keys(&kind, toml::de::ValueDeserializer::from(empty));
            let error = checked.unwrap_or_else(|| panic!("check_keys does not know {kind}"));
            assert!(error.unwrap_err().message().starts_with("missing field"));
        }
        let empty = Spanned::new(0..0, DeValue::Table(DeTable::new()));
        assert!(
            CredentialSection::check_keys("bearer", toml::de::ValueDeserializer::from(empty))
                .is_none()
        );
    }

    #[test]
    fn a_bad_value_inside_a_credential_is_reported_at_its_key() {
        let issues = parse(
            "[credentials.a]\nkind = \"api_token\"\nemail = \"a@b.example\"\ntoken = { env = \"T\" }\nrate_limit = { per_hour = \"many\" }\n",
        )
        .unwrap_err();
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].key, "credentials.a.rate_limit.per_hour");
        assert!(
            issues[0]
                .message
                .starts_with("expected a whole number, found string"),
            "{issues:?}"
        );
        assert!(issues[0].message.ends_with("(line 5)"), "{issues:?}");
    }
}
