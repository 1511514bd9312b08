//! README.md's settings table names every `LMFORGE_*` setting of the code, so that it
//! cannot go stale.

use std::collections::BTreeSet;

use lmforge_deploy_check::{read, repo_root, rust_sources};
use regex::Regex;

/// The rows of the table under `## Settings (`LMFORGE_*`)`: the names in their first cell.
fn documented() -> BTreeSet<String> {
    let readme = read("README.md");
    let start = readme
        .find("## Settings (`LMFORGE_*`)")
        .expect("README.md has a `## Settings (`LMFORGE_*`)` section");
    let section = &readme[start..];
    let section = section[3..]
        .find("\n## ")
        .map_or(section, |end| &section[..end + 3]);
    let name = Regex::new(r"LMFORGE_[A-Z0-9_]+").unwrap();
    section
        .lines()
        .filter(|l| l.starts_with('|'))
        .filter_map(|l| l.split('|').nth(1))
        .flat_map(|cell| {
            name.find_iter(cell)
                .map(|m| m.as_str().to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_setting_is_in_the_readme_table() {
    let attribute = Regex::new(r#"env\s*=\s*"(LMFORGE_[A-Z0-9_]+)""#).unwrap();
    let env_var = Regex::new(r#"env::var(?:_os)?\(\s*"(LMFORGE_[A-Z0-9_]+)""#).unwrap();
    let root = repo_root();
    let mut used = BTreeSet::new();
    for file in rust_sources(&["libs", "services"]) {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        used.extend(attribute.captures_iter(&text).map(|c| c[1].to_owned()));
        // Settings read directly (not via clap) by the code that ships, not by tests.
        let shipped = file
            .strip_prefix(&root)
            .map(|p| p.components().any(|c| c.as_os_str() == "src"))
            .unwrap_or(false);
        if shipped {
            used.extend(env_var.captures_iter(&text).map(|c| c[1].to_owned()));
        }
    }
    assert!(
        used.len() > 20,
        "found only {} settings in the code",
        used.len()
    );
    let documented = documented();
    let missing: Vec<&String> = used.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "README.md's settings table lacks {missing:?}"
    );
}
