//! The source tree's layering, checked from the source text:
//!
//! - the crate's top-level modules are layers, declared in `src/lib.rs` bottom first; a module
//!   may use only the layers declared before it;
//! - inside each folder, the modules use each other without cycles (what a folder's `mod.rs`
//!   defines itself is the folder's interface, open to its children).
//!
//! Test code (`#[cfg(test)]` items and modules) may reach upwards for fixtures and is not
//! checked. Only `crate::` and `super::` paths are followed: a sibling named by `use sibling::`
//! inside a folder's `mod.rs` is the folder using its own parts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module's path from the crate root, e.g. `["proxy", "admin"]`.
type ModulePath = Vec<String>;

struct SourceFile {
    path: PathBuf,
    module: ModulePath,
    /// The file without comments and `#[cfg(test)]` items.
    code: String,
    /// Modules declared in this file (`mod x;` / `pub mod x;`), test-only ones excluded.
    children: Vec<String>,
    test_only_children: Vec<String>,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

fn module_of(relative: &Path) -> ModulePath {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop().expect("a file name");
    let stem = file.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib") {
        parts.push(stem.to_owned());
    }
    parts
}

/// Removes `//` comments (doc comments included: an intra-doc link is not a dependency).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Removes every item marked `#[cfg(test)]`: a `mod x;` line, or a braced item up to its
/// matching close.
fn strip_test_items(text: &str) -> (String, Vec<String>) {
    let mut kept = String::with_capacity(text.len());
    let mut test_modules = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() != "#[cfg(test)]" {
            kept.push_str(line);
            kept.push('\n');
            continue;
        }
        let mut depth = 0i32;
        let mut opened = false;
        for item_line in lines.by_ref() {
            let trimmed = item_line.trim();
            if let Some(name) = declared_module(trimmed) {
                test_modules.push(name);
            }
            depth += item_line.matches('{').count() as i32;
            depth -= item_line.matches('}').count() as i32;
            opened |= item_line.contains('{');
            if trimmed.starts_with("#[") {
                continue;
            }
            if (opened && depth <= 0) || (!opened && trimmed.ends_with(';')) {
                break;
            }
        }
    }
    (kept, test_modules)
}

/// `x` for a line `mod x;` or `pub mod x;` (any visibility).
fn declared_module(line: &str) -> Option<String> {
    let rest = line.strip_suffix(';')?;
    let rest = rest
        .strip_prefix("pub ")
        .or_else(|| rest.strip_prefix("pub(crate) "))
        .unwrap_or(rest);
    let name = rest.strip_prefix("mod ")?.trim();
    name.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
        .then(|| name.to_owned())
}

fn load() -> Vec<SourceFile> {
    let root = src_dir();
    let mut paths = Vec::new();
    rust_files(&root, &mut paths);
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("readable source");
            let (code, test_only_children) = strip_test_items(&strip_comments(&text));
            let children = code
                .lines()
                .filter_map(|line| declared_module(line.trim()))
                .collect();
            SourceFile {
                module: module_of(path.strip_prefix(&root).expect("under src")),
                path,
                code,
                children,
                test_only_children,
            }
        })
        .collect()
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path `text` names after `crate::` or `super::` (brace groups expanded), resolved to a
/// path from the crate root.
fn references(module: &ModulePath, text: &str) -> Vec<ModulePath> {
    let mut found = Vec::new();
    for (start, _) in text.match_indices("crate::") {
        if start > 0 && text[..start].chars().next_back().is_some_and(is_ident_char) {
            continue;
        }
        expand(&text[start + "crate::".len()..], Vec::new(), &mut found);
    }
    for (start, _) in text.match_indices("super::") {
        let before = &text[..start];
        if before.ends_with("super::") || before.chars().next_back().is_some_and(is_ident_char) {
            continue;
        }
        // A module's `super` is its parent, whether the module is a file or a folder's mod.rs.
        let mut base = module.clone();
        base.pop();
        let mut rest = &text[start + "super::".len()..];
        while let Some(next) = rest.strip_prefix("super::") {
            base.pop();
            rest = next;
        }
        expand(rest, base, &mut found);
    }
    found
}

/// Reads `a::b::{c, d::e}` at the start of `text` onto `prefix`.
fn expand(text: &str, prefix: ModulePath, found: &mut Vec<ModulePath>) {
    let mut path = prefix;
    let mut rest = text;
    loop {
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map_or(group.len(), |(at, _)| at);
            let inner = &group[..end];
            let mut depth = 0;
            let mut part_start = 0;
            for (at, c) in inner.char_indices().chain([(inner.len(), ',')]) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        let part = inner[part_start..at].trim();
                        if !part.is_empty() && part != "self" {
                            expand(part, path.clone(), found);
                        } else if part == "self" {
                            found.push(path.clone());
                        }
                        part_start = at + 1;
                    }
                    _ => {}
                }
            }
            return;
        }
        let ident: String = rest.chars().take_while(|&c| is_ident_char(c)).collect();
        if ident.is_empty() {
            break;
        }
        path.push(ident.clone());
        rest = &rest[ident.len()..];
        match rest.strip_prefix("::") {
            Some(next) => rest = next,
            None => break,
        }
    }
    if !path.is_empty() {
        found.push(path);
    }
}

struct Tree {
    files: Vec<SourceFile>,
    /// Each folder's (and the root's) child modules, test-only ones excluded.
    children: BTreeMap<ModulePath, Vec<String>>,
}

impl Tree {
    fn load() -> Tree {
        let files = load();
        let mut test_only: BTreeSet<ModulePath> = BTreeSet::new();
        for file in &files {
            for child in &file.test_only_children {
                let mut module = file.module.clone();
                module.push(child.clone());
                test_only.insert(module);
            }
        }
        let files: Vec<SourceFile> = files
            .into_iter()
            .filter(|file| !test_only.iter().any(|t| file.module.starts_with(t)))
            .filter(|file| file.module != ["main"])
            .collect();
        let children = files
            .iter()
            .map(|file| (file.module.clone(), file.children.clone()))
            .collect();
        Tree { files, children }
    }
}

#[test]
fn each_layer_uses_only_the_layers_declared_before_it() {
    let tree = Tree::load();
    let layers = &tree.children[&Vec::new()];
    assert!(
        layers.len() >= 10,
        "src/lib.rs should declare the layers: {layers:?}"
    );
    let rank = |name: &str| layers.iter().position(|layer| layer == name);
    let mut violations = BTreeSet::new();
    for file in &tree.files {
        let Some(own) = file.module.first() else {
            continue;
        };
        let own_rank = rank(own).expect("every file belongs to a declared layer");
        for reference in references(&file.module, &file.code) {
            let Some(target) = reference.first() else {
                continue;
            };
            if let Some(target_rank) = rank(target)
                && target_rank > own_rank
            {
                violations.insert(format!(
                    "{} (layer `{own}`) uses `crate::{}` from layer `{target}`, declared after it",
                    file.path.display(),
                    reference.join("::"),
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layering broken (layers in src/lib.rs order: {}):\n{}",
        layers.join(" < "),
        violations.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn the_modules_of_each_folder_use_each_other_without_cycles() {
    let tree = Tree::load();
    let mut failures = Vec::new();
    for (folder, children) in &tree.children {
        if folder.is_empty() || children.is_empty() {
            continue; // the root is checked layer by layer
        }
        let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for file in &tree.files {
            if file.module.len() <= folder.len() || !file.module.starts_with(folder) {
                continue;
            }
            let own = file.module[folder.len()].as_str();
            for reference in references(&file.module, &file.code) {
                if reference.len() <= folder.len() || !reference.starts_with(folder) {
                    continue;
                }
                let target = reference[folder.len()].as_str();
                if target != own
                    && let Some(target) = children.iter().find(|child| *child == target)
                {
                    edges.entry(own).or_default().insert(target.as_str());
                }
            }
        }
        if let Some(cycle) = find_cycle(&edges) {
            failures.push(format!(
                "crate::{}: {}",
                folder.join("::"),
                cycle.join(" -> ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "import cycles between the modules of a folder:\n{}",
        failures.join("\n")
    );
}

fn find_cycle<'a>(edges: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Option<Vec<&'a str>> {
    fn visit<'a>(
        node: &'a str,
        edges: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if let Some(at) = stack.iter().position(|&n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node);
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node);
        for &next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node);
        None
    }
    let mut done = BTreeSet::new();
    for &node in edges.keys() {
        if let Some(cycle) = visit(node, edges, &mut Vec::new(), &mut done) {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn the_checker_sees_paths_groups_and_super() {
    let module: ModulePath = vec!["proxy".into(), "admin".into()];
    let text = "use crate::a::{b, c::{d, e}};\nuse super::sibling::X;\nlet x = crate::f::g(1);";
    let mut found = references(&module, text);
    found.sort();
    let expected: Vec<ModulePath> = [
        vec!["a", "b"],
        vec!["a", "c", "d"],
        vec!["a", "c", "e"],
        vec!["f", "g"],
        vec!["proxy", "sibling", "X"],
    ]
    .into_iter()
    .map(|path| path.into_iter().map(String::from).collect())
    .collect();
    assert_eq!(found, expected);

    let (code, test_modules) = strip_test_items(
        "use crate::kept;\n#[cfg(test)]\nmod tests {\n    use crate::gone;\n}\n#[cfg(test)]\nmod props;\nfn f() {}\n",
    );
    assert!(code.contains("crate::kept") && !code.contains("crate::gone"));
    assert!(code.contains("fn f()"));
    assert_eq!(test_modules, ["props"]);

    let mut edges = BTreeMap::new();
    edges.insert("a", BTreeSet::from(["b"]));
    edges.insert("b", BTreeSet::from(["a"]));
    assert_eq!(find_cycle(&edges), Some(vec!["a", "b", "a"]));
    edges.remove("b");
    assert_eq!(find_cycle(&edges), None);
}
