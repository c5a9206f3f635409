//! Request-path safety: the check that keeps every forwarded path inside its route.
//!
//! Rather than normalising a path and guessing how Bitbucket (or anything between) merges slashes
//! or decodes percent-escapes, the proxy refuses any path that could change meaning under up to
//! two rounds of percent-decoding and dot-segment removal. Ordinary paths pass byte-for-byte.

use std::borrow::Cow;

/// Why a path was refused; the message goes back to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with '/'")]
    NotAbsolute,
    #[error("the path contains a '.' or '..' segment (raw or percent-encoded)")]
    DotSegment,
    #[error("the path contains an empty segment ('//', raw or percent-encoded)")]
    EmptySegment,
    #[error("the path contains a backslash (raw or percent-encoded)")]
    Backslash,
    #[error("the path contains a NUL or control character (raw or percent-encoded)")]
    ControlCharacter,
    #[error("the path contains a malformed percent-escape")]
    MalformedEscape,
    #[error("the path means a different route once percent-decoded")]
    AmbiguousEncoding,
}

/// Checks `path` (as received, still percent-encoded) in its raw, once-decoded and twice-decoded
/// forms. Allocates only when the path contains a `%`.
pub fn check_path(path: &str) -> Result<(), PathError> {
    let raw = path.as_bytes();
    check_form(raw)?;
    if !raw.contains(&b'%') {
        return Ok(());
    }
    let once = percent_decode(raw, Strictness::Strict)?;
    check_form(&once)?;
    if once.contains(&b'%') {
        let twice = percent_decode(&once, Strictness::Lenient)?;
        check_form(&twice)?;
    }
    Ok(())
}

/// One form of the path: absolute, no backslash or control byte, no empty segment but a trailing
/// one (`/src/main/` lists a directory), no dot-segment, also not `..;param`.
///
/// One pass over the bytes, as every request's path goes through it at least once. A backslash
/// or control byte anywhere is the error reported even after a bad segment, as a reader who
/// scans for those first would report it.
fn check_form(path: &[u8]) -> Result<(), PathError> {
    let Some(rest) = path.strip_prefix(b"/") else {
        return Err(PathError::NotAbsolute);
    };
    let mut segment_error = None;
    let mut segment_start = 0;
    // Where the current segment's `;params` begin: a dot-segment is judged without them.
    let mut name_end = None;
    for (i, &b) in rest.iter().enumerate() {
        match b {
            b'/' => {
                if segment_error.is_none() {
                    let name = &rest[segment_start..name_end.unwrap_or(i)];
                    segment_error = if i == segment_start {
                        Some(PathError::EmptySegment)
                    } else {
                        dot_segment(name)
                    };
                }
                segment_start = i + 1;
                name_end = None;
            }
            b';' => {
                name_end.get_or_insert(i);
            }
            b'\\' => return Err(PathError::Backslash),
            b if b.is_ascii_control() => return Err(PathError::ControlCharacter),
            _ => {}
        }
    }
    // The last segment may be empty: `/` and `/src/main/`.
    let last = &rest[segment_start..name_end.unwrap_or(rest.len())];
    match segment_error.or_else(|| dot_segment(last)) {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

fn dot_segment(name: &[u8]) -> Option<PathError> {
    matches!(name, b"." | b"..").then_some(PathError::DotSegment)
}

#[derive(Clone, Copy)]
enum Strictness {
    /// A malformed escape is an error: the client sent something no server decodes the same way.
    Strict,
    /// A `%` that is not an escape stays literal: after one round of decoding, `100%25` is `100%`.
    Lenient,
}

fn percent_decode(input: &[u8], strictness: Strictness) -> Result<Cow<'_, [u8]>, PathError> {
    if !input.contains(&b'%') {
        return Ok(Cow::Borrowed(input));
    }
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if b == b'%' {
            let decoded = input
                .get(i + 1..i + 3)
                .and_then(|hex| Some(hex_value(hex[0])? << 4 | hex_value(hex[1])?));
            match (decoded, strictness) {
                (Some(byte), _) => {
                    out.push(byte);
                    i += 3;
                    continue;
                }
                (None, Strictness::Strict) => return Err(PathError::MalformedEscape),
                (None, Strictness::Lenient) => {}
            }
        }
        out.push(b);
        i += 1;
    }
    Ok(Cow::Owned(out))
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The path percent-decoded once and, if that still holds a `%`, twice: the forms
/// [`check_path`] also checks, for checking that decoding does not change the route. Empty when
/// the path has no escapes (the common case, no allocation).
pub fn decoded_for_routing(path: &str) -> Vec<Vec<u8>> {
    let mut forms = Vec::new();
    if !path.contains('%') {
        return forms;
    }
    let mut form = path.as_bytes().to_vec();
    while forms.len() < 2 && form.contains(&b'%') {
        let Ok(decoded) = percent_decode(&form, Strictness::Lenient) else {
            break;
        };
        form = decoded.into_owned();
        forms.push(form.clone());
    }
    forms
}

/// Whether `prefix` (without trailing slash) covers `path` on a whole-segment boundary.
pub fn segment_prefix_matches(prefix: &[u8], path: &[u8]) -> bool {
    path.starts_with(prefix) && matches!(path.get(prefix.len()), None | Some(b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Named attacks, each refused with the reason given.
    pub(crate) const ATTACKS: &[(&str, PathError)] = &[
        (
            "/2.0/repositories/acme/widgets/../gadgets",
            PathError::DotSegment,
        ),
        ("/2.0/repositories/acme/widgets/..", PathError::DotSegment),
        ("/2.0/repositories/acme/widgets/./x", PathError::DotSegment),
        (
            "/2.0/repositories/acme/widgets/%2e%2e/gadgets",
            PathError::DotSegment,
        ),
        (
            "/2.0/repositories/acme/widgets/%2E%2E/gadgets",
            PathError::DotSegment,
        ),
        (
            "/2.0/repositories/acme/widgets/.%2e/gadgets",
            PathError::DotSegment,
        ),
        (
            "/2.0/repositories/acme/widgets/%252e%252e/gadgets",
            PathError::DotSegment,
        ),
        (
            "/2.0/repositories/acme/widgets/%252E./gadgets",
            PathError::DotSegment,
        ),
        (
            "/2.0/repositories/acme/widgets/..;/gadgets",
            PathError::DotSegment,
        ),
        (
            "/2.0/repositories/acme/widgets/%2e%2e;x/gadgets",
            PathError::DotSegment,
        ),
        (
            "/2.0/repositories/acme/widgets%2F..%2Fgadgets",
            PathError::DotSegment,
        ),
        (
            "/2.0/repositories/acme/widgets%2f%2e%2e",
            PathError::DotSegment,
        ),
        (
            "/2.0/repositories/acme/widgets%252F..%252Fgadgets",
            PathError::DotSegment,
        ),
        ("/2.0/repositories/acme/widgets//x", PathError::EmptySegment),
        (
            "/2.0/repositories/acme/widgets/%2F/x",
            PathError::EmptySegment,
        ),
        (
            "/2.0/repositories/acme/widgets/%252F%252Fx",
            PathError::EmptySegment,
        ),
        ("//evil.example/2.0", PathError::EmptySegment),
        (
            "/2.0/repositories/acme/widgets/..\\gadgets",
            PathError::Backslash,
        ),
        (
            "/2.0/repositories/acme/widgets/%5C..%5Cgadgets",
            PathError::Backslash,
        ),
        ("/2.0/repositories/acme/widgets/%5c", PathError::Backslash),
        ("/2.0/repositories/acme/widgets/%255C", PathError::Backslash),
        (
            "/2.0/repositories/acme/widgets/%00",
            PathError::ControlCharacter,
        ),
        (
            "/2.0/repositories/acme/widgets/%2500",
            PathError::ControlCharacter,
        ),
        (
            "/2.0/repositories/acme/widgets/\0",
            PathError::ControlCharacter,
        ),
        (
            "/2.0/repositories/acme/widgets/%0d%0aX-Injected:%201",
            PathError::ControlCharacter,
        ),
        (
            "/2.0/repositories/acme/widgets/%7f",
            PathError::ControlCharacter,
        ),
        (
            "/2.0/repositories/acme/widgets/%zz",
            PathError::MalformedEscape,
        ),
        (
            "/2.0/repositories/acme/widgets/%2",
            PathError::MalformedEscape,
        ),
        ("*", PathError::NotAbsolute),
        ("", PathError::NotAbsolute),
    ];

    #[test]
    fn named_attacks_are_refused() {
        for (path, expected) in ATTACKS {
            assert_eq!(check_path(path), Err(*expected), "{path:?}");
        }
    }

    #[test]
    fn ordinary_paths_pass() {
        for path in [
            "/",
            "/2.0/repositories/acme/widgets",
            "/2.0/repositories/acme/widgets/",
            "/2.0/repositories/acme/widgets/src/main/docs/",
            "/2.0/repositories/acme/widgets/refs/branches/feature%2Ffoo",
            "/2.0/repositories/acme/widgets/src/main/a%20b.txt",
            "/2.0/repositories/acme/widgets/src/main/%7Euser",
            "/2.0/repositories/acme/widgets/src/main/100%25",
            "/2.0/repositories/acme/widgets/src/main/.gitignore",
            "/2.0/repositories/acme/widgets/src/main/...",
            "/2.0/repositories/acme/widgets/src/main/a..b",
            "/2.0/repositories/%7Bworkspace-uuid%7D",
        ] {
            assert_eq!(check_path(path), Ok(()), "{path:?}");
        }
    }

    /// `check_form` as the rules read, pass by pass: the oracle its one-pass form must agree
    /// with on every input.
    fn check_form_by_the_rules(path: &[u8]) -> Result<(), PathError> {
        let Some(rest) = path.strip_prefix(b"/") else {
            return Err(PathError::NotAbsolute);
        };
        if let Some(&b) = path.iter().find(|&&b| b == b'\\' || b.is_ascii_control()) {
            return Err(if b == b'\\' {
                PathError::Backslash
            } else {
                PathError::ControlCharacter
            });
        }
        let segments: Vec<&[u8]> = rest.split(|&b| b == b'/').collect();
        for (i, segment) in segments.iter().enumerate() {
            if segment.is_empty() && i + 1 < segments.len() {
                return Err(PathError::EmptySegment);
            }
            let name = segment.split(|&b| b == b';').next().unwrap_or(segment);
            if name == b"." || name == b".." {
                return Err(PathError::DotSegment);
            }
        }
        Ok(())
    }

    proptest::proptest! {
        // Cheap cases over a small alphabet: many of them reach every order of its bytes.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]
        #[test]
        fn one_pass_check_agrees_with_the_rules(
            path in proptest::collection::vec(
                // Mostly the bytes that shape segments; a backslash or control byte seldom, as
                // one anywhere decides the answer.
                proptest::sample::select(b"////....;;;aa%\\\0\x7f\t".to_vec()),
                0..16,
            )
        ) {
            proptest::prop_assert_eq!(check_form(&path), check_form_by_the_rules(&path));
        }
    }

    #[test]
    fn decoding_for_routing_only_when_escaped() {
        assert!(decoded_for_routing("/a/b").is_empty());
        assert_eq!(decoded_for_routing("/a%2Fb"), [b"/a/b".to_vec()]);
        assert_eq!(
            decoded_for_routing("/a%252Fb"),
            [b"/a%2Fb".to_vec(), b"/a/b".to_vec()]
        );
    }
}
