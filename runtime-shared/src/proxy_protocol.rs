//! The PROXY protocol (HAProxy's, versions 1 and 2) on a listener: a load
//! balancer in front of the hub sends a header with the real client's
//! address before the client's bytes. Parsed with the `ppp` crate.
//!
//! Only connections from `trusted_proxies` are read for a header, and each
//! of them must send one (a connection from a trusted balancer without a
//! header is refused, so a misconfigured balancer is noticed at once). A
//! connection from any other address is refused: a client that can reach
//! the listener directly must not be able to name its own address.
//!
//! The header is read exactly (never a byte of the client's own data), so
//! the socket is handed on unchanged after it.

use std::net::{IpAddr, SocketAddr};

use futures_util::io::{AsyncRead, AsyncReadExt};
use ipnet::IpNet;

/// Longest version 1 header (the specification's bound, CRLF included).
const V1_MAX: usize = 107;
/// Longest version 2 header taken: the fixed 16 bytes and the address and
/// TLV block (balancers add a few TLVs; the protocol allows 64 KiB).
const V2_MAX: usize = 16 + 1024;
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// The addresses a proxy in front of the hub may connect from: a
/// listener's PROXY-protocol balancers (`listeners[].proxy_protocol`) or the
/// TLS-terminating proxies of the mesh (`ha.mesh.trusted_proxies`). An
/// IPv4-mapped IPv6 source (`::ffff:10.0.0.1`, from a dual-stack socket)
/// counts as its IPv4 address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parse entries: CIDRs (`10.0.0.0/8`, `fd00::/64`) or single addresses
    /// (`/32`, `/128`). `Err` names the index of the first bad entry and why:
    /// not an address or network, host bits set (`10.0.0.7/8`), or a
    /// network of every address (anyone could then speak for any client).
    /// An empty list is the caller's to refuse, with its own reason.
    pub fn parse(entries: &[String]) -> Result<Self, (usize, String)> {
        let mut nets = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            nets.push(parse_net(e).map_err(|r| (i, r))?);
        }
        Ok(TrustedProxies(nets))
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    let net = if s.contains('/') {
        let net: IpNet = s
            .parse()
            .map_err(|_| format!("`{s}` is not a network like 10.0.0.0/8 or fd00::/64"))?;
        if net.trunc() != net {
            return Err(format!(
                "`{s}` has host bits set; the network is {}",
                net.trunc()
            ));
        }
        net
    } else {
        let ip: IpAddr = s
            .parse()
            .map_err(|_| format!("`{s}` is not an address or a network like 10.0.0.0/8"))?;
        IpNet::from(ip)
    };
    if net.prefix_len() == 0 {
        return Err(format!(
            "`{s}` trusts every address, so anyone who reaches the port could claim any client or certificate; name the proxies' networks"
        ));
    }
    Ok(net)
}

/// Read one PROXY header from `s` and return the client address it
/// carries: `Ok(None)` for a header that carries none (v1 `UNKNOWN`, v2
/// `LOCAL`, as balancers send for their own health checks), `Err` with the
/// reason for anything that is not a valid header.
pub async fn read_header<S: AsyncRead + Unpin>(s: &mut S) -> Result<Option<SocketAddr>, String> {
    let mut buf = vec![0u8; 16];
    // Both versions are at least 15 bytes: take 8 to tell which it is.
    read(s, &mut buf[..8]).await?;
    if buf.starts_with(b"PROXY ") {
        buf.truncate(8);
        while !buf.ends_with(b"\r\n") {
            if buf.len() >= V1_MAX {
                return Err(format!("version 1 header longer than {V1_MAX} bytes"));
            }
            let mut b = [0u8; 1];
            read(s, &mut b).await?;
            buf.push(b[0]);
        }
    } else if buf[..8] == V2_SIGNATURE[..8] {
        read(s, &mut buf[8..16]).await?;
        let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if 16 + len > V2_MAX {
            return Err(format!(
                "version 2 header of {} bytes; at most {V2_MAX} are taken",
                16 + len
            ));
        }
        buf.resize(16 + len, 0);
        read(s, &mut buf[16..]).await?;
    } else {
        return Err("no PROXY protocol header (the connection came from a trusted proxy address but started with other bytes)".into());
    }
    parse(&buf)
}

async fn read<S: AsyncRead + Unpin>(s: &mut S, buf: &mut [u8]) -> Result<(), String> {
    s.read_exact(buf).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "connection closed inside the PROXY header".into(),
        _ => format!("reading the PROXY header: {e}"),
    })
}

/// The client address of one complete header (the version told by its
/// first bytes).
pub fn parse(header: &[u8]) -> Result<Option<SocketAddr>, String> {
    let parsed: ppp::HeaderResult<'_> = if header.starts_with(V2_SIGNATURE) {
        ppp::v2::Header::try_from(header).into()
    } else {
        ppp::v1::Header::try_from(header).into()
    };
    match parsed {
        ppp::HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            ppp::v1::Addresses::Unknown => None,
            ppp::v1::Addresses::Tcp4(a) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            ppp::v1::Addresses::Tcp6(a) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
        }),
        ppp::HeaderResult::V2(Ok(h)) => {
            if h.command == ppp::v2::Command::Local {
                return Ok(None);
            }
            match h.addresses {
                ppp::v2::Addresses::IPv4(a) => {
                    Ok(Some(SocketAddr::from((a.source_address, a.source_port))))
                }
                ppp::v2::Addresses::IPv6(a) => {
                    Ok(Some(SocketAddr::from((a.source_address, a.source_port))))
                }
                ppp::v2::Addresses::Unspecified => Ok(None),
                ppp::v2::Addresses::Unix(_) => Err(
                    "version 2 header with a UNIX socket address; a TCP client address is needed"
                        .into(),
                ),
            }
        }
        ppp::HeaderResult::V1(Err(e)) => Err(format!("bad version 1 header: {e}")),
        ppp::HeaderResult::V2(Err(e)) => Err(format!("bad version 2 header: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_now(bytes: &[u8]) -> (Result<Option<SocketAddr>, String>, Vec<u8>) {
        let mut cur = futures_util::io::Cursor::new(bytes.to_vec());
        let r = futures_lite::future::block_on(read_header(&mut cur));
        let pos = cur.position() as usize;
        (r, bytes[pos..].to_vec())
    }

    fn v2(src: SocketAddr, dst: SocketAddr, command: ppp::v2::Command) -> Vec<u8> {
        ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | command,
            ppp::v2::Protocol::Stream,
            (src, dst),
        )
        .build()
        .unwrap()
    }

    #[test]
    fn v1_and_v2_headers_give_the_client_address_and_leave_its_bytes() {
        let (r, rest) = read_now(b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 389\r\n0\x84hello");
        assert_eq!(r, Ok(Some("198.51.100.7:40000".parse().unwrap())));
        assert_eq!(rest, b"0\x84hello");
        let (r, rest) = read_now(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 389\r\nx");
        assert_eq!(r, Ok(Some("[2001:db8::7]:40000".parse().unwrap())));
        assert_eq!(rest, b"x");
        let mut h = v2(
            "203.0.113.9:5000".parse().unwrap(),
            "10.0.0.1:636".parse().unwrap(),
            ppp::v2::Command::Proxy,
        );
        h.extend_from_slice(b"client bytes");
        let (r, rest) = read_now(&h);
        assert_eq!(r, Ok(Some("203.0.113.9:5000".parse().unwrap())));
        assert_eq!(rest, b"client bytes");
    }

    #[test]
    fn health_checks_carry_no_address() {
        assert_eq!(read_now(b"PROXY UNKNOWN\r\n").0, Ok(None));
        let h = v2(
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
            ppp::v2::Command::Local,
        );
        assert_eq!(read_now(&h).0, Ok(None));
    }

    #[test]
    fn anything_else_is_refused_with_its_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"\x30\x84\x00\x00\x00\x2c\x02\x01", "no PROXY protocol header"),
            (b"PROXY TCP4 1.2.3.4", "closed inside"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7\r\n", "longer than"),
            (b"PROXY TCP4 999.1.1.1 10.0.0.1 1 2\r\n", "bad version 1 header"),
            (b"PROXY TCP9 1.1.1.1 10.0.0.1 1 2\r\n", "bad version 1 header"),
            (b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff", "at most"),
            (b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x02ab", "bad version 2 header"),
        ];
        for (bytes, want) in cases {
            let (r, _) = read_now(bytes);
            let e = r.expect_err(&String::from_utf8_lossy(bytes));
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
    }

    #[test]
    fn trusted_proxies_parse_and_refuse_the_whole_internet() {
        let t = TrustedProxies::parse(&[
            "10.0.0.0/8".into(),
            "192.0.2.7".into(),
            "2001:db8::/32".into(),
        ])
        .unwrap();
        assert!(t.trusts("10.200.0.1".parse().unwrap()));
        assert!(t.trusts("192.0.2.7".parse().unwrap()));
        assert!(t.trusts("::ffff:10.0.0.9".parse().unwrap()));
        assert!(t.trusts("2001:db8:5::1".parse().unwrap()));
        assert!(!t.trusts("192.0.2.8".parse().unwrap()));
        assert!(!t.trusts("11.0.0.1".parse().unwrap()));
        for bad in ["0.0.0.0/0", "::/0"] {
            let (i, e) = TrustedProxies::parse(&["10.0.0.1".into(), bad.into()]).unwrap_err();
            assert_eq!(i, 1);
            assert!(e.contains("every address"), "{e}");
        }
        for (bad, why) in [
            ("10.0.0.0/33", "not a network"),
            ("lb.example", "not an address"),
            ("10.0.0.7/8", "host bits set; the network is 10.0.0.0/8"),
        ] {
            let (_, e) = TrustedProxies::parse(&[bad.into()]).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
