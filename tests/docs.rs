//! The documentation's links hold (issue 17, "Documentation that guides"): every relative link in
//! README.md, SECURITY.md, CHANGELOG.md and docs/*.md names a file or folder that exists, and
//! every `#anchor` names a heading of the page it points at, as GitHub derives anchors from
//! headings. Links to other hosts are not checked (tests reach loopback only).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The pages whose links are checked: the top-level guides and everything under docs/.
fn pages() -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    let mut pages: Vec<PathBuf> = ["README.md", "SECURITY.md", "CHANGELOG.md"]
        .iter()
        .map(|name| root.join(name))
        .collect();
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The page's lines outside fenced code blocks, with their line numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            lines.push((i + 1, line));
        }
    }
    lines
}

/// GitHub's anchor for a heading: lower case, punctuation other than `-` and `_` dropped,
/// spaces turned into `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Every anchor a page offers; a repeated heading gets `-1`, `-2`, ... as on GitHub.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    for (_, line) in prose_lines(text) {
        let hashes = line.len() - line.trim_start_matches('#').len();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(&line[hashes..]);
        let count = seen.entry(base.clone()).or_default();
        anchors.insert(if *count == 0 {
            base.clone()
        } else {
            format!("{base}-{count}")
        });
        *count += 1;
    }
    anchors
}

/// The targets of the inline links `[text](target)` on a line, outside code spans.
fn link_targets(line: &str) -> Vec<&str> {
    let mut targets = Vec::new();
    let mut in_code = false;
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'`' => in_code = !in_code,
            b']' if !in_code && bytes.get(i + 1) == Some(&b'(') => {
                if let Some(end) = line[i + 2..].find(')') {
                    targets.push(&line[i + 2..i + 2 + end]);
                    i += 2 + end;
                }
            }
            _ => {}
        }
        i += 1;
    }
    targets
}

/// Every broken relative link of one page, as `page:line: target: why`.
fn broken_links(page: &Path, text: &str) -> Vec<String> {
    let mut broken = Vec::new();
    for (number, line) in prose_lines(text) {
        for target in link_targets(line) {
            let target = target.split_whitespace().next().unwrap_or("");
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target, None),
            };
            let file = page.parent().unwrap().join(path);
            let why = if !path.is_empty() && !file.exists() {
                Some("no such file".to_owned())
            } else {
                anchor.and_then(|anchor| {
                    let offered = if path.is_empty() {
                        anchors(text)
                    } else {
                        anchors(&std::fs::read_to_string(&file).ok()?)
                    };
                    (!offered.contains(anchor)).then(|| format!("no heading #{anchor}"))
                })
            };
            if let Some(why) = why {
                broken.push(format!("{}:{number}: {target}: {why}", page.display()));
            }
        }
    }
    broken
}

#[test]
fn every_relative_link_and_anchor_in_the_docs_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text =
            std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        checked += prose_lines(&text)
            .iter()
            .map(|(_, line)| link_targets(line).len())
            .sum::<usize>();
        broken.extend(broken_links(&page, &text));
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(checked >= 50, "only {checked} links found");
}

/// The checker itself: it finds a missing file, a missing anchor and a missing anchor on the
/// same page, and takes GitHub's spelling of anchors (backticks, brackets and dots dropped,
/// repeated headings numbered), ignoring links in code.
#[test]
fn the_link_checker_finds_broken_links_and_spells_anchors_as_github_does() {
    let page = Path::new(ROOT).join("docs").join("page.md");
    let text = "# Page\n\n## `[credentials.NAME]`\n\n## Logs\n\n## Logs\n\n\
        [ok](#credentialsname) [ok](#logs-1) [ok](configuration.md#server) \
        [ok](../deploy) `[code](missing.md)`\n\
        [bad](missing.md) [bad](#nowhere) [bad](configuration.md#nowhere)\n\
        ```\n[fenced](missing.md)\n```\n";
    let broken = broken_links(&page, text);
    assert_eq!(broken.len(), 3, "{broken:#?}");
    assert!(
        broken[0].ends_with("missing.md: no such file"),
        "{broken:#?}"
    );
    assert!(
        broken[1].ends_with("#nowhere: no heading #nowhere"),
        "{broken:#?}"
    );
    assert!(
        broken[2].ends_with("configuration.md#nowhere: no heading #nowhere"),
        "{broken:#?}"
    );
}

/// The README is where a newcomer starts: it links every page under docs/.
#[test]
fn the_readme_links_every_docs_page() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let linked: BTreeSet<&str> = prose_lines(&readme)
        .iter()
        .flat_map(|(_, line)| link_targets(line))
        .map(|target| target.split('#').next().unwrap())
        .collect();
    let pages: Vec<PathBuf> = pages()
        .into_iter()
        .filter(|page| page.parent() == Some(&Path::new(ROOT).join("docs")))
        .collect();
    assert!(pages.len() >= 9, "{pages:?}");
    for page in pages {
        let name = format!("docs/{}", page.file_name().unwrap().to_str().unwrap());
        assert!(
            linked.contains(name.as_str()),
            "README.md does not link {name}"
        );
    }
}
