//! The async-std adapter (and the shared crate under both adapters) must not
//! pull a tokio runtime in. The shared crate has no tokio crate at all. The
//! async-std adapter reaches Redis through redis' `smol-comp`, whose async
//! layer is written against `tokio::sync` and tokio-util's codec traits: so
//! `tokio` and `tokio-util` may appear, but only with features that hold no
//! runtime (no scheduler, reactor, timer, sockets, signals or processes),
//! and no other crate of the tokio family (tokio-tungstenite, tokio-rustls,
//! hyper, axum, ...) may.

use std::process::Command;

/// `(crate name, enabled features)` of every crate in `package`'s normal
/// dependency tree.
fn normal_tree_features(package: &str) -> Vec<(String, Vec<String>)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "-p",
            package,
            "-e",
            "normal",
            "-f",
            "{p} {f}",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    assert!(
        tree.contains(package),
        "unexpected cargo tree output:\n{tree}"
    );
    tree.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next()?.to_string();
            let _version = parts.next();
            let features = parts
                .next()
                .filter(|f| !f.starts_with('('))
                .map(|f| f.split(',').map(str::to_string).collect())
                .unwrap_or_default();
            Some((name, features))
        })
        .collect()
}

fn normal_tree(package: &str) -> Vec<String> {
    normal_tree_features(package)
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

/// The features of tokio and tokio-util that make a runtime or need one.
const RUNTIME_FEATURES: &[&str] = &[
    "full",
    "rt",
    "rt-multi-thread",
    "net",
    "time",
    "io-std",
    "signal",
    "process",
    "fs",
    "macros",
];

/// What in `package`'s tree is (or needs) a tokio runtime.
fn tokio_runtime_in(package: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (name, features) in normal_tree_features(package) {
        let family = name == "tokio"
            || name.starts_with("tokio-")
            || ["hyper", "hyper-util", "axum", "tower"].contains(&name.as_str());
        if !family {
            continue;
        }
        if !["tokio", "tokio-util"].contains(&name.as_str()) {
            found.push(name);
            continue;
        }
        for f in features {
            if RUNTIME_FEATURES.contains(&f.as_str()) {
                found.push(format!("{name} feature `{f}`"));
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

#[test]
fn the_async_std_adapter_has_no_tokio_runtime_in_its_tree() {
    // The check sees a tokio runtime where there is one (so it can fail).
    let tokio = tokio_runtime_in("nowconnect-tokio");
    for expected in [
        "tokio feature `rt`",
        "tokio feature `net`",
        "tokio-tungstenite",
    ] {
        assert!(tokio.iter().any(|f| f == expected), "{tokio:?}");
    }
    let found = tokio_runtime_in("nowconnect-async-std");
    assert!(
        found.is_empty(),
        "nowconnect-async-std depends on {found:?}"
    );
    // It does run on async-std's reactor, and Redis on smol's (the same one).
    let names = normal_tree("nowconnect-async-std");
    for rt in ["async-std", "async-io", "smol", "redis"] {
        assert!(names.iter().any(|n| n == rt), "no {rt} in the tree");
    }
}

fn assert_no_tokio(package: &str) {
    let names = normal_tree(package);
    let tokio: Vec<&String> = names
        .iter()
        .filter(|n| *n == "tokio" || n.starts_with("tokio-"))
        .collect();
    assert!(tokio.is_empty(), "{package} depends on {tokio:?}");
}

#[test]
fn the_shared_crate_has_no_runtime_at_all() {
    assert_no_tokio("nowconnect-shared");
    let names = normal_tree("nowconnect-shared");
    for rt in ["async-std", "async-io", "smol"] {
        assert!(
            !names.iter().any(|n| n == rt),
            "nowconnect-shared depends on {rt}"
        );
    }
}
