//! Records the commit the binary is built from, for `--version` and the `build_info` metric.
//!
//! Sets `BITBUCKET_AUTH_PROXY_COMMIT` (short hash) and `BITBUCKET_AUTH_PROXY_COMMIT_DATE`
//! (committer date, `YYYY-MM-DD`) when git and a repository are at hand; a build from a source
//! tarball or a container context without `.git` sets neither, and the version stays plain.
//! Either may also be given in the environment of the build, which then wins over git.

use std::path::Path;
use std::process::Command;

const COMMIT: &str = "BITBUCKET_AUTH_PROXY_COMMIT";
const COMMIT_DATE: &str = "BITBUCKET_AUTH_PROXY_COMMIT_DATE";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed={COMMIT}");
    println!("cargo:rerun-if-env-changed={COMMIT_DATE}");
    let from_env = |name: &str| std::env::var(name).ok().filter(|v| valid(v));
    let (commit, date) = match (from_env(COMMIT), from_env(COMMIT_DATE)) {
        (Some(commit), date) => (Some(commit), date),
        (None, _) => match git(&["log", "-1", "--format=%h %cs", "--abbrev=7"]) {
            Some(line) => {
                let mut words = line.split_whitespace().map(str::to_owned);
                (words.next(), words.next())
            }
            None => (None, None),
        },
    };
    if let Some(commit) = commit.filter(|c| valid(c)) {
        println!("cargo:rustc-env={COMMIT}={commit}");
        if let Some(date) = date.filter(|d| valid(d)) {
            println!("cargo:rustc-env={COMMIT_DATE}={date}");
        }
        watch_head();
    }
}

/// Short, printable values only: they end up in a metric label and the version line.
fn valid(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 40
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// Rebuild when HEAD moves: HEAD itself (a checkout), the branch it points to (a commit) and
/// packed-refs (where a branch's ref may live). Worktrees keep HEAD and refs apart, so git
/// names each path. Only existing files: cargo treats a missing one as always changed.
fn watch_head() {
    let mut paths = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        paths.push(branch);
    }
    for path in paths {
        if let Some(file) = git(&["rev-parse", "--git-path", &path])
            && Path::new(&file).exists()
        {
            println!("cargo:rerun-if-changed={file}");
        }
    }
}
