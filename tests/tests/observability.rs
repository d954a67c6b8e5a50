//! The shipped alert rules and dashboard: the rules pass `promtool check
//! rules` and their unit tests (`promtool test rules`), and every metric the
//! rules and the dashboard use is one a real hub exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nowconnect_tests::pki::Ca;
use nowconnect_tests::*;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy().join("prometheus"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): install Debian's `prometheus` package \
                 (scripts/test-all.sh does it when run as root)"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let check = promtool(&["check", "rules", "alerts.yml"]);
    assert!(check.contains("SUCCESS: 14 rules found"), "{check}");
    let test = promtool(&["test", "rules", "alerts.test.yml"]);
    assert!(test.contains("SUCCESS"), "{test}");
}

/// Every `nowconnect_...` identifier in `text`, as written.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("nowconnect_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The sample names a `/metrics` text can hold, from its `# TYPE` lines:
/// a counter's `_total`, a histogram's `_bucket`, `_sum` and `_count`, a
/// gauge's own name (a family without series yet still counts).
fn sample_names(exported: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for l in exported.lines() {
        let Some(t) = l.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut it = t.split_whitespace();
        let (Some(name), Some(kind)) = (it.next(), it.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
            _ => {
                out.insert(name.to_string());
            }
        }
    }
    out
}

/// Metric families named in `text` (`nowconnect_...`, without the
/// `_bucket`/`_sum`/`_count`/`_total` sample suffixes).
fn families(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("nowconnect_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let mut name = &tail[..end];
        for suffix in ["_bucket", "_sum", "_count", "_total"] {
            name = name.strip_suffix(suffix).unwrap_or(name);
        }
        out.insert(name.to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn every_metric_in_the_rules_and_the_dashboard_is_exported_by_a_hub() {
    let rules = std::fs::read_to_string(deploy().join("prometheus/alerts.yml")).unwrap();
    let dash_text = std::fs::read_to_string(deploy().join("grafana/nowconnect.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&dash_text).expect("dashboard JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    for p in panels {
        let targets = p["targets"].as_array().expect("targets");
        assert!(
            targets
                .iter()
                .all(|t| t["expr"].as_str().is_some_and(|e| !e.is_empty())),
            "panel {} has a target without an expression",
            p["title"]
        );
    }
    let mut used = families(&rules);
    used.extend(families(&dash_text));
    assert!(used.len() >= 15, "{used:?}");

    // A real cluster: two meshed hubs with an agent, so the mesh series exist.
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let echo = echo_server();
    let ca = Ca::new("mesh CA");
    let (a, b, _, _) = meshed_pair(&env, "active", &redis, &ca);
    let _agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[a.http], &[("ldap", echo)], ""),
        &env.token("agent-1", None),
    );
    assert!(eventually(Duration::from_secs(15), || a
        .metric("nowconnect_agents_connected")
        == 1.0
        && mesh_established(&b, "hub-a")));
    let (status, exported) = b.get("/metrics");
    assert_eq!(status, 200);
    let missing: Vec<&String> = used
        .iter()
        .filter(|f| !exported.contains(&format!("# TYPE {f} ")))
        .collect();
    assert!(
        missing.is_empty(),
        "used by the alerts or the dashboard but not exported: {missing:?}\n{exported}"
    );
    // And by the exact sample name: a counter queried without `_total`
    // (or a gauge with it) would show nothing.
    let samples = sample_names(&exported);
    let mut queried = names(&rules);
    queried.extend(names(&dash_text));
    let wrong: Vec<&String> = queried.difference(&samples).collect();
    assert!(
        wrong.is_empty(),
        "queried by a sample name the hub does not export: {wrong:?}\n{samples:?}"
    );
}
