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
    assert!(check.contains("SUCCESS: 18 rules found"), "{check}");
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
    names(text)
        .into_iter()
        .map(|n| {
            let mut name = n.as_str();
            for suffix in ["_bucket", "_sum", "_count", "_total"] {
                name = name.strip_suffix(suffix).unwrap_or(name);
            }
            name.to_string()
        })
        .collect()
}

#[test]
fn every_metric_in_the_rules_and_the_dashboard_is_exported_by_a_hub_or_an_agent() {
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
    let agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml(
            "agent-1",
            &[a.http],
            &[("ldap", echo)],
            "http: { bind: '127.0.0.1:0' }\n",
        ),
        &env.token("agent-1", None),
    );
    assert!(eventually(Duration::from_secs(15), || a
        .metric("nowconnect_agents_connected")
        == 1.0
        && mesh_established(&b, "hub-a")));
    let (status, hub_text) = b.get("/metrics");
    assert_eq!(status, 200);
    // The agent's series come from the agent's own endpoint (a hub exports
    // none of them).
    let (status, agent_text) = http_get(agent.http.expect("the agent's http address"), "/metrics");
    assert_eq!(status, 200);
    assert!(!hub_text.contains("nowconnect_agent_tunnels"), "{hub_text}");
    let exported = format!("{hub_text}{agent_text}");
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
        "queried by a sample name no hub or agent exports: {wrong:?}\n{samples:?}"
    );
}

/// The dashboard's `schemaVersion`: 41, the classic dashboard model that
/// Grafana 11.6 and 12 write. Grafana 13 writes 42 and migrates 41 on load
/// (its v42 step only touches `custom.hideFrom` overrides, which this
/// dashboard has none of); a version above the one a Grafana knows fails
/// its backend migration ("schema version not migrated to target version"),
/// so the file does not run ahead of the Grafana releases in use.
const GRAFANA_SCHEMA_VERSION: u64 = 41;

/// Panel types of Grafana's own panel plugins that a dashboard may use.
const PANEL_TYPES: &[&str] = &[
    "barchart",
    "bargauge",
    "gauge",
    "heatmap",
    "histogram",
    "logs",
    "piechart",
    "row",
    "stat",
    "state-timeline",
    "status-history",
    "table",
    "text",
    "timeseries",
];

/// What keeps `dash` from importing as a current Grafana dashboard.
fn dashboard_problems(dash: &serde_json::Value) -> Vec<String> {
    let mut bad = Vec::new();
    if dash["schemaVersion"].as_u64() != Some(GRAFANA_SCHEMA_VERSION) {
        bad.push(format!(
            "schemaVersion {} is not {GRAFANA_SCHEMA_VERSION}",
            dash["schemaVersion"]
        ));
    }
    for k in ["uid", "title"] {
        if dash[k].as_str().is_none_or(str::is_empty) {
            bad.push(format!("no {k}"));
        }
    }
    if !dash["version"].is_u64() {
        bad.push("no integer version".into());
    }
    // A datasource variable, and every panel's queries go to it.
    let ds_var = dash["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        .and_then(|v| v["name"].as_str());
    let Some(ds_var) = ds_var else {
        bad.push("no Prometheus datasource template variable".into());
        return bad;
    };
    let ds_ref = format!("${{{ds_var}}}");
    let empty = Vec::new();
    let top = dash["panels"].as_array().unwrap_or(&empty);
    // Panels of collapsed rows are laid out inside their row.
    let all: Vec<&serde_json::Value> = top
        .iter()
        .flat_map(|p| std::iter::once(p).chain(p["panels"].as_array().into_iter().flatten()))
        .collect();
    let mut ids = BTreeSet::new();
    let mut rects = Vec::new();
    for p in &all {
        let t = &p["title"];
        match p["id"].as_u64() {
            Some(id) if ids.insert(id) => {}
            Some(id) => bad.push(format!("panel {t}: id {id} is used twice")),
            None => bad.push(format!("panel {t}: id {} is not an integer", p["id"])),
        }
        let ty = p["type"].as_str().unwrap_or("");
        if !PANEL_TYPES.contains(&ty) {
            bad.push(format!("panel {t}: type {ty:?} is not a known panel type"));
        }
        let g = &p["gridPos"];
        let [h, w, x, y] = ["h", "w", "x", "y"].map(|k| g[k].as_u64());
        let (Some(h), Some(w), Some(x), Some(y)) = (h, w, x, y) else {
            bad.push(format!(
                "panel {t}: gridPos {g} lacks an integer h, w, x or y"
            ));
            continue;
        };
        if h == 0 || w == 0 || x + w > 24 {
            bad.push(format!(
                "panel {t}: gridPos {g} is empty or wider than the 24 columns"
            ));
        }
        rects.push((t.to_string(), x, y, w, h));
        if ty == "row" {
            continue;
        }
        if p["datasource"]["uid"] != ds_ref.as_str() {
            bad.push(format!("panel {t}: datasource is not {ds_ref}"));
        }
        let targets = p["targets"].as_array().unwrap_or(&empty);
        if targets.is_empty() {
            bad.push(format!("panel {t}: no targets"));
        }
        let mut refs = BTreeSet::new();
        for r in targets {
            match r["refId"].as_str() {
                Some(id) if !id.is_empty() && refs.insert(id) => {}
                other => bad.push(format!("panel {t}: refId {other:?} missing or repeated")),
            }
        }
    }
    for (i, a) in rects.iter().enumerate() {
        for b in &rects[i + 1..] {
            let apart =
                a.1 + a.3 <= b.1 || b.1 + b.3 <= a.1 || a.2 + a.4 <= b.2 || b.2 + b.4 <= a.2;
            if !apart {
                bad.push(format!("panels {} and {} overlap", a.0, b.0));
            }
        }
    }
    bad
}

#[test]
fn the_dashboard_imports_into_grafanas_current_dashboard_model() {
    let text = std::fs::read_to_string(deploy().join("grafana/nowconnect.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let bad = dashboard_problems(&dash);
    assert!(bad.is_empty(), "{bad:#?}");

    // The checks catch what they look for: a copy with an old schema
    // version, a repeated id, a panel moved onto another, a repeated refId,
    // a gridPos without a height and an unknown panel type.
    let mut broken = dash.clone();
    broken["schemaVersion"] = 39.into();
    let panels = broken["panels"].as_array_mut().unwrap();
    panels[1]["id"] = panels[0]["id"].clone();
    panels[2]["gridPos"] = panels[3]["gridPos"].clone();
    let first_ref = panels[4]["targets"][0].clone();
    panels[4]["targets"].as_array_mut().unwrap().push(first_ref);
    panels[5]["gridPos"].as_object_mut().unwrap().remove("h");
    panels[6]["type"] = "graph".into();
    let found = dashboard_problems(&broken);
    for expect in [
        "schemaVersion 39",
        "is used twice",
        "overlap",
        "missing or repeated",
        "lacks an integer h",
        "\"graph\" is not a known panel type",
    ] {
        assert!(
            found.iter().any(|f| f.contains(expect)),
            "{expect:?} not reported: {found:#?}"
        );
    }
}
