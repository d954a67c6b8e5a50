//! The core stays sans-IO: no async runtime, socket, Redis or WebSocket crate
//! in its normal dependency tree, and no clock reads, global RNG or threads in
//! its source; and the runtimes build it without its deliberate bugs. These
//! tests fail the suite if any of that creeps in.

use std::path::Path;
use std::process::Command;

const FORBIDDEN_CRATES: &[&str] = &[
    "tokio",
    "async-std",
    "async-io",
    "smol",
    "mio",
    "redis",
    "tungstenite",
    "tokio-tungstenite",
    "async-tungstenite",
    "rand",
    "getrandom",
];

/// `cargo tree -p package -e edges -f format`, one package a line, offline.
fn cargo_tree(package: &str, edges: &str, format: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "-p",
            package,
            "-e",
            edges,
            "-f",
            format,
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn normal_dependency_tree_has_no_io_crates() {
    let tree = cargo_tree("nowconnect-core", "normal", "{p}");
    assert!(
        tree.contains("nowconnect-core"),
        "unexpected cargo tree output:\n{tree}"
    );
    let names: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for bad in FORBIDDEN_CRATES {
        assert!(
            !names.contains(bad),
            "nowconnect-core depends on `{bad}`; the core must stay sans-IO:\n{tree}"
        );
    }
}

/// The features `cargo build -p <package>` turns on in the core.
fn core_features_built_for(package: &str) -> Vec<String> {
    let tree = cargo_tree(package, "normal,build", "{p} [{f}]");
    let core: Vec<&str> = tree
        .lines()
        .filter(|l| l.starts_with("nowconnect-core "))
        .collect();
    assert!(
        !core.is_empty(),
        "{package} does not depend on nowconnect-core?\n{tree}"
    );
    core.iter()
        .filter_map(|l| Some(l.split_once('[')?.1.split_once(']')?.0))
        .flat_map(|f| f.split(','))
        .map(|f| f.trim().to_string())
        .filter(|f| !f.is_empty())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The deliberate bugs (`planted-bugs`) exist only in the simulation's build:
/// neither runtime, nor the code they share, may turn the feature on. (A
/// workspace-wide `cargo test` builds the core once with the union of
/// features; a runtime's own build must not have it.)
#[test]
fn no_runtime_build_has_the_planted_bugs() {
    for package in [
        "nowconnect-tokio",
        "nowconnect-async-std",
        "nowconnect-shared",
    ] {
        let features = core_features_built_for(package);
        assert!(
            !features.iter().any(|f| f == "planted-bugs"),
            "{package} builds nowconnect-core with `planted-bugs` ({features:?}); only nowconnect-sim may"
        );
    }
    // The check finds the feature where it is on.
    assert!(
        core_features_built_for("nowconnect-sim")
            .iter()
            .any(|f| f == "planted-bugs"),
        "nowconnect-sim should build the core with `planted-bugs`"
    );
}

#[test]
fn core_source_reads_no_clock_and_spawns_nothing() {
    let forbidden = [
        "Instant::now",
        "SystemTime::now",
        "thread::spawn",
        "thread_rng",
        "HashMap",
        "HashSet",
        "std::net",
        "std::fs",
        "unsafe ",
    ];
    let mut offenders = Vec::new();
    visit(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut |path, text| {
            for (i, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for f in forbidden {
                    if code.contains(f) {
                        offenders.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
                    }
                }
            }
        },
    );
    assert!(
        offenders.is_empty(),
        "impure core code:\n{}",
        offenders.join("\n")
    );
}

fn visit(dir: &Path, f: &mut dyn FnMut(&Path, &str)) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            visit(&p, f);
        } else if p.extension().is_some_and(|x| x == "rs") {
            f(&p, &std::fs::read_to_string(&p).unwrap());
        }
    }
}
