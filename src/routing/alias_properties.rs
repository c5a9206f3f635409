//! The aliasing invariant, as properties: for any request path, the chosen route equals the
//! route chosen for Bitbucket's canonical spelling of the same resource (names in lower case,
//! git repositories without `.git`), or the request is refused.
//!
//! Two views: [`crate::routing::invariant::check_route`] on paths built from hostile pieces, and
//! spellings generated from known canonical paths (case changes, percent-encoded letters, `.git`,
//! `{UUID}`), each of which must route like its canonical path or be refused.

use proptest::prelude::*;

use super::tests::alias_table;
use crate::routing::invariant::check_route;

/// Cases per property; `PROPTEST_CASES` overrides it for a longer run.
const CASES: u32 = 3000;

fn hostile_path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("".to_owned()),
        Just("acme".to_owned()),
        Just("ACME".to_owned()),
        Just("widgets".to_owned()),
        Just("Widgets".to_owned()),
        Just("WIDGETS".to_owned()),
        Just("widgets.git".to_owned()),
        Just("Widgets.GIT".to_owned()),
        Just("%57IDGETS".to_owned()),
        Just("%77idgets".to_owned()),
        Just("%2577idgets".to_owned()),
        Just("{0b1c-9f}".to_owned()),
        Just("%7B0b1c-9f%7D".to_owned()),
        Just("%7b0B1C%7d".to_owned()),
        Just("%257B0b1c%257D".to_owned()),
        Just("projects".to_owned()),
        Just("WEB".to_owned()),
        Just("web".to_owned()),
        Just("repositories".to_owned()),
        Just("workspaces".to_owned()),
        Just("git-receive-pack".to_owned()),
        Just("info".to_owned()),
        Just("%2F".to_owned()),
        Just("..".to_owned()),
        "[a-zA-Z0-9._-]{1,4}",
    ];
    let start = prop_oneof![
        Just("/2.0/repositories/acme/widgets".to_owned()),
        Just("/2.0/repositories/acme".to_owned()),
        Just("/2.0/repositories".to_owned()),
        Just("/2.0/workspaces/acme".to_owned()),
        Just("/release".to_owned()),
        Just("/all".to_owned()),
        Just("/git/acme".to_owned()),
        Just("/git".to_owned()),
        Just("/".to_owned()),
    ];
    // Mostly whole segments, sometimes glued to the one before.
    let segment = (piece, proptest::bool::weighted(0.8))
        .prop_map(|(piece, own)| if own { format!("/{piece}") } else { piece });
    (start, proptest::collection::vec(segment, 0..6)).prop_map(|(s, pieces)| s + &pieces.concat())
}

/// A canonical path, as segments, with the indices of its name segments and of its git
/// repository segment (if any).
struct Canonical {
    segments: &'static [&'static str],
    names: &'static [usize],
    git_repository: Option<usize>,
}

const CANONICAL: &[Canonical] = &[
    Canonical {
        segments: &["2.0", "repositories", "acme", "widgets", "src"],
        names: &[2, 3],
        git_repository: None,
    },
    Canonical {
        segments: &["2.0", "repositories", "acme", "gadgets"],
        names: &[2, 3],
        git_repository: None,
    },
    Canonical {
        segments: &[
            "2.0",
            "workspaces",
            "acme",
            "projects",
            "web",
            "deploy-keys",
        ],
        names: &[2, 4],
        git_repository: None,
    },
    Canonical {
        segments: &["all", "widgets", "pullrequests"],
        names: &[1],
        git_repository: None,
    },
    Canonical {
        segments: &["release", "widgets"],
        names: &[1],
        git_repository: None,
    },
    Canonical {
        segments: &["git", "acme", "widgets", "git-receive-pack"],
        names: &[1],
        git_repository: Some(2),
    },
    Canonical {
        segments: &["git", "acme", "widgets", "info", "refs"],
        names: &[1],
        git_repository: Some(2),
    },
];

/// One way to spell a name segment that Bitbucket may resolve to the same resource.
#[derive(Debug, Clone)]
enum Spelling {
    AsIs,
    /// Upper-case the letters whose bit is set.
    Case(u32),
    /// Percent-encode the letter at this index (mod length), in upper- or lower-case hex,
    /// once or twice.
    Escaped(usize, bool, bool),
    /// A `{UUID}`, raw or percent-encoded.
    Uuid(bool),
    /// Append `.git` (git repositories only; elsewhere a different name).
    GitSuffix(bool),
}

fn spelling() -> impl Strategy<Value = Spelling> {
    prop_oneof![
        Just(Spelling::AsIs),
        any::<u32>().prop_map(Spelling::Case),
        (any::<usize>(), any::<bool>(), any::<bool>())
            .prop_map(|(i, upper, twice)| Spelling::Escaped(i, upper, twice)),
        any::<bool>().prop_map(Spelling::Uuid),
        any::<bool>().prop_map(Spelling::GitSuffix),
    ]
}

fn spell(name: &str, spelling: &Spelling, git_repository: bool) -> String {
    match spelling {
        Spelling::AsIs => name.to_owned(),
        Spelling::Case(bits) => name
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if bits >> (i % 32) & 1 == 1 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect(),
        Spelling::Escaped(at, upper, twice) => {
            let at = at % name.len();
            let byte = name.as_bytes()[at];
            let hex = if *upper {
                format!("{byte:02X}")
            } else {
                format!("{byte:02x}")
            };
            let escape = if *twice {
                format!("%25{hex}")
            } else {
                format!("%{hex}")
            };
            format!("{}{escape}{}", &name[..at], &name[at + 1..])
        }
        Spelling::Uuid(false) => "{0b1c2d3e-aaaa-bbbb-cccc-0123456789ab}".to_owned(),
        Spelling::Uuid(true) => "%7B0b1c2d3e-aaaa-bbbb-cccc-0123456789ab%7D".to_owned(),
        Spelling::GitSuffix(upper) if git_repository => {
            format!("{name}{}", if *upper { ".GIT" } else { ".git" })
        }
        Spelling::GitSuffix(_) => name.to_owned(),
    }
}

fn join(segments: &[String]) -> String {
    segments.iter().map(|s| format!("/{s}")).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(CASES)
    ))]

    #[test]
    fn any_path_routes_like_its_canonical_spelling_or_is_refused(path in hostile_path()) {
        if let Err(violation) = check_route(&alias_table(), &path) {
            prop_assert!(false, "{}", violation);
        }
    }

    #[test]
    fn every_spelling_routes_like_the_canonical_path_or_is_refused(
        which in 0..CANONICAL.len(),
        spellings in proptest::collection::vec(spelling(), 3),
    ) {
        let canonical = &CANONICAL[which];
        let table = alias_table();
        let canonical_path = join(
            &canonical.segments.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
        );
        let expected = table
            .route(&canonical_path)
            .unwrap_or_else(|e| panic!("{canonical_path}: {e}"))
            .map(|r| r.prefix.clone());
        let mut segments: Vec<String> =
            canonical.segments.iter().map(|s| (*s).to_owned()).collect();
        let positions = canonical.names.iter().copied().chain(canonical.git_repository);
        for (index, spelling) in positions.zip(&spellings) {
            let git = canonical.git_repository == Some(index);
            segments[index] = spell(&segments[index], spelling, git);
        }
        let path = join(&segments);
        if let Ok(found) = table.route(&path) {
            prop_assert_eq!(found.map(|r| r.prefix.clone()), expected, "{}", path);
        }
    }
}

/// The inputs that found flaws in the oracle (`fuzz/regressions/route_path/`).
#[test]
fn fuzz_regressions_hold() {
    for path in [
        "/git/acme/.git/al}CM#E",
        "/git/acme/widgets.GIT.git/;,;/%9f;",
    ] {
        if let Err(violation) = check_route(&alias_table(), path) {
            panic!("{violation}");
        }
    }
}
