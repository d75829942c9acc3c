//! The dependency rule of ARCHITECTURE.md, checked on the source. Each file is parsed (`syn`)
//! and every path its production code names (everything but the items under `#[cfg(test)]`) is
//! made absolute: `self::` and `super::` against the module's own path. A `crate::` path is an
//! edge from the file's layer to another, and the edge must be in `ALLOWED`. Also: no cycle
//! between modules, and no I/O library in the core. What the checker cannot follow (a renamed
//! crate root, `extern crate`, `#[path]`, `include!`) is refused as a violation.
//!
//! `syn` rather than a hand-written lexer: the checker must not be fooled by a brace in a string,
//! a raw string, a comment or a char literal, nor by how a path is spaced, and `syn` is a
//! dev-dependency only: the binary does not change.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use proc_macro2::{Spacing, TokenStream, TokenTree};
use syn::visit::{self, Visit};

/// Each layer (a folder of `src/`, or a top-level file) and the layers it may use. Nobody may use
/// `server`: only `main` (the binary, outside the library) imports it; nor `fuzz_api`: only the
/// fuzz targets do.
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
    // The encrypted transport: a byte stream under HTTP and WebSocket, knowing neither.
    ("tls", &["runtime", "support"]),
    ("http", &["tls", "app", "config", "auth", "core", "ingest", "protocol", "runtime", "store", "support"]),
    ("unix", &["app", "config", "auth", "core", "ingest", "protocol", "runtime", "store", "support"]),
    (
        "ws",
        &[
            "http", "tls", "app", "config", "auth", "core", "ingest", "protocol", "runtime", "store",
            "support",
        ],
    ),
    (
        "server",
        &[
            "ws", "http", "unix", "tls", "app", "config", "auth", "core", "ingest", "protocol", "runtime",
            "store", "support",
        ],
    ),
    // Built with the `fuzzing` feature only, for the fuzz targets in `fuzz/`: the parsers of every
    // layer, re-exported. No layer lists it, so nothing in the crate may use it; and it holds only
    // `pub use`s (`fuzz_api_only_reexports`), so it adds no code of its own to any layer.
    (
        "fuzz_api",
        &[
            "ws", "http", "unix", "app", "config", "auth", "core", "ingest", "protocol", "runtime", "store",
            "support",
        ],
    ),
];

/// Crates and std modules that do I/O or know a wire format; the core names none of them.
const NOT_IN_CORE: &[&str] = &[
    "smol",
    "async_tungstenite",
    "tungstenite",
    "rusqlite",
    "httparse",
    "std::fs",
    "std::io",
    "socket2",
    "async_nats",
    "tokio",
];

/// A library module: its path (`core::hub`) and its whole source.
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
        // Files the source embeds (the console's `src/http/assets/`) are not modules.
        if path.extension().is_none_or(|extension| extension != "rs") {
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
        let source = std::fs::read_to_string(&path).unwrap();
        modules.push(Module { path: segments.join("::"), source });
    }
}

/// What a module's production code names.
#[derive(Default)]
struct Names {
    /// Every path, absolute (`crate`, `self` and `super` resolved to `crate::...`, others as
    /// written: `std::fs::File`), with `use` groups expanded.
    paths: Vec<Vec<String>>,
    /// What the checker cannot see through, and why.
    refused: Vec<String>,
}

fn names(module: &Module) -> Names {
    let path = module.path.split("::").map(str::to_owned).collect();
    let mut reader = Reader { module: path, names: Names::default(), in_attribute: false };
    match syn::parse_file(&module.source) {
        Ok(file) => reader.visit_file(&file),
        Err(error) => reader.names.refused.push(format!("does not parse: {error}")),
    }
    reader.names
}

/// The `crate::` paths a module names, without the `crate::`.
fn crate_paths(module: &Module) -> Vec<String> {
    let paths = names(module).paths.into_iter().filter(|path| path.len() > 1 && path[0] == "crate");
    paths.map(|path| path[1..].join("::")).collect()
}

/// `segments` as written in `module`, made absolute; an error for a `super` above the root.
fn absolute(module: &[String], segments: &[String]) -> Result<Vec<String>, String> {
    let crate_root = || vec!["crate".to_string()];
    match segments.first().map(String::as_str) {
        Some("self") => Ok([crate_root(), module.to_vec(), segments[1..].to_vec()].concat()),
        Some("super") => {
            let up = segments.iter().take_while(|segment| *segment == "super").count();
            let Some(kept) = module.len().checked_sub(up) else {
                return Err(format!("{} goes above the crate root", segments.join("::")));
            };
            Ok([crate_root(), module[..kept].to_vec(), segments[up..].to_vec()].concat())
        }
        _ => Ok(segments.to_vec()),
    }
}

/// Walks one file's syntax tree, skipping every item under `#[cfg(test)]`.
struct Reader {
    /// The module being read, as segments; inline `mod`s push onto it.
    module: Vec<String>,
    names: Names,
    /// Inside an attribute a string may hold a path (`#[serde(with = "crate::x")]`).
    in_attribute: bool,
}

impl Reader {
    fn record(&mut self, segments: Vec<String>) {
        match absolute(&self.module, &segments) {
            Ok(path) => self.names.paths.push(path),
            Err(why) => self.names.refused.push(why),
        }
    }

    /// A `use` tree under `prefix`, expanded: `a::{b, c::{self, D}}` is `a::b`, `a::c`, `a::c::D`.
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(path) => {
                prefix.push(path.ident.to_string());
                self.use_tree(prefix, &path.tree);
                prefix.pop();
            }
            syn::UseTree::Name(name) => self.use_name(prefix, &name.ident, None),
            syn::UseTree::Rename(rename) => self.use_name(prefix, &rename.ident, Some(&rename.rename)),
            syn::UseTree::Glob(_) => self.use_glob(prefix.clone()),
            syn::UseTree::Group(group) => group.items.iter().for_each(|item| self.use_tree(prefix, item)),
        }
    }

    fn use_name(&mut self, prefix: &[String], name: &syn::Ident, rename: Option<&syn::Ident>) {
        let mut segments = prefix.to_vec();
        if name != "self" {
            segments.push(name.to_string());
        }
        let resolved = absolute(&self.module, &segments).unwrap_or_default();
        if let Some(rename) = rename.filter(|_| resolved.len() == 1) {
            // `use crate as c;` or `use std as s;`: paths through the new name would not be seen.
            self.names.refused.push(format!("renames {} as {rename}", resolved[0]));
        }
        self.record(segments);
    }

    fn use_glob(&mut self, segments: Vec<String>) {
        if absolute(&self.module, &segments).is_ok_and(|path| path == ["crate"]) {
            self.names.refused.push("imports everything at the crate root".into());
        }
        self.record(segments);
    }

    /// Paths in a macro's tokens, which `syn` leaves unparsed: `use` items are parsed as such,
    /// every other `a::b::c` run is recorded (`$crate` as `crate`).
    fn tokens(&mut self, tokens: TokenStream) {
        let trees: Vec<TokenTree> = tokens.into_iter().collect();
        let mut at = 0;
        while at < trees.len() {
            match &trees[at] {
                TokenTree::Group(group) => self.tokens(group.stream()),
                TokenTree::Ident(ident) if ident == "use" => {
                    let end = trees[at..].iter().position(is_semicolon).map_or(trees.len(), |n| at + n + 1);
                    let item: TokenStream =
                        trees[at..end].iter().filter(|tree| !is_dollar(tree)).cloned().collect();
                    if let Ok(item) = syn::parse2::<syn::ItemUse>(item) {
                        self.visit_item_use(&item);
                        at = end;
                        continue;
                    }
                }
                TokenTree::Ident(_) => {
                    let (segments, next) = token_path(&trees, at);
                    self.record(segments);
                    at = next;
                    continue;
                }
                TokenTree::Literal(literal) if self.in_attribute => {
                    let text = syn::parse2::<syn::LitStr>(TokenTree::Literal(literal.clone()).into());
                    if let Some(path) = text.ok().and_then(|text| text.parse::<syn::Path>().ok()) {
                        self.visit_path(&path);
                    }
                }
                _ => {}
            }
            at += 1;
        }
    }
}

fn is_semicolon(tree: &TokenTree) -> bool {
    matches!(tree, TokenTree::Punct(punct) if punct.as_char() == ';')
}

fn is_dollar(tree: &TokenTree) -> bool {
    matches!(tree, TokenTree::Punct(punct) if punct.as_char() == '$')
}

/// The `a::b::c` run of identifiers starting at `trees[at]`, and the index after it.
fn token_path(trees: &[TokenTree], at: usize) -> (Vec<String>, usize) {
    let mut segments = Vec::new();
    let mut next = at;
    while let Some(TokenTree::Ident(ident)) = trees.get(next) {
        segments.push(ident.to_string());
        next += 1;
        let colons = match (trees.get(next), trees.get(next + 1)) {
            (Some(TokenTree::Punct(first)), Some(TokenTree::Punct(second))) => {
                first.as_char() == ':' && first.spacing() == Spacing::Joint && second.as_char() == ':'
            }
            _ => false,
        };
        if !colons || !matches!(trees.get(next + 2), Some(TokenTree::Ident(_))) {
            break;
        }
        next += 2;
    }
    (segments, next)
}

/// Whether an item is compiled only for tests: exactly `#[cfg(test)]`.
fn test_only(attributes: &[syn::Attribute]) -> bool {
    attributes.iter().any(|attribute| {
        attribute.path().is_ident("cfg")
            && attribute.parse_args::<syn::Ident>().is_ok_and(|arg| arg == "test")
    })
}

/// Visits a node of a kind that can carry attributes only if it is not `#[cfg(test)]`.
macro_rules! unless_test_only {
    ($($method:ident($node:ty);)*) => {
        $(fn $method(&mut self, node: &'ast $node) {
            if !test_only(&node.attrs) {
                visit::$method(self, node);
            }
        })*
    };
}

impl<'ast> Visit<'ast> for Reader {
    unless_test_only! {
        visit_item_const(syn::ItemConst);
        visit_item_enum(syn::ItemEnum);
        visit_item_fn(syn::ItemFn);
        visit_item_foreign_mod(syn::ItemForeignMod);
        visit_item_impl(syn::ItemImpl);
        visit_item_macro(syn::ItemMacro);
        visit_item_static(syn::ItemStatic);
        visit_item_struct(syn::ItemStruct);
        visit_item_trait(syn::ItemTrait);
        visit_item_trait_alias(syn::ItemTraitAlias);
        visit_item_type(syn::ItemType);
        visit_item_union(syn::ItemUnion);
        visit_impl_item_const(syn::ImplItemConst);
        visit_impl_item_fn(syn::ImplItemFn);
        visit_impl_item_macro(syn::ImplItemMacro);
        visit_impl_item_type(syn::ImplItemType);
        visit_trait_item_const(syn::TraitItemConst);
        visit_trait_item_fn(syn::TraitItemFn);
        visit_trait_item_macro(syn::TraitItemMacro);
        visit_trait_item_type(syn::TraitItemType);
        visit_field(syn::Field);
        visit_field_value(syn::FieldValue);
        visit_variant(syn::Variant);
        visit_arm(syn::Arm);
        visit_local(syn::Local);
        visit_stmt_macro(syn::StmtMacro);
    }

    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        if test_only(&item.attrs) {
            return;
        }
        item.attrs.iter().for_each(|attribute| self.visit_attribute(attribute));
        if let Some((_, items)) = &item.content {
            self.module.push(item.ident.to_string());
            items.iter().for_each(|item| self.visit_item(item));
            self.module.pop();
        }
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        if !test_only(&item.attrs) {
            item.attrs.iter().for_each(|attribute| self.visit_attribute(attribute));
            self.use_tree(&mut Vec::new(), &item.tree);
        }
    }

    fn visit_item_extern_crate(&mut self, item: &'ast syn::ItemExternCrate) {
        if !test_only(&item.attrs) {
            self.names.refused.push(format!("extern crate {}: it can rename a crate root", item.ident));
        }
    }

    fn visit_attribute(&mut self, attribute: &'ast syn::Attribute) {
        if attribute.path().is_ident("path") {
            self.names.refused.push("#[path] puts a module's file where the checker does not look".into());
        }
        let outer = std::mem::replace(&mut self.in_attribute, true);
        visit::visit_attribute(self, attribute);
        if let syn::Meta::List(list) = &attribute.meta {
            self.tokens(list.tokens.clone());
        }
        self.in_attribute = outer;
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        if mac.path.is_ident("include") {
            self.names.refused.push("include! brings in source the checker does not read".into());
        }
        visit::visit_macro(self, mac);
        self.tokens(mac.tokens.clone());
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        self.record(path.segments.iter().map(|segment| segment.ident.to_string()).collect());
        visit::visit_path(self, path);
    }
}

fn layer(module_path: &str) -> &str {
    module_path.split("::").next().unwrap_or(module_path)
}

/// The longest known module that `path` starts with.
fn resolve<'a>(path: &str, known: &'a BTreeSet<String>) -> Option<&'a String> {
    let segments: Vec<&str> = path.split("::").filter(|segment| !segment.is_empty()).collect();
    (1..=segments.len()).rev().find_map(|n| known.get(&segments[..n].join("::")))
}

/// Every edge the rule forbids, as `from -> to (path)`, and everything the checker refused.
fn violations(modules: &[Module]) -> Vec<String> {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut found = Vec::new();
    for module in modules {
        let from = layer(&module.path);
        let Some(may_use) = allowed.get(from) else {
            found.push(format!("{}: layer {from:?} is not in ALLOWED", module.path));
            continue;
        };
        found.extend(names(module).refused.iter().map(|why| format!("{}: {why}", module.path)));
        for path in crate_paths(module) {
            let to = layer(&path);
            if to != from && !may_use.contains(&to) {
                found.push(format!("{} -> {to} (crate::{path})", module.path));
            }
        }
    }
    found
}

/// The I/O crates and std modules (`NOT_IN_CORE`) a module names.
fn io_named(module: &Module) -> Vec<String> {
    let mut found = BTreeSet::new();
    for path in names(module).paths {
        for name in NOT_IN_CORE {
            let name: Vec<&str> = name.split("::").collect();
            if path.len() >= name.len() && path.iter().zip(&name).all(|(segment, part)| segment == part) {
                found.insert(name.join("::"));
            }
        }
    }
    found.into_iter().collect()
}

/// Modules that depend on each other in a cycle (a module and its own submodules excepted).
fn cycles(modules: &[Module]) -> Vec<Vec<String>> {
    let known: BTreeSet<String> = modules.iter().map(|module| module.path.clone()).collect();
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for module in modules {
        let targets = edges.entry(&module.path).or_default();
        for path in crate_paths(module) {
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

/// What in `source` is not a `pub use`: the thin export modules (`fuzz_api`) hold nothing else.
fn not_reexports(source: &str) -> Vec<String> {
    let file = syn::parse_file(source).expect("the module parses");
    let public = |visibility: &syn::Visibility| matches!(visibility, syn::Visibility::Public(_));
    let items = file.items.iter().filter(|item| !matches!(item, syn::Item::Use(item) if public(&item.vis)));
    items.map(quote_item).collect()
}

/// An item, named for a failure.
fn quote_item(item: &syn::Item) -> String {
    match item {
        syn::Item::Use(_) => "a `use` that is not `pub`".into(),
        syn::Item::Fn(item) => format!("fn {}", item.sig.ident),
        syn::Item::Const(item) => format!("const {}", item.ident),
        syn::Item::Struct(item) => format!("struct {}", item.ident),
        syn::Item::Impl(_) => "an impl".into(),
        _ => "an item other than `pub use`".into(),
    }
}

#[test]
fn fuzz_api_only_reexports() {
    let fuzz_api = library_modules().into_iter().find(|module| module.path == "fuzz_api");
    let fuzz_api = fuzz_api.expect("src/fuzz_api.rs exists");
    let found = not_reexports(&fuzz_api.source);
    assert!(found.is_empty(), "fuzz_api holds more than `pub use`s: {found:?}");
}

#[test]
fn the_core_does_no_io() {
    for module in library_modules().iter().filter(|module| layer(&module.path) == "core") {
        let named = io_named(module);
        assert!(named.is_empty(), "{} names {named:?}: the core does no I/O", module.path);
    }
}

// The checker itself: each rule must catch what it is for.

fn module(path: &str, source: &str) -> Module {
    Module { path: path.into(), source: source.into() }
}

fn crate_paths_in(path: &str, source: &str) -> Vec<String> {
    crate_paths(&module(path, source))
}

#[test]
fn the_checker_reads_plain_grouped_and_inline_paths() {
    let source = "use crate::core::hub::Hub;\nuse crate::{auth::Identity, support::{logger, metrics}};\n\
                  fn f() { crate::protocol::to_json(&1); other_crate::x(); }";
    assert_eq!(
        crate_paths_in("app", source),
        ["core::hub::Hub", "auth::Identity", "support::logger", "support::metrics", "protocol::to_json"]
    );
}

#[test]
fn the_checker_reads_paths_however_they_are_spaced_and_in_macros() {
    let source = "use crate :: http\n  ::conn::Request;\nfn f() { log::info!(\"{}\", crate :: ws::x()); }\n\
                  macro_rules! m { () => { use $crate::{unix::lines}; $crate::server::serve() } }";
    assert_eq!(
        crate_paths_in("core::hub", source),
        ["http::conn::Request", "ws::x", "unix::lines", "server::serve"]
    );
    let in_attribute =
        "#[derive(serde::Serialize)]\nstruct S { #[serde(with = \"crate::http::conn\")] a: u8 }";
    assert_eq!(crate_paths_in("core::hub", in_attribute), ["http::conn"]);
}

#[test]
fn the_checker_resolves_self_and_super_against_the_module() {
    assert_eq!(
        crate_paths_in("core::hub", "use super::super::http::conn::Request;"),
        ["http::conn::Request"]
    );
    assert_eq!(crate_paths_in("core::hub", "fn f() { super::Stored::new(); }"), ["core::Stored::new"]);
    assert_eq!(crate_paths_in("core", "use self::hub::Hub;"), ["core::hub::Hub"]);
    assert_eq!(crate_paths_in("app", "use super::http::Upgrade;"), ["http::Upgrade"]);
    assert_eq!(crate_paths_in("core::hub", "mod inner { use super::super::Stored; }"), ["core::Stored"]);
    let upward = module("core::hub", "use super::super::http::conn::Request;");
    assert_eq!(violations(&[upward]), ["core::hub -> http (crate::http::conn::Request)"]);
    let above_the_root = module("core::hub", "use super::super::super::x;");
    assert_eq!(violations(&[above_the_root]).len(), 1);
}

#[test]
fn the_checker_refuses_what_it_cannot_follow() {
    for source in [
        "use crate as c; fn f() { c::http::x(); }",
        "use crate::{self as c};",
        "use super::super as root;",
        "use std as s;",
        "extern crate self as resq;",
        "use super::super::*;",
        "#[path = \"../http/conn.rs\"] mod conn;",
        "include!(\"../http/conn.rs\");",
        "fn f( {",
    ] {
        assert_eq!(violations(&[module("core::hub", source)]).len(), 1, "{source}");
    }
    assert!(violations(&[module("core::hub", "use crate::core::hub as h; use super::*;")]).is_empty());
}

#[test]
fn the_checker_catches_a_forbidden_edge_and_skips_only_test_items() {
    let upward = module("core::hub", "use crate::http::conn::Request;");
    assert_eq!(violations(&[upward]), ["core::hub -> http (crate::http::conn::Request)"]);
    let into_server = module("http::routes", "use crate::server::Control;");
    assert_eq!(violations(&[into_server]).len(), 1);
    let into_fuzz_api = module("ingest", "use crate::fuzz_api::parse_head;");
    assert_eq!(violations(&[into_fuzz_api]).len(), 1);
    let between_transports = module("unix", "use crate::ws::frame::Frame;");
    assert_eq!(violations(&[between_transports]).len(), 1);
    let test_only = "#[cfg(test)]\nuse crate::http::conn::Request;\n#[cfg(test)]\nmod tests { use crate::ws::X; }\n\
                     struct S;\nimpl S {\n    #[cfg(test)]\n    fn key(&self) { crate::unix::y() }\n}";
    assert!(violations(&[module("core::hub", test_only)]).is_empty());
    // Production code after test-only items, with braces in strings, comments and chars in them.
    let after = "#[cfg(test)]\nfn helper() { let _ = (\"}\", '}', r#\"}\"#); /* } */ }\n// }\n\
                 #[cfg(test)]\nconst X: &str = \"{\";\nuse crate::http::conn::Request;\n\
                 #[cfg(test)]\nmod tests {}\nfn later() { crate::ws::frame::f(); }";
    assert_eq!(
        violations(&[module("core::hub", after)]),
        ["core::hub -> http (crate::http::conn::Request)", "core::hub -> ws (crate::ws::frame::f)"]
    );
    let not_only_tests = module("core::hub", "#[cfg(not(test))]\nuse crate::http::conn::Request;");
    assert_eq!(violations(&[not_only_tests]).len(), 1);
}

#[test]
fn the_checker_sees_io_in_groups_and_uses() {
    for source in [
        "use std::{fs::File};",
        "use std::{collections::VecDeque, io::{self, Write}};",
        "use std::fs;",
        "use smol::{future, Timer};",
        "fn f() { let _ = std :: fs::read(\"x\"); }",
        "fn f() { log::info!(\"{:?}\", std::io::stdout()); }",
    ] {
        assert_eq!(io_named(&module("core::hub", source)).len(), 1, "{source}");
    }
    let fine = "use std::{collections::VecDeque, net::SocketAddr}; fn f(io: u8) -> u8 { io }";
    assert!(io_named(&module("core::hub", fine)).is_empty());
}

#[test]
fn the_checker_sees_what_is_not_a_reexport() {
    let thin =
        "//! Docs.\n/// An item's doc.\npub use crate::http::conn::parse_head;\npub use argh::FromArgs;";
    assert!(not_reexports(thin).is_empty());
    for source in ["use crate::x::y;", "pub fn f() {}", "pub(crate) use crate::x::y;", "const N: u8 = 1;"] {
        assert_eq!(not_reexports(source).len(), 1, "{source}");
    }
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
