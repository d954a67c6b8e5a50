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
    cluster_of(env, &[(connector, target)])
}

/// A hub with a listener per connector (named after it) and an agent
/// serving each connector at its target.
fn cluster_of(env: &Env, connectors: &[(&str, SocketAddr)]) -> (HubProc, AgentProc) {
    let listeners: Vec<(&str, &str)> = connectors.iter().map(|(c, _)| (*c, *c)).collect();
    let hub = HubProc::start(env.path(), "hub", &env.hub_yaml(&listeners, ""));
    let agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[hub.http], connectors, ""),
        &env.token(
            "agent-1",
            Some(connectors.iter().map(|(c, _)| c.to_string()).collect()),
        ),
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

/// `nowconnect perf` started in the background, its output piped.
fn perf_spawn(args: &[&str]) -> std::process::Child {
    Command::new(bin())
        .arg("perf")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nowconnect perf")
}

/// Wait for `child` to exit within `within`; killed and failed otherwise.
fn finished_within(mut child: std::process::Child, within: Duration) -> Output {
    let end = std::time::Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > end {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("perf still running after {within:?}: {}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// The `perf tcp` arguments of the open-latency tests: the echo
/// measurements kept small, then `opens` opens at 200/s per side.
fn open_args(
    echo_listener: &str,
    echo: &str,
    open_target: &str,
    open_listener: &str,
    opens: &str,
    json: &std::path::Path,
) -> Vec<String> {
    [
        "tcp",
        "--through",
        echo_listener,
        "--direct",
        echo,
        "--bytes",
        "1048576",
        "--flows",
        "1",
        "--echoes",
        "20",
        "--open-target",
        open_target,
        "--open-through",
        open_listener,
        "--opens",
        opens,
        "--open-rate",
        "200",
        "--json",
        json.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
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

/// Open latency through a hub: perf is the open target (the `open`
/// connector's target), every open is answered on both sides, and the
/// report has the direct baseline. Connections to the open target that
/// are not opens of this run (a probe that sends nothing, 3 bytes and a
/// close, an id no open waits for, 3 bytes held open) are counted as
/// strays and take nothing from the run.
#[test]
fn perf_tcp_open_latency_through_a_hub_against_direct_and_strays_do_not_disturb_it() {
    let env = Env::new();
    let echo = echo_server();
    let open_target: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (hub, _agent) = cluster_of(&env, &[("echo", echo), ("open", open_target)]);
    let json = env.path().join("open.json");
    let md = env.path().join("open.md");
    let mut args = open_args(
        &hub.listener("echo").to_string(),
        &echo.to_string(),
        &open_target.to_string(),
        &hub.listener("open").to_string(),
        "200",
        &json,
    );
    args.extend(["--markdown".to_string(), md.to_str().unwrap().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = perf_spawn(&args);
    // The probe itself is a stray: it connects and sends nothing.
    assert!(wait_port(open_target, Duration::from_secs(10)));
    {
        use std::io::Write;
        let mut short = std::net::TcpStream::connect(open_target).unwrap();
        short.write_all(b"abc").unwrap();
        drop(short);
        let mut unknown = std::net::TcpStream::connect(open_target).unwrap();
        unknown
            .write_all(&0xdead_beef_0000_0001u64.to_be_bytes())
            .unwrap();
        drop(unknown);
    }
    let mut held = std::net::TcpStream::connect(open_target).unwrap();
    std::io::Write::write_all(&mut held, b"xyz").unwrap();
    let out = finished_within(run, Duration::from_secs(60));
    drop(held);
    assert!(out.status.success(), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for side in ["through", "direct"] {
        let open = &r[side]["open"];
        assert_eq!(open["count"], 200, "{side}: {r}");
        assert_eq!(r[side]["open_errors"], 0, "{side}: {r}");
        let (p50, p99) = (
            open["p50_us"].as_u64().unwrap(),
            open["p99_us"].as_u64().unwrap(),
        );
        assert!(p50 > 0 && p99 >= p50, "{side}: {r}");
        // The echo measurements ran as before, against the echo listener.
        assert_eq!(r[side]["echo"]["count"], 20, "{side}: {r}");
    }
    assert_eq!(
        r["through"]["open_addr"],
        hub.listener("open").to_string(),
        "{r}"
    );
    assert_eq!(r["direct"]["open_addr"], open_target.to_string(), "{r}");
    assert_eq!(r["open_target"], open_target.to_string(), "{r}");
    assert!(r["added_open_p99_us"].is_i64(), "{r}");
    // The probe, the 3 bytes closed and the unknown id; the held one is
    // not read to its end before the run does.
    assert!(r["open_strays"].as_u64().unwrap() >= 3, "{r}");
    let md = std::fs::read_to_string(&md).unwrap();
    assert!(
        md.contains("Open latency (200 opens at 200/s")
            && md.contains(&format!("| through `{}` | 200 | 0 |", hub.listener("open"))),
        "{md}"
    );
    assert!(text(&out).contains("added open p99"), "{}", text(&out));
}

/// When the connector behind `--open-through` does not lead to perf's open
/// target (here its target is a closed port), every open fails at once with
/// a message that says so, the direct baseline is untouched, and perf exits
/// 3 well before the opens' 10-s timeout.
#[test]
fn perf_tcp_open_latency_fails_fast_and_clearly_when_the_connector_points_elsewhere() {
    let env = Env::new();
    let echo = echo_server();
    let closed: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let open_target: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (hub, _agent) = cluster_of(&env, &[("echo", echo), ("open", closed)]);
    let json = env.path().join("open.json");
    let args = open_args(
        &hub.listener("echo").to_string(),
        &echo.to_string(),
        &open_target.to_string(),
        &hub.listener("open").to_string(),
        "50",
        &json,
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = std::time::Instant::now();
    let out = finished_within(perf_spawn(&args), Duration::from_secs(30));
    let took = started.elapsed();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(3), "{t}");
    assert!(t.contains("error: 50 of 50 opens failed through"), "{t}");
    assert!(t.contains("before the id reached the open target"), "{t}");
    assert!(took < Duration::from_secs(9), "took {took:?}: {t}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["through"]["open_errors"], 50, "{r}");
    assert_eq!(r["through"]["open"]["count"], 0, "{r}");
    let samples = r["through"]["open_error_samples"].as_array().unwrap();
    assert!(
        !samples.is_empty()
            && samples
                .iter()
                .all(|s| s.as_str().unwrap().contains(&open_target.to_string())),
        "{r}"
    );
    assert_eq!(r["direct"]["open"]["count"], 50, "{r}");
    assert_eq!(r["direct"]["open_errors"], 0, "{r}");
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
