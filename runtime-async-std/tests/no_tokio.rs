//! The async-std adapter (and the shared crate under both adapters) must not
//! pull a tokio runtime in: no crate of the tokio family in their normal
//! dependency trees.

use std::process::Command;

fn normal_tree(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "-p",
            package,
            "-e",
            "normal",
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
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
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
fn the_async_std_adapter_has_no_tokio_in_its_tree() {
    // The check sees tokio where it is (so it can fail).
    assert!(normal_tree("nowconnect-tokio").iter().any(|n| n == "tokio"));
    assert_no_tokio("nowconnect-async-std");
    // It does run on async-std's reactor.
    let names = normal_tree("nowconnect-async-std");
    assert!(names.iter().any(|n| n == "async-std"));
    assert!(names.iter().any(|n| n == "async-io"));
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
