//! A bare TCP relay, the reference that `tunnel-bench --reference` chains
//! in the shape of a NowConnect path: each connection it accepts is copied
//! both ways to `TO` in 256 KiB reads (the largest read a NowConnect flow
//! makes), with no framing, multiplexing or flow control. It shows what the
//! same number of processes, TCP hops and TLS ends cost on this machine
//! when they do nothing else.
//!
//!   relay MODE TO [CA CERT KEY] [--threads N]
//!
//! MODE is `plain`, `tls-out` (accept plain, dial `TO` over TLS, checking
//! its certificate against CA) or `tls-in` (accept TLS with CERT and KEY,
//! dial `TO` plain). `--threads 1` runs one thread (as `worker_threads: 1`
//! does for a hub); otherwise tokio's default. Prints `listening ADDR` once
//! bound.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 256 * 1024;

enum Mode {
    Plain,
    TlsOut(tokio_rustls::TlsConnector),
    TlsIn(tokio_rustls::TlsAcceptor),
}

fn usage() -> ! {
    eprintln!("usage: relay plain|tls-out|tls-in TO [CA CERT KEY] [--threads N]");
    std::process::exit(2)
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut threads = 0usize;
    if let Some(i) = args.iter().position(|a| a == "--threads") {
        threads = args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| usage());
        args.drain(i..i + 2);
    }
    let to: SocketAddr = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage());
    let pem = |i: usize| args.get(i).cloned().unwrap_or_else(|| usage());
    let mode = match args.first().map(String::as_str) {
        Some("plain") => Mode::Plain,
        Some("tls-out") => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(pem(2)).expect("CA file") {
                roots.add(c.expect("CA certificate")).expect("CA");
            }
            let cfg = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            Mode::TlsOut(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
        }
        Some("tls-in") => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pem(3))
                .expect("certificate file")
                .map(|c| c.expect("certificate"))
                .collect();
            let key = PrivateKeyDer::from_pem_file(pem(4)).expect("key file");
            let cfg = rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .expect("certificate and key");
            Mode::TlsIn(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
        }
        _ => usage(),
    };
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build()
    .expect("runtime");
    rt.block_on(serve(Arc::new(mode), to));
}

async fn serve(mode: Arc<Mode>, to: SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    println!("listening {}", l.local_addr().expect("addr"));
    std::io::stdout().flush().expect("flush");
    loop {
        let (inbound, _) = match l.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let mode = mode.clone();
        tokio::spawn(async move {
            if let Err(e) = relay(&mode, inbound, to).await {
                eprintln!("relay: {e}");
            }
        });
    }
}

async fn relay(mode: &Mode, inbound: TcpStream, to: SocketAddr) -> std::io::Result<()> {
    inbound.set_nodelay(true)?;
    let outbound = TcpStream::connect(to).await?;
    outbound.set_nodelay(true)?;
    match mode {
        Mode::Plain => pipe(inbound, outbound).await,
        Mode::TlsOut(c) => {
            let name = ServerName::try_from("localhost").expect("name");
            pipe(inbound, c.connect(name, outbound).await?).await
        }
        Mode::TlsIn(a) => pipe(a.accept(inbound).await?, outbound).await,
    }
}

/// Copy both ways until each side has ended its direction.
async fn pipe<A, B>(a: A, b: B) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let (x, y) = tokio::join!(copy(ar, bw), copy(br, aw));
    x.and(y)
}

async fn copy(
    mut r: impl AsyncRead + Unpin,
    mut w: impl AsyncWrite + Unpin,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
    }
}
