//! The shape of the code, checked: protocol decisions are made in the core's
//! nodes, not in the runtimes or the simulator, and no module of theirs grows
//! past what a reader can hold.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn lines(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .count()
}

#[test]
fn no_module_of_the_shared_runtime_or_the_simulator_is_over_900_lines() {
    let r = root();
    let long: Vec<String> = ["runtime-shared/src", "sim/src"]
        .iter()
        .flat_map(|d| rust_files(&r.join(d)))
        .filter(|p| lines(p) > 900)
        .map(|p| format!("{} ({} lines)", p.display(), lines(&p)))
        .collect();
    assert!(long.is_empty(), "split these: {long:?}");
}

#[test]
fn each_runtime_agent_is_its_sockets_and_tasks_only() {
    let r = root();
    for f in [
        "runtime-tokio/src/agent.rs",
        "runtime-async-std/src/agent.rs",
    ] {
        let n = lines(&r.join(f));
        assert!(
            n <= 200,
            "{f}: {n} lines; the agent's loop is `nowconnect_shared::agent`, the decisions `AgentNode`"
        );
    }
}

/// The inputs by which the agent's and the hub's control machines decide
/// (hub lost, DRAIN, a flow opened; a HELLO admitted, a flow counted on a
/// tunnel, a drain started, a client routed, a renewed token sent; a
/// listener's client counted against the hub's limit and the reasons its
/// edge refuses one): only
/// the core's nodes (`AgentNode`, `HubNode`, `TokenRenewal`) call them. A runtime or the simulator calling
/// them would be a second copy of how the machines combine.
/// (`sim/src/fuzz.rs` fuzzes the control machines on their own, on
/// purpose.)
#[test]
fn only_the_core_nodes_combine_the_control_machines() {
    let r = root();
    let forbidden = [
        "agent::Agent;",
        "agent::{Agent,",
        "Agent::new(",
        ".hub_draining(",
        ".hub_established(",
        ".flow_opened(",
        ".flow_gone(",
        ".hub_lost(",
        // The hub's: HELLO admission, drains of v1 tunnels and the flow
        // counts of routes and mesh opens are `HubNode`'s.
        ".tunnel_hello_as(",
        ".tunnel_hello(",
        ".tunnel_cannot_drain(",
        ".flow_started(",
        ".check_mesh_open(",
        // A drain's course (when the listeners close, when it is over) and
        // the client flows it waits for are `HubNode`'s too.
        "hub_mut().drain(",
        "hub_mut().client_connected",
        ".client_connected_pinned(",
        // Which tunnels get a renewed token is the core `TokenRenewal`'s.
        ".send_reauth(",
        // Why a link refused an open (reset code, metric label, reason) is
        // `SendError::refusal`'s: the runtimes carry an `OpenRefused`, they
        // never build one.
        "from_send(",
        "OpenRefused {",
        // Whether a listener's client fits under `max_client_connections`
        // is `HubNode::client_accepted`'s (counted from the accept on, for
        // the limit and for a drain); a runtime never reads the node's
        // count to decide it.
        ".client_flows()",
        // Why a listener's edge refused a client (the node's limit, PROXY
        // trust, headers pending or bad, the listener's own limits and
        // rates) is the core's: the runtimes label a refusal with its
        // typed reason's `as_str`, never with a string of their own.
        "\"limit_exceeded\"",
        "\"untrusted_proxy\"",
        "\"proxy_pending\"",
        "\"proxy_header\"",
        "\"listener_limit\"",
        "\"client_limit\"",
        "\"listener_rate\"",
        "\"client_rate\"",
    ];
    // Nor a comparison against the client limit: the runtime hands the
    // limit to the node and nothing else.
    let compares_client_limit = |line: &str| {
        line.contains("max_client_connections")
            && [">", "<", ".min(", ".max(", "cmp("]
                .iter()
                .any(|op| line.contains(op))
    };
    let mut found = Vec::new();
    for dir in [
        "runtime-shared/src",
        "runtime-tokio/src",
        "runtime-async-std/src",
        "sim/src",
    ] {
        for p in rust_files(&r.join(dir)) {
            if p.ends_with("sim/src/fuzz.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&p).expect("read");
            for (i, line) in text.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                // A function returning one does not build one.
                let line = line.replace("-> OpenRefused {", "->");
                let line = line.as_str();
                if forbidden.iter().any(|f| line.contains(f)) || compares_client_limit(line) {
                    found.push(format!("{}:{}: {}", p.display(), i + 1, line.trim()));
                }
            }
        }
    }
    assert!(found.is_empty(), "outside the core's nodes: {found:#?}");
}
