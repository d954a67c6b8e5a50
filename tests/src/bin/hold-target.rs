//! A target that accepts TCP connections and holds them open without
//! reading or writing, for tests with many idle flows. One thread, any
//! number of connections; prints `listening ADDR` once bound. It listens
//! with a backlog of 4096, as the hub does: with the runtimes' 128, a burst
//! of the agent's dials overflows it, the kernel drops them and TCP retries
//! a second later, and the agent's pending dials pile up to its limit.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

fn main() {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    socket.bind(&addr.into()).expect("bind");
    socket.listen(4096).expect("listen");
    let l: TcpListener = socket.into();
    println!("listening {}", l.local_addr().expect("addr"));
    std::io::stdout().flush().expect("flush");
    let mut held = Vec::new();
    for s in l.incoming() {
        match s {
            Ok(s) => held.push(s),
            Err(e) => eprintln!("accept: {e}"),
        }
    }
}
