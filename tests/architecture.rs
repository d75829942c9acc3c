//! The dependency rule of ARCHITECTURE.md, checked on the source: every `crate::` path outside a
//! file's `#[cfg(test)]` part is an edge from the file's layer to another, and the edge must be in
//! `ALLOWED`. Also: no cycle between modules, and no I/O library in the core.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each layer (a folder of `src/`, or a top-level file) and the layers it may use. Nobody may use
/// `server`: only `main` (the binary, outside the library) imports it.
const ALLOWED: &[(&str, &[&str])] = &[
    ("support", &[]),
    ("config", &[]),
    ("auth", &[]),
    ("protocol", &["support"]),
    ("core", &["support", "protocol", "auth"]),
    ("store", &["core", "protocol", "support"]),
    ("runtime", &["support"]),
    ("ingest", &["core", "store", "runtime", "protocol", "support"]),
    ("app", &["config", "auth", "core", "ingest", "runtime", "store", "support"]),
    ("http", &["app", "config", "auth", "core", "ingest", "protocol", "runtime", "store", "support"]),
    ("unix", &["app", "config", "auth", "core", "ingest", "protocol", "runtime", "store", "support"]),
    ("ws", &["http", "app", "config", "auth", "core", "ingest", "protocol", "runtime", "store", "support"]),
    (
        "server",
        &[
            "ws", "http", "unix", "app", "config", "auth", "core", "ingest", "protocol", "runtime", "store",
            "support",
        ],
    ),
];

/// Crates and std modules that do I/O or know a wire format; the core names none of them.
const NOT_IN_CORE: &[&str] =
    &["smol", "async_tungstenite", "tungstenite", "rusqlite", "httparse", "std::fs", "std::io", "socket2"];

/// A library module: its path (`core::hub`) and its source up to `#[cfg(test)]`.
struct Module {
    path: String,
    source: String,
}

fn library_modules() -> Vec<Module> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules = Vec::new();
    collect(&src, &src, &mut modules);
    assert!(modules.len() > 20, "found only {} modules under {}", modules.len(), src.display());
    modules
}

fn collect(root: &Path, dir: &Path, modules: &mut Vec<Module>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(root, &path, modules);
            continue;
        }
        let relative = path.strip_prefix(root).unwrap().with_extension("");
        let mut segments: Vec<String> =
            relative.iter().map(|segment| segment.to_string_lossy().into_owned()).collect();
        if segments.last().is_some_and(|last| last == "mod") {
            segments.pop();
        }
        if segments == ["lib"] || segments == ["main"] {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        modules.push(Module { path: segments.join("::"), source: non_test_part(&text).to_owned() });
    }
}

fn non_test_part(text: &str) -> &str {
    text.find("#[cfg(test)]").map_or(text, |cut| &text[..cut])
}

/// The module paths a source names after `crate::`, with `use crate::{a::X, b::{Y, Z}}` groups
/// expanded to `a::X`, `b`.
fn crate_paths(source: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("crate::") {
        let before = &rest[..at];
        rest = &rest[at + "crate::".len()..];
        if before.ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `some_crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = matching_brace(group);
            paths.extend(split_top_level(&group[..end]).map(|item| path_prefix(item.trim())));
            rest = &group[end..];
        } else {
            paths.push(path_prefix(rest));
        }
    }
    paths.retain(|path| !path.is_empty());
    paths
}

fn matching_brace(text: &str) -> usize {
    let mut depth = 0;
    for (index, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return index,
            '}' => depth -= 1,
            _ => {}
        }
    }
    text.len()
}

fn split_top_level(text: &str) -> impl Iterator<Item = &str> {
    let mut depth = 0;
    let mut start = 0;
    let mut items = Vec::new();
    for (index, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&text[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    items.push(&text[start..]);
    items.into_iter()
}

fn path_prefix(text: &str) -> String {
    let path: String = text.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
    path.trim_end_matches(':').to_owned()
}

fn layer(module_path: &str) -> &str {
    module_path.split("::").next().unwrap_or(module_path)
}

/// The longest known module that `path` starts with.
fn resolve<'a>(path: &str, known: &'a BTreeSet<String>) -> Option<&'a String> {
    let segments: Vec<&str> = path.split("::").filter(|segment| !segment.is_empty()).collect();
    (1..=segments.len()).rev().find_map(|n| known.get(&segments[..n].join("::")))
}

/// Every edge the rule forbids, as `from -> to (path)`.
fn violations(modules: &[Module]) -> Vec<String> {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut found = Vec::new();
    for module in modules {
        let from = layer(&module.path);
        let Some(may_use) = allowed.get(from) else {
            found.push(format!("{}: layer {from:?} is not in ALLOWED", module.path));
            continue;
        };
        for path in crate_paths(&module.source) {
            let to = layer(&path);
            if to != from && !may_use.contains(&to) {
                found.push(format!("{} -> {to} (crate::{path})", module.path));
            }
        }
    }
    found
}

/// Modules that depend on each other in a cycle (a module and its own submodules excepted).
fn cycles(modules: &[Module]) -> Vec<Vec<String>> {
    let known: BTreeSet<String> = modules.iter().map(|module| module.path.clone()).collect();
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for module in modules {
        let targets = edges.entry(&module.path).or_default();
        for path in crate_paths(&module.source) {
            let Some(target) = resolve(&path, &known) else { continue };
            let nested = |a: &str, b: &str| a.starts_with(&format!("{b}::"));
            if *target != module.path && !nested(target, &module.path) && !nested(&module.path, target) {
                targets.insert(target);
            }
        }
    }
    // A module is in a cycle when it can reach itself; group each with all it reaches both ways.
    let reach = |start: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![start];
        while let Some(at) = stack.pop() {
            for next in edges.get(at).into_iter().flatten() {
                if seen.insert(*next) {
                    stack.push(next);
                }
            }
        }
        seen
    };
    let reached: BTreeMap<&str, BTreeSet<&str>> = edges.keys().map(|m| (*m, reach(m))).collect();
    let mut groups: BTreeSet<Vec<String>> = BTreeSet::new();
    for (module, reaches) in &reached {
        if reaches.contains(module) {
            let group = reaches.iter().filter(|other| reached[*other].contains(module));
            groups.insert(group.map(|m| m.to_string()).collect());
        }
    }
    groups.into_iter().collect()
}

#[test]
fn every_dependency_points_down_the_layers() {
    let found = violations(&library_modules());
    assert!(found.is_empty(), "edges the dependency rule forbids:\n{}", found.join("\n"));
}

#[test]
fn no_module_cycle() {
    let found = cycles(&library_modules());
    assert!(found.is_empty(), "module cycles: {found:?}");
}

#[test]
fn the_core_does_no_io() {
    for module in library_modules().iter().filter(|module| layer(&module.path) == "core") {
        for name in NOT_IN_CORE {
            let named = module.source.match_indices(name).any(|(at, _)| {
                let before = module.source[..at].chars().next_back();
                let after = module.source[at + name.len()..].chars().next();
                !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
                    && !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
            });
            assert!(!named, "{} names {name}: the core does no I/O", module.path);
        }
    }
}

// The checker itself: each rule must catch what it is for.

fn module(path: &str, source: &str) -> Module {
    Module { path: path.into(), source: source.into() }
}

#[test]
fn the_checker_reads_plain_grouped_and_inline_paths() {
    let source = "use crate::core::hub::Hub;\nuse crate::{auth::Identity, support::{logger, metrics}};\n\
                  fn f() { crate::protocol::to_json(&1); other_crate::x(); }";
    assert_eq!(crate_paths(source), ["core::hub::Hub", "auth::Identity", "support", "protocol::to_json"]);
}

#[test]
fn the_checker_catches_a_forbidden_edge_and_ignores_tests() {
    let upward = module("core::hub", "use crate::http::conn::Request;");
    assert_eq!(violations(&[upward]), ["core::hub -> http (crate::http::conn::Request)"]);
    let into_server = module("http::routes", "use crate::server::Control;");
    assert_eq!(violations(&[into_server]).len(), 1);
    let between_transports = module("unix", "use crate::ws::frame::Frame;");
    assert_eq!(violations(&[between_transports]).len(), 1);
    let test_only = module("core::hub", non_test_part("#[cfg(test)]\nuse crate::http::conn::Request;"));
    assert!(violations(&[test_only]).is_empty());
}

#[test]
fn the_checker_catches_a_cycle() {
    let modules = [
        module("core::hub", "use crate::core::doorbell::Doorbell;"),
        module("core::doorbell", "use crate::core::hub::Hub;"),
        module("core", "pub mod hub;"),
    ];
    assert_eq!(cycles(&modules), [vec!["core::doorbell".to_string(), "core::hub".to_string()]]);
    let nested =
        [module("core", "use crate::core::hub::Hub;"), module("core::hub", "use crate::core::Stored;")];
    assert!(cycles(&nested).is_empty());
}
