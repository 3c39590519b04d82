//! The runtime's import directions (docs/runtime.md §1), checked on the sources: every
//! `crate::` path each file names, in `use` lines and inline, is an arrow from its module to the
//! module it names. Arrows point one way: public handles (`api`) → the memory manager (`mm`) →
//! {device backends, placement policy, syscalls, leaves}; inside `mm`, behaviour → `runtime` →
//! data. A forbidden arrow or a circle fails the test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("src dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `api/file.rs` → `api::file`; `device/mod.rs` → `device`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file
        .strip_prefix(src)
        .expect("inside src")
        .with_extension("");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|l| l == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// Code without comments (line comments, doc comments) and string literals.
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut l = line.to_string();
        if let Some(i) = l.find("//") {
            l.truncate(i);
        }
        // Strings rarely hold `crate::`, but drop them anyway.
        let mut kept = String::new();
        let mut in_str = false;
        for c in l.chars() {
            if c == '"' {
                in_str = !in_str;
            } else if !in_str {
                kept.push(c);
            }
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

/// Every module path named after `crate::` (with `use crate::a::{b, c::d}` expanded).
fn named_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let path: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let path = path.trim_end_matches(':').to_string();
        let after = &rest[path.len()..];
        if after.trim_start_matches(':').starts_with('{') {
            let group = &after[after.find('{').expect("brace") + 1..];
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let item = item.trim();
                let first = item.split("::").next().unwrap_or("");
                if first.chars().next().is_some_and(|c| c.is_lowercase()) && first != "self" {
                    out.push(format!("{path}::{item}"));
                } else {
                    out.push(path.clone());
                }
            }
        } else {
            out.push(path);
        }
    }
    out
}

/// The crate's module graph: module → modules it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let modules: BTreeMap<String, PathBuf> = files
        .iter()
        .map(|f| (module_of(&src, f), f.clone()))
        .collect();
    let mut g = BTreeMap::new();
    for (m, f) in &modules {
        let text = std::fs::read_to_string(f).expect("read source");
        let mut to = BTreeSet::new();
        for p in named_paths(&code(&text)) {
            let segs: Vec<&str> = p.split("::").collect();
            // The longest prefix that is a module.
            if let Some(target) = (1..=segs.len())
                .rev()
                .map(|k| segs[..k].join("::"))
                .find(|c| modules.contains_key(c))
            {
                if &target != m && !m.starts_with(&format!("{target}::")) {
                    to.insert(target);
                }
            }
        }
        g.insert(m.clone(), to);
    }
    g
}

/// The layer a module belongs to.
fn layer(m: &str) -> &'static str {
    match m.split("::").next().unwrap_or("") {
        "" => "lib",
        "api" => "api",
        "mm" => "mm",
        "device" => "device",
        "policy" => "policy",
        "sys" => "sys",
        _ => "leaf",
    }
}

/// The memory manager's data modules: they describe state and import nothing that acts on it.
const MM_DATA: &[&str] = &[
    "mm::completions",
    "mm::file_io",
    "mm::gate",
    "mm::kernel_runs",
    "mm::launch",
    "mm::lease_break",
    "mm::parked",
    "mm::poison",
    "mm::region",
    "mm::space",
    "mm::testing",
    "mm::work",
];

/// Why `from → to` is forbidden, if it is.
fn forbidden(from: &str, to: &str) -> Option<&'static str> {
    let (lf, lt) = (layer(from), layer(to));
    match (lf, lt) {
        (_, "lib") => Some("nothing imports the crate root"),
        ("api", _) => None,
        (_, "api") => Some("only the public handles name the public handles"),
        ("mm", "mm") => {
            let data = |m: &str| MM_DATA.contains(&m);
            (data(from) && !data(to)).then_some("mm data modules know no behaviour nor the runtime")
        }
        ("mm", _) => None,
        ("device", "device" | "sys" | "leaf") => None,
        ("device", _) => Some("a backend knows only its trait, syscalls and leaves"),
        ("policy", "policy") => None,
        ("policy", _) => Some("a policy is sans-IO: plain data in, plans out"),
        ("sys", "sys") => None,
        ("sys", _) => Some("syscalls know nothing above them"),
        ("leaf", "leaf" | "policy") => None,
        ("leaf", _) => Some("leaves (error, stats, budget, raw) know no layer above them"),
        _ => None,
    }
}

#[test]
fn imports_point_one_way() {
    let g = graph();
    assert!(
        g.len() > 20,
        "found only {} modules: is the source tree there?",
        g.len()
    );
    let mut bad = Vec::new();
    for (from, tos) in &g {
        for to in tos {
            if let Some(why) = forbidden(from, to) {
                bad.push(format!("{from} -> {to}: {why}"));
            }
        }
    }
    assert!(bad.is_empty(), "forbidden imports:\n{}", bad.join("\n"));
}

#[test]
fn no_import_circle() {
    let g = graph();
    // Depth-first search for a back edge.
    fn visit<'a>(
        m: &'a str,
        g: &'a BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<&'a str, u8>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        state.insert(m, 1);
        stack.push(m);
        for to in g.get(m).into_iter().flatten() {
            match state.get(to.as_str()) {
                Some(1) => {
                    let at = stack.iter().position(|s| *s == to).expect("on the stack");
                    let mut c: Vec<String> = stack[at..].iter().map(|s| s.to_string()).collect();
                    c.push(to.clone());
                    return Some(c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(to, g, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(m, 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in g.keys() {
        if !state.contains_key(m.as_str()) {
            if let Some(c) = visit(m, &g, &mut state, &mut Vec::new()) {
                panic!("import circle: {}", c.join(" -> "));
            }
        }
    }
}

#[test]
fn the_checker_sees_arrows() {
    // The parser itself: a grouped use, an inline path, and a comment that must not count.
    let text = "use crate::mm::{region::Region, runtime};\n// crate::api::x\nlet x = crate::sys::mem::f();";
    let p = named_paths(&code(text));
    assert_eq!(p, ["mm::region::Region", "mm::runtime", "sys::mem::f"]);
    assert!(forbidden("mm::runtime", "api::hetmem").is_some());
    assert!(forbidden("mm::region", "mm::runtime").is_some());
    assert!(forbidden("device::sim", "mm::region").is_some());
    assert!(forbidden("policy::default", "sys::mem").is_some());
    assert!(forbidden("api::hetmem", "mm::runtime").is_none());
    assert!(forbidden("mm::fault", "policy").is_none());
}
