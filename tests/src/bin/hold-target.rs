//! A target that accepts TCP connections and holds them open without
//! reading or writing, for tests with many idle flows. One thread, any
//! number of connections; prints `listening ADDR` once bound.

use std::io::Write;
use std::net::TcpListener;

fn main() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
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
