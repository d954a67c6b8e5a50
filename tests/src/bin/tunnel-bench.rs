//! One flow through a real hub and agent (separate processes) against a
//! direct loopback connection, measured in the same run:
//! bulk throughput (client → sink) and 1 KiB echo latency.
//!
//!   cargo run --release -p nowconnect-tests --bin tunnel-bench -- [--bytes N] [--echoes N]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nowconnect_tests::{AgentProc, Env, HubProc, echo_server, eventually};

/// Reads until EOF, then answers with the byte count (8 bytes, LE).
fn sink_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k as u64,
                    }
                }
                let _ = s.write_all(&n.to_le_bytes());
            });
        }
    });
    addr
}

fn throughput(addr: SocketAddr, bytes: u64) -> f64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let buf = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..k]).unwrap();
        left -= k as u64;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = [0u8; 8];
    s.read_exact(&mut got).unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(
        u64::from_le_bytes(got),
        bytes,
        "sink saw a different byte count"
    );
    bytes as f64 / secs
}

fn echo_latency(addr: SocketAddr, n: usize) -> Histogram<u64> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let req = vec![0xa5u8; 1024];
    let mut resp = vec![0u8; 1024];
    let mut h = Histogram::<u64>::new(3).unwrap();
    for i in 0..n + 200 {
        let t = Instant::now();
        s.write_all(&req).unwrap();
        s.read_exact(&mut resp).unwrap();
        if i >= 200 {
            h.record(t.elapsed().as_nanos() as u64).unwrap();
        }
    }
    h
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn main() {
    let mut bytes: u64 = 2 * 1024 * 1024 * 1024;
    let mut echoes = 20_000;
    let mut window: u32 = 256 * 1024;
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--bytes" => bytes = args[i + 1].parse().expect("--bytes N"),
            "--echoes" => echoes = args[i + 1].parse().expect("--echoes N"),
            "--window" => window = args[i + 1].parse().expect("--window BYTES"),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    let env = Env::new();
    let sink = sink_server();
    let echo = echo_server();
    let hub = HubProc::start(
        env.path(),
        "hub",
        &env.hub_yaml(
            &[("sink", "sink"), ("echo", "echo")],
            "log:\n  level: warn\n",
        )
        .replace("tunnel:\n", &format!("tunnel:\n  window_bytes: {window}\n")),
    );
    let agent_yaml = env.agent_yaml(
        "bench",
        &[hub.http],
        &[("sink", sink), ("echo", echo)],
        "log:\n  level: warn\n",
    ) + &format!("window_bytes: {window}\n");
    let _agent = AgentProc::start(env.path(), "agent", &agent_yaml, &env.token("bench", None));
    assert!(eventually(Duration::from_secs(15), || hub
        .metric("nowconnect_agents_connected")
        == 1.0));

    // Warm up both paths, then alternate direct and tunnel runs.
    throughput(sink, bytes / 8);
    throughput(hub.listener("sink"), bytes / 8);
    let mut direct = Vec::new();
    let mut tunnel = Vec::new();
    for _ in 0..3 {
        direct.push(throughput(sink, bytes));
        tunnel.push(throughput(hub.listener("sink"), bytes));
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (d, t) = (med(&mut direct), med(&mut tunnel));
    println!("per-flow window: {window} bytes");
    println!(
        "## one-flow throughput ({} MiB per run, median of 3)",
        bytes >> 20
    );
    println!("direct loopback : {:>8.1} MiB/s", d / 1048576.0);
    println!("through the hub : {:>8.1} MiB/s", t / 1048576.0);
    println!("ratio           : {:>8.3}x", t / d);

    let hd = echo_latency(echo, echoes);
    let ht = echo_latency(hub.listener("echo"), echoes);
    println!("## 1 KiB echo latency ({echoes} round trips, µs)");
    println!("path     p50      p90      p99      max");
    for (name, h) in [("direct", &hd), ("tunnel", &ht)] {
        println!(
            "{name:<6} {:>7.1}  {:>7.1}  {:>7.1}  {:>7.1}",
            us(h.value_at_quantile(0.5)),
            us(h.value_at_quantile(0.9)),
            us(h.value_at_quantile(0.99)),
            us(h.max())
        );
    }
    println!(
        "added  {:>7.1}  {:>7.1}  {:>7.1}",
        us(ht.value_at_quantile(0.5)).max(0.0) - us(hd.value_at_quantile(0.5)),
        us(ht.value_at_quantile(0.9)) - us(hd.value_at_quantile(0.9)),
        us(ht.value_at_quantile(0.99)) - us(hd.value_at_quantile(0.99))
    );
}
