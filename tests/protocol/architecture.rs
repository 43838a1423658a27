//! The map in docs/architecture.md matches the code: every module imports
//! only what its row of the table allows, no two modules import each
//! other (directly or around a loop), and neither do two files of
//! `pipeline/`. Reads the `crate::` and `super::` paths of every source
//! file, comments and unit-test modules left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without an inline
/// `#[cfg(test)] mod tests { … }` (tests may reach anywhere).
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => &text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifiers that follow `prefix` in `code` (`crate::` → `net`).
fn names_after(code: &str, prefix: &str) -> BTreeSet<String> {
    code.match_indices(prefix)
        .filter(|(i, _)| {
            // Not part of a longer path such as `super::super::`.
            !code[..*i].ends_with("::")
        })
        .map(|(i, _)| {
            code[i + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect::<String>()
        })
        .filter(|n| !n.is_empty())
        .collect()
}

/// Top-level module → the top-level modules it names.
fn module_graph() -> Graph {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let rel = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if rel.starts_with("bin/") || rel == "main.rs" || rel == "lib.rs" {
            continue;
        }
        if rel.contains("/tests/") || rel.ends_with("/tests.rs") {
            continue;
        }
        let module = rel
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_owned();
        let deps = graph.entry(module.clone()).or_default();
        for dep in names_after(&code_of(&file), "crate::") {
            if dep != module {
                deps.insert(dep);
            }
        }
    }
    // Only edges to modules of the crate (not `crate::` in a string).
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| modules.contains(d));
    }
    graph
}

/// File of `pipeline/` → the sibling files it names through `super::`.
fn pipeline_graph() -> Graph {
    let dir = root().join("src/pipeline");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    let siblings: BTreeSet<String> = files
        .iter()
        .filter(|f| f.parent() == Some(dir.as_path()))
        .map(|f| f.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut graph = Graph::new();
    for file in files.iter().filter(|f| f.parent() == Some(dir.as_path())) {
        let name = file.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "tests" {
            continue;
        }
        let code = code_of(file);
        let mut deps: BTreeSet<String> = names_after(&code, "super::");
        // `use super::{a, b::C}` names siblings inside braces.
        for (i, _) in code.match_indices("super::{") {
            let inner = &code[i + 8..];
            let inner = &inner[..inner.find('}').unwrap_or(inner.len())];
            deps.extend(
                inner
                    .split(',')
                    .map(|n| n.trim().split("::").next().unwrap().to_owned()),
            );
        }
        // Items of `mod.rs` named through `super::` count as an edge to it.
        let deps = deps
            .into_iter()
            .map(|d| {
                if siblings.contains(&d) {
                    d
                } else {
                    "mod".to_owned()
                }
            })
            .filter(|d| *d != name)
            .collect();
        graph.insert(name, deps);
    }
    graph
}

/// The modules on a cycle, if any (each strongly connected component of
/// more than one node).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    // Kosaraju: order by finish time, then walk the reversed graph.
    fn visit(graph: &Graph, node: &str, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(node.to_owned()) {
            return;
        }
        for next in graph.get(node).into_iter().flatten() {
            visit(graph, next, seen, order);
        }
        order.push(node.to_owned());
    }
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for node in graph.keys() {
        visit(graph, node, &mut seen, &mut order);
    }
    let mut reversed = Graph::new();
    for (from, tos) in graph {
        reversed.entry(from.clone()).or_default();
        for to in tos {
            reversed.entry(to.clone()).or_default().insert(from.clone());
        }
    }
    let mut assigned = BTreeSet::new();
    let mut found = Vec::new();
    for node in order.iter().rev() {
        let mut component = Vec::new();
        visit(&reversed, node, &mut assigned, &mut component);
        if component.len() > 1 {
            component.sort();
            found.push(component);
        }
    }
    found
}

/// The table "module | may import" of docs/architecture.md.
fn allowed() -> Graph {
    let doc = std::fs::read_to_string(root().join("docs/architecture.md")).unwrap();
    let mut table = Graph::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `module` | a, b, c |
        if cells.len() == 4 && cells[1].starts_with('`') && cells[1].ends_with('`') {
            let module = cells[1].trim_matches('`').to_owned();
            let may: BTreeSet<String> = cells[2]
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
            table.insert(module, may);
        }
    }
    table
}

#[test]
fn every_module_imports_only_what_the_architecture_page_allows() {
    let graph = module_graph();
    let table = allowed();
    assert!(graph.len() > 20, "found only {:?}", graph.keys());
    for (module, deps) in &graph {
        let may = table
            .get(module)
            .unwrap_or_else(|| panic!("docs/architecture.md has no row for `{module}`"));
        let extra: Vec<_> = deps.difference(may).collect();
        assert!(
            extra.is_empty(),
            "`{module}` imports {extra:?}, which docs/architecture.md does not allow"
        );
    }
    for module in table.keys() {
        assert!(
            graph.contains_key(module),
            "docs/architecture.md lists `{module}`, which is not a module"
        );
    }
}

#[test]
fn no_two_modules_import_each_other() {
    assert_eq!(cycles(&module_graph()), Vec::<Vec<String>>::new());
}

#[test]
fn no_two_files_of_the_pipeline_import_each_other() {
    let graph = pipeline_graph();
    assert!(graph.contains_key("stages") && graph.contains_key("shared"));
    assert_eq!(cycles(&graph), Vec::<Vec<String>>::new());
    // Nothing but the module root itself may lean on `mod.rs`.
    for (file, deps) in &graph {
        assert!(
            !deps.contains("mod"),
            "pipeline/{file}.rs imports from mod.rs"
        );
    }
}

/// The files of `pipeline/` in the order its module doc lists them.
fn pipeline_doc_order() -> Vec<String> {
    let doc = std::fs::read_to_string(root().join("src/pipeline/mod.rs")).unwrap();
    let start = doc
        .find("Where things are")
        .expect("the file list in pipeline's doc");
    let end = start + doc[start..].find("//! The files before").unwrap();
    let mut order: Vec<String> = Vec::new();
    for quoted in doc[start..end].split('`').skip(1).step_by(2) {
        if !order.iter().any(|o| o == quoted) {
            order.push(quoted.to_owned());
        }
    }
    order
}

#[test]
fn the_pipeline_doc_lists_its_files_in_import_order() {
    let graph = pipeline_graph();
    let order: Vec<String> = pipeline_doc_order()
        .into_iter()
        .filter(|f| graph.contains_key(f))
        .collect();
    for file in graph.keys().filter(|f| *f != "mod") {
        assert!(
            order.contains(file),
            "pipeline's doc does not list `{file}`"
        );
    }
    let place = |f: &str| {
        order
            .iter()
            .position(|o| o == f)
            .unwrap_or_else(|| panic!("pipeline's doc does not list `{f}`"))
    };
    for (file, deps) in graph.iter().filter(|(f, _)| *f != "mod") {
        for dep in deps {
            assert!(
                place(dep) > place(file),
                "pipeline/{file}.rs imports `{dep}`, listed before it in pipeline's doc"
            );
        }
    }
    // The doc says the files before `shared` work on it (the order above
    // already keeps the files after it from importing it).
    let shared = place("shared");
    for file in &order[..shared] {
        assert!(
            graph[file].contains("shared"),
            "pipeline/{file}.rs is listed before `shared` but does not use it"
        );
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    // The checks above are only as good as this.
    let mut graph = Graph::new();
    graph.insert("a".into(), ["b".to_owned()].into());
    graph.insert("b".into(), ["c".to_owned()].into());
    graph.insert("c".into(), ["a".to_owned()].into());
    graph.insert("d".into(), ["a".to_owned()].into());
    assert_eq!(cycles(&graph), vec![vec!["a", "b", "c"]]);
    graph.get_mut("c").unwrap().clear();
    assert!(cycles(&graph).is_empty());
}
