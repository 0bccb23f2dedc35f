//! No module imports one that imports it back, in a circle of any length, in any library crate of
//! the workspace; the node's config is a leaf; and the crates depend on each other in one direction
//! (their `Cargo.toml`s).
//!
//! A module's imports are the `crate::…` and `super::…` paths its file names outside comments and
//! its test module, resolved to the deepest module of that crate they reach. A module naming its
//! own ancestor or descendant is not counted: a parent declares its children, and a child using
//! its parent's items is the ordinary Rust layout; a circle between siblings or cousins is what
//! hides a layer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The library crates checked, as folders under the workspace root (the CLI is one file).
const CRATES: [&str; 9] = [
    "fabric-core/types",
    "fabric-core/policy",
    "fabric-core/proto",
    "fabric-core/engine",
    "fabric-core/node",
    "fabric-core/testkit",
    "edge-node",
    "cloud-hub",
    "model-registry",
];

/// Layer order: a crate may depend only on crates listed before it.
const LAYERS: [&str; 6] =
    ["fabric-types", "fabric-policy", "fabric-proto", "fabric-engine", "fabric-testkit", "fabric-node"];

/// Modules every other module of their crate may read, so they import none: (crate folder, module).
const LEAVES: [(&str, &str); 1] = [("fabric-core/node", "config")];

type Module = Vec<String>;

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let root = fabric_testkit::workspace_root();
    let mut circles = Vec::new();
    for krate in CRATES {
        let modules = modules_of(&root.join(krate).join("src"));
        assert!(!modules.is_empty(), "{krate}/src has no modules");
        let known: BTreeSet<Module> = modules.keys().cloned().collect();
        let mut graph: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
        for (module, file) in &modules {
            let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let edges = graph.entry(module.clone()).or_default();
            for target in imports(module, is_dir_module(file), &strip(&text), &known) {
                if !related(module, &target) {
                    edges.insert(target);
                }
            }
        }
        for (leaf_crate, leaf) in LEAVES.iter().filter(|(c, _)| *c == krate) {
            let imports = graph.get(&vec![leaf.to_string()]).cloned().unwrap_or_default();
            let names: Vec<String> = imports.iter().map(|m| display(m)).collect();
            assert!(names.is_empty(), "{leaf_crate}: {leaf} should be a leaf but imports {names:?}");
        }
        for circle in circles_of(&graph) {
            let names: Vec<String> = circle.iter().map(|m| display(m)).collect();
            circles.push(format!("{krate}: {}", names.join(" -> ")));
        }
    }
    assert!(circles.is_empty(), "modules that import each other:\n{}", circles.join("\n"));
}

#[test]
fn the_shared_crates_depend_on_each_other_in_one_direction() {
    let root = fabric_testkit::workspace_root();
    for (rank, name) in LAYERS.iter().enumerate() {
        let folder = name.trim_start_matches("fabric-");
        let manifest = std::fs::read_to_string(root.join("fabric-core").join(folder).join("Cargo.toml"))
            .unwrap_or_else(|e| panic!("{name}'s Cargo.toml: {e}"));
        let (deps, dev) = manifest.split_once("[dev-dependencies]").unwrap_or((&manifest, ""));
        for (section, allowed) in [(deps, &LAYERS[..rank]), (dev, &LAYERS[..])] {
            for line in section.lines() {
                let dep = line.split(['.', ' ', '=']).next().unwrap_or("");
                if dep.starts_with("fabric-") {
                    assert!(allowed.contains(&dep), "{name} depends on {dep}, which is not below it ({LAYERS:?})");
                    assert_ne!(dep, *name, "{name} depends on itself");
                }
            }
        }
    }
}

/// Every `.rs` file under `src` (binaries' `main.rs` aside) by module path.
fn modules_of(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut found = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("main.rs") {
                continue;
            }
            let relative = path.strip_prefix(src).unwrap_or(&path).with_extension("");
            let mut module: Module = relative.iter().map(|c| c.to_string_lossy().into_owned()).collect();
            if module.last().is_some_and(|l| l == "mod" || l == "lib") {
                module.pop();
            }
            found.insert(module, path);
        }
    }
    found
}

fn is_dir_module(file: &Path) -> bool {
    file.ends_with("mod.rs") || file.ends_with("lib.rs")
}

/// The file's code: comment lines and the test module (at the file's end) left out.
fn strip(text: &str) -> String {
    let code = text.split("#[cfg(test)]").next().unwrap_or(text);
    code.lines().filter(|l| !l.trim_start().starts_with("//")).map(|l| l.split(" //").next().unwrap_or(l)).fold(
        String::new(),
        |mut out, l| {
            out.push_str(l);
            out.push('\n');
            out
        },
    )
}

/// The modules a file's paths reach, with `use x::{a, b::c}` groups opened.
fn imports(module: &Module, dir_module: bool, code: &str, known: &BTreeSet<Module>) -> BTreeSet<Module> {
    let mut out = BTreeSet::new();
    for start in ["crate::", "super::"] {
        for (at, _) in code.match_indices(start) {
            if code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let base: Module = if start == "crate::" {
                Vec::new()
            } else {
                // `super` of a file module is its parent folder's module; of `x/mod.rs`, above `x`.
                let mut b = module.clone();
                b.pop();
                if dir_module {
                    b.pop();
                }
                b
            };
            for path in expand(&code[at + start.len()..]) {
                let mut target = base.clone();
                let mut deepest = base.clone();
                for segment in path {
                    if segment == "super" {
                        target.pop();
                    } else {
                        target.push(segment);
                    }
                    if known.contains(&target) {
                        deepest = target.clone();
                    }
                }
                out.insert(deepest);
            }
        }
    }
    out.remove(module);
    out
}

/// The paths written after `crate::`: `a::b::C` or a group `{a::B, c, d::{E, F}}` (one level).
fn expand(rest: &str) -> Vec<Vec<String>> {
    let ident = |s: &str| -> Vec<String> {
        s.split("::")
            .map(|seg| seg.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>())
            .take_while(|seg| !seg.is_empty())
            .collect()
    };
    if let Some(group) = rest.strip_prefix('{') {
        let body = group.split('}').next().unwrap_or("");
        return body.split(',').map(|p| ident(p.trim())).filter(|p| !p.is_empty()).collect();
    }
    let head: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
    let mut path = ident(head.trim_end_matches(':'));
    if head.ends_with("::") && rest[head.len()..].starts_with('{') {
        let inner = expand(&rest[head.len()..]);
        return inner.into_iter().map(|p| path.iter().cloned().chain(p).collect()).collect();
    }
    if path.is_empty() {
        path = Vec::new();
    }
    vec![path]
}

/// Whether one module is the other's ancestor.
fn related(a: &Module, b: &Module) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// The circles of a directed graph: its strongly connected components of two or more modules.
fn circles_of(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    let nodes: Vec<&Module> = graph.keys().collect();
    let mut circles = Vec::new();
    let mut placed: BTreeSet<&Module> = BTreeSet::new();
    for start in &nodes {
        if placed.contains(start) {
            continue;
        }
        let forward = reachable(graph, start);
        let component: Vec<Module> =
            forward.iter().filter(|m| reachable(graph, m).contains(*start)).map(|m| (*m).clone()).collect();
        for m in &component {
            if let Some(key) = nodes.iter().find(|k| **k == m) {
                placed.insert(key);
            }
        }
        if component.len() > 1 {
            circles.push(component);
        }
    }
    circles
}

fn reachable<'a>(graph: &'a BTreeMap<Module, BTreeSet<Module>>, from: &'a Module) -> BTreeSet<&'a Module> {
    let mut seen = BTreeSet::from([from]);
    let mut stack = vec![from];
    while let Some(m) = stack.pop() {
        for next in graph.get(m).into_iter().flatten() {
            if seen.insert(next) {
                stack.push(next);
            }
        }
    }
    seen
}

fn display(m: &Module) -> String {
    if m.is_empty() {
        "(crate root)".into()
    } else {
        m.join("::")
    }
}
