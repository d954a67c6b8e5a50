//! `nowconnect perf ldap` and `nowconnect perf tcp` against real pieces: a
//! real `slapd` (and an echo service) behind a hub and an agent, with the
//! direct target measured in the same run; reports, plots and the exit
//! codes of the assertions.

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

use nowconnect_tests::ldap::{ADMIN_DN, ADMIN_PW, SUFFIX, Slapd};
use nowconnect_tests::*;

fn cluster(env: &Env, connector: &str, target: SocketAddr) -> (HubProc, AgentProc) {
    let hub = HubProc::start(
        env.path(),
        "hub",
        &env.hub_yaml(&[(connector, connector)], ""),
    );
    let agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[hub.http], &[(connector, target)], ""),
        &env.token("agent-1", None),
    );
    assert!(hub.agents_attached(1.0, Duration::from_secs(15)));
    (hub, agent)
}

fn perf(args: &[&str]) -> Output {
    Command::new(bin())
        .arg("perf")
        .args(args)
        .output()
        .expect("run nowconnect perf")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn perf_ldap_measures_through_and_direct_and_its_assertions_set_the_exit_code() {
    let env = Env::new();
    let slapd = Slapd::start(env.path());
    let (hub, _agent) = cluster(&env, "ldap", slapd.addr);
    let pw = env.path().join("pw");
    std::fs::write(&pw, format!("{ADMIN_PW}\n")).unwrap();
    let (json, md, svg) = (
        env.path().join("r.json"),
        env.path().join("r.md"),
        env.path().join("r.svg"),
    );
    let through = format!("ldap://{}", hub.listener("ldap"));
    let direct = format!("ldap://{}", slapd.addr);
    let common = |extra: &[&str]| -> Output {
        let mut a = vec![
            "ldap",
            "--url",
            &through,
            "--bind-dn",
            ADMIN_DN,
            "--password-file",
            pw.to_str().unwrap(),
            "--base",
            SUFFIX,
            "--filter",
            "(uid=alice)",
            "--concurrency",
            "4",
            "--quiet",
        ];
        a.extend_from_slice(extra);
        perf(&a)
    };
    let out = common(&[
        "--direct",
        &direct,
        "--duration",
        "2s",
        "--p99-max",
        "5s",
        "--error-budget",
        "0",
        "--json",
        json.to_str().unwrap(),
        "--markdown",
        md.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["kind"], "ldap");
    assert_eq!(r["through"]["errors"], 0, "{r}");
    assert!(r["through"]["requests"].as_u64().unwrap() > 20, "{r}");
    assert!(r["direct"]["requests"].as_u64().unwrap() > 20, "{r}");
    let ratio = r["throughput_ratio"].as_f64().unwrap();
    assert!(ratio > 0.0 && ratio < 10.0, "{r}");
    for q in ["p50_us", "p90_us", "p95_us", "p99_us", "max_us"] {
        assert!(r["through"]["latency"][q].as_u64().unwrap() > 0, "{q}: {r}");
    }
    assert_eq!(r["passed"], true);
    let md = std::fs::read_to_string(&md).unwrap();
    assert!(
        md.contains("| through `ldap://") && md.contains("| direct `ldap://"),
        "{md}"
    );
    assert!(md.contains("r.svg"), "{md}");
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.matches("<polyline").count() == 2,
        "{svg}"
    );

    // A p99 limit no real run meets: exit code 3, the assertion named.
    let out = common(&["--requests", "40", "--p99-max", "1us"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("assertion p99") && text(&out).contains("FAIL"),
        "{}",
        text(&out)
    );

    // A wrong password is a clear error before any load.
    let bad = env.path().join("bad");
    std::fs::write(&bad, "wrong").unwrap();
    let out = perf(&[
        "ldap",
        "--url",
        &through,
        "--bind-dn",
        ADMIN_DN,
        "--password-file",
        bad.to_str().unwrap(),
        "--base",
        SUFFIX,
        "--requests",
        "5",
        "--quiet",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("bind"), "{}", text(&out));
}

#[test]
fn perf_ldap_error_budget_fails_when_the_directory_goes_away_mid_run() {
    let env = Env::new();
    let mut slapd = Slapd::start(env.path());
    let (hub, _agent) = cluster(&env, "ldap", slapd.addr);
    let through = format!("ldap://{}", hub.listener("ldap"));
    let json = env.path().join("r.json");
    let child = Command::new(bin())
        .args([
            "perf",
            "ldap",
            "--url",
            &through,
            "--bind-dn",
            ADMIN_DN,
            "--base",
            SUFFIX,
            "--filter",
            "(uid=bob)",
            "--concurrency",
            "2",
            "--duration",
            "3s",
            "--error-budget",
            "1",
            "--quiet",
            "--json",
            json.to_str().unwrap(),
        ])
        .env("NC_PERF_PASSWORD", ADMIN_PW)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    slapd.proc.kill();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("assertion error rate") && t.contains("FAIL"),
        "{t}"
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(r["through"]["errors"].as_u64().unwrap() > 0, "{r}");
    assert!(
        !r["through"]["error_samples"].as_array().unwrap().is_empty(),
        "{r}"
    );
}

#[test]
fn perf_tcp_reports_throughput_latency_and_connection_rate_against_direct() {
    let env = Env::new();
    let echo = echo_server();
    let (hub, _agent) = cluster(&env, "echo", echo);
    let json = env.path().join("t.json");
    let md = env.path().join("t.md");
    let listener = hub.listener("echo").to_string();
    let direct = echo.to_string();
    let out = perf(&[
        "tcp",
        "--through",
        &listener,
        "--direct",
        &direct,
        "--bytes",
        "8388608",
        "--flows",
        "4",
        "--echoes",
        "300",
        "--conn-rate",
        "100",
        "--conn-duration",
        "1s",
        "--json",
        json.to_str().unwrap(),
        "--markdown",
        md.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for side in ["through", "direct"] {
        assert!(r[side]["one_flow_mib_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r[side]["n_flows_mib_s"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r[side]["echo"]["count"], 300, "{r}");
        assert_eq!(r[side]["conn_errors"], 0, "{r}");
        assert!(
            r[side]["conn_rate_achieved"].as_f64().unwrap() > 50.0,
            "{r}"
        );
    }
    let ratio = r["one_flow_ratio"].as_f64().unwrap();
    assert!(ratio > 0.0 && ratio < 2.0, "{r}");
    assert!(r["added_echo_p50_us"].is_i64(), "{r}");
    let md = std::fs::read_to_string(&md).unwrap();
    assert!(md.contains("Through / direct: one flow"), "{md}");
}

/// `nowconnect perf agents` holds N real agent tunnels with distinct ids
/// and tokens on a real hub: every one is attached (the hub's own count),
/// a client reaches the connector through them, and the report says all
/// connected, names each agent once and finds no redial faster than the
/// backoff. The hub refuses agents past its `limits.max_agents`, and the
/// tool reports the ones it could not hold rather than claiming them.
#[test]
fn perf_agents_holds_distinct_agents_on_a_hub_and_reports_them() {
    let env = Env::new();
    let echo = echo_server();
    let n = 40usize;
    let hub = HubProc::start(
        env.path(),
        "hub",
        &env.hub_yaml(
            &[("perf", "perf")],
            &format!("limits:\n  max_agents: {}\n", n - 5),
        ),
    );
    let report = env.path().join("agents.json");
    let run = Command::new(bin())
        .args(["perf", "agents", "--hub"])
        .arg(format!("ws://{}/tunnel", hub.http))
        .args(["--count", &n.to_string(), "--target", &echo.to_string()])
        .arg("--jwt-key")
        .arg(&env.secret_file)
        .args(["--ramp", "200", "--duration", "4s", "--json"])
        .arg(&report)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nowconnect perf agents");
    assert!(
        hub.agents_attached((n - 5) as f64, Duration::from_secs(15)),
        "the hub never held {} agents",
        n - 5
    );
    assert!(echo_once(hub.listener("perf"), b"through a perf agent"));
    let out = run.wait_with_output().unwrap();
    let text = text(&out);
    assert!(out.status.success(), "{text}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["count"], n as u64, "{text}");
    assert_eq!(r["max_connected"], (n - 5) as u64, "{text}");
    assert!(r["all_connected_ms"].is_null(), "5 were refused: {text}");
    let ids: std::collections::BTreeSet<&str> = r["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), n, "{text}");
    assert_eq!(r["backoff"]["below_floor"], 0, "{text}");
    assert!(text.contains(&format!("perf-agents: count={n} ")), "{text}");
    // The refused agents were refused for the limit, and kept dialing at
    // their backoff, not faster.
    assert!(
        r["dial_failures"].as_u64().unwrap() + r["tunnels_ended"].as_u64().unwrap() >= 5,
        "{text}"
    );
}
