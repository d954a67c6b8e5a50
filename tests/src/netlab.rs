//! A lab network of Linux network namespaces, for chaos runs with real
//! faults: every node (a hub, an agent, Redis, a target) lives in a
//! namespace of its own, joined to a bridge in the root namespace by a veth
//! pair. The root namespace holds the bridge's address (`.1`), so the
//! harness reaches every node, as clients outside the cluster would.
//!
//! Faults are kernel rules in the nodes' namespaces:
//! - partitions and loss: `nft` drop rules in an `inet chaos` table (output
//!   hook: what a node sends), one-way or both ways;
//! - delay, jitter and reordering: `iptables … -j NFQUEUE --queue-bypass`
//!   handing a link's packets to `chaos netem` in that namespace (this
//!   machine's kernel has no `sch_netem`; the queue holds each packet in
//!   user space and releases it late). With `--queue-bypass` a rule whose
//!   daemon is gone lets packets pass instead of dropping them.
//!
//! Needs root, `ip` (iproute2), `nft` (nftables) and `iptables`. Every
//! namespace, veth and bridge carries the lab's tag and is removed on drop;
//! [`Lab::remove_stale`] removes what a killed run left behind.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// One node of the lab: its namespace and address.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// Namespaces, veths and a bridge, removed on drop.
pub struct Lab {
    pub tag: String,
    pub bridge: String,
    /// The bridge's address in the root namespace (the harness's side).
    pub gateway: Ipv4Addr,
    pub nodes: Vec<Node>,
}

/// Run `program args…`; an error names the command and its output.
pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The prefix of every lab name: `ncx<id>`.
const PREFIX: &str = "ncx";

impl Lab {
    /// A lab with one namespace per name, addressed `10.231.<net>.<10+i>`,
    /// all reachable from the root namespace. `pid` (the running process's)
    /// names it, so [`Lab::remove_stale`] leaves a live run's lab alone;
    /// `net` is the first /24 from `pid` on that no route uses yet.
    pub fn create(pid: u32, names: &[&str]) -> Result<Lab, String> {
        let tag = format!("{PREFIX}{pid}");
        let routes = run("ip", &["route", "show"]).unwrap_or_default();
        let net = (0..200u32)
            .map(|k| ((pid + k) % 200 + 20) as u8)
            .find(|n| !routes.contains(&format!("10.231.{n}.0/24")))
            .ok_or("every 10.231.x.0/24 of the lab range is in use")?;
        let gateway = Ipv4Addr::new(10, 231, net, 1);
        let mut lab = Lab {
            bridge: format!("{tag}br"),
            tag,
            gateway,
            nodes: Vec::new(),
        };
        // On any error below, drop removes what was made so far.
        run("ip", &["link", "add", &lab.bridge, "type", "bridge"])?;
        run(
            "ip",
            &["addr", "add", &format!("{gateway}/24"), "dev", &lab.bridge],
        )?;
        run("ip", &["link", "set", &lab.bridge, "up"])?;
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{}-{name}", lab.tag);
            let ip = Ipv4Addr::new(10, 231, net, 10 + i as u8);
            let host_if = format!("{}v{i}", lab.tag);
            let peer_if = format!("{}p{i}", lab.tag);
            run("ip", &["netns", "add", &ns])?;
            lab.nodes.push(Node {
                name: name.to_string(),
                ns: ns.clone(),
                ip,
            });
            run(
                "ip",
                &[
                    "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
                ],
            )?;
            run("ip", &["link", "set", &peer_if, "netns", &ns])?;
            run("ip", &["link", "set", &host_if, "master", &lab.bridge])?;
            run("ip", &["link", "set", &host_if, "up"])?;
            let inns = |args: &[&str]| {
                let mut a = vec!["-n", ns.as_str()];
                a.extend_from_slice(args);
                run("ip", &a)
            };
            inns(&["link", "set", &peer_if, "name", "eth0"])?;
            inns(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            inns(&["link", "set", "eth0", "up"])?;
            inns(&["link", "set", "lo", "up"])?;
            inns(&["route", "add", "default", "via", &gateway.to_string()])?;
            // The fault table: partitions and loss go here, healed by a flush.
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &ns,
                    "nft",
                    "add table inet chaos; add chain inet chaos out { type filter hook output priority 0; }",
                ],
            )?;
        }
        Ok(lab)
    }

    /// Remove namespaces (and the processes still in them), veths and
    /// bridges of earlier labs (`ncx<pid>…`) whose process is gone (a
    /// killed run); a live run's lab stays.
    /// Returns how many namespaces it removed.
    pub fn remove_stale() -> usize {
        // The pid in a lab name: `ncx1234-hub1` or `ncx1234br` / `ncx1234v0`.
        let stale = |name: &str| {
            name.strip_prefix(PREFIX)
                .map(|rest| {
                    rest.chars()
                        .take_while(char::is_ascii_digit)
                        .collect::<String>()
                })
                .filter(|pid| !pid.is_empty())
                .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        };
        let list = run("ip", &["netns", "list"]).unwrap_or_default();
        let mut n = 0;
        for line in list.lines() {
            let ns = line.split_whitespace().next().unwrap_or("");
            if !stale(ns) {
                continue;
            }
            // Processes of a killed run live on in its namespaces.
            let pids = run("ip", &["netns", "pids", ns]).unwrap_or_default();
            for pid in pids.split_whitespace() {
                let _ = run("kill", &["-KILL", pid]);
            }
            if run("ip", &["netns", "del", ns]).is_ok() {
                n += 1;
            }
        }
        let links = run("ip", &["-o", "link", "show"]).unwrap_or_default();
        for line in links.lines() {
            if let Some(name) = line.split(": ").nth(1) {
                let name = name.split('@').next().unwrap_or(name);
                if stale(name) {
                    let _ = run("ip", &["link", "del", name]);
                }
            }
        }
        n
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no lab node `{name}`"))
    }

    /// `program` to be run inside `node`'s namespace (`ip netns exec`,
    /// which execs it: the child's pid is the program's).
    pub fn command(&self, node: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.node(node).ns]).arg(program);
        c
    }

    fn nft(&self, node: &str, rule: &str) -> Result<(), String> {
        run("ip", &["netns", "exec", &self.node(node).ns, "nft", rule]).map(|_| ())
    }

    /// Drop every packet `from` sends to `to` (one way: `to` still reaches
    /// `from`, but TCP between them stalls, as behind a broken route).
    pub fn drop_one_way(&self, from: &str, to: &str) -> Result<(), String> {
        let to_ip = self.node(to).ip;
        self.nft(
            from,
            &format!("add rule inet chaos out ip daddr {to_ip} drop"),
        )
    }

    /// A full partition between `a` and `b`.
    pub fn partition(&self, a: &str, b: &str) -> Result<(), String> {
        self.drop_one_way(a, b)?;
        self.drop_one_way(b, a)
    }

    /// Lose `percent` of the packets between `a` and `b`, both ways.
    pub fn loss(&self, a: &str, b: &str, percent: u32) -> Result<(), String> {
        for (x, y) in [(a, b), (b, a)] {
            let ip = self.node(y).ip;
            self.nft(
                x,
                &format!(
                    "add rule inet chaos out ip daddr {ip} numgen random mod 100 < {percent} drop"
                ),
            )?;
        }
        Ok(())
    }

    /// Hand the packets `from` sends to `to` to NFQUEUE `queue` in `from`'s
    /// namespace (served by `chaos netem`, started there).
    pub fn queue_to(&self, from: &str, to: &str, queue: u16) -> Result<(), String> {
        let to_ip = self.node(to).ip.to_string();
        let q = queue.to_string();
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.node(from).ns,
                "iptables",
                "-A",
                "OUTPUT",
                "-d",
                &to_ip,
                "-j",
                "NFQUEUE",
                "--queue-num",
                &q,
                "--queue-bypass",
            ],
        )
        .map(|_| ())
    }

    /// Remove every fault rule in every namespace (partitions, loss,
    /// queues). Processes are not touched.
    pub fn heal_network(&self) -> Result<(), String> {
        for n in &self.nodes {
            run(
                "ip",
                &["netns", "exec", &n.ns, "nft", "flush chain inet chaos out"],
            )?;
            run("ip", &["netns", "exec", &n.ns, "iptables", "-F", "OUTPUT"])?;
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in &self.nodes {
            let _ = run("ip", &["netns", "del", &n.ns]);
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
    }
}
