//! HAProxy's PROXY protocol header (v1 text, v2 binary), encoding only: what a `tcp` service
//! with `--proxy-protocol` writes to an instance before the client's first byte, so that the
//! instance sees the client's address instead of fluxd's. Spec:
//! <https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt>.
//!
//! Built on the stack (no allocation per connection). A client and a VIP of different families
//! (which the proxy does not produce, but the types allow) are both written as IPv6, the IPv4
//! one mapped (`::ffff:a.b.c.d`), as the spec allows no mixed header.

use std::io::Write;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::model::ProxyProtocol;

/// v2's fixed 12-byte signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2 with command PROXY (a relayed connection) or LOCAL (the proxy's own, e.g. a
/// health check: the receiver uses the real connection's addresses).
const V2_PROXY: u8 = 0x21;
const V2_LOCAL: u8 = 0x20;
/// Address family INET (INET6), transport STREAM.
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;
const V2_UNSPEC: u8 = 0x00;

/// The longest header written: v1 `PROXY TCP6` with two 39-character addresses and two
/// 5-digit ports is 104 bytes.
const MAX: usize = 104;

/// One encoded header.
#[derive(Clone, Copy)]
pub struct Header {
    buf: [u8; MAX],
    len: usize,
}

impl Header {
    /// For a relayed connection: `client` is where it came from, `vip` where it was sent.
    pub fn relayed(version: ProxyProtocol, client: SocketAddr, vip: SocketAddr) -> Header {
        let mut h = Header {
            buf: [0; MAX],
            len: 0,
        };
        let (from, to) = match (client.ip(), vip.ip()) {
            (IpAddr::V4(c), IpAddr::V4(v)) => (IpAddr::V4(c), IpAddr::V4(v)),
            (c, v) => (IpAddr::V6(as_v6(c)), IpAddr::V6(as_v6(v))),
        };
        match version {
            ProxyProtocol::V1 => {
                let family = if from.is_ipv4() { "TCP4" } else { "TCP6" };
                let mut w = &mut h.buf[..];
                // Cannot fail: MAX holds the longest TCP6 line.
                let _ = write!(
                    w,
                    "PROXY {family} {from} {to} {} {}\r\n",
                    client.port(),
                    vip.port()
                );
                h.len = MAX - w.len();
            }
            ProxyProtocol::V2 => {
                match (from, to) {
                    (IpAddr::V4(f), IpAddr::V4(t)) => {
                        h.v2_start(V2_PROXY, V2_TCP4, 12);
                        h.push(&f.octets());
                        h.push(&t.octets());
                    }
                    (f, t) => {
                        h.v2_start(V2_PROXY, V2_TCP6, 36);
                        h.push(&as_v6(f).octets());
                        h.push(&as_v6(t).octets());
                    }
                }
                h.push(&client.port().to_be_bytes());
                h.push(&vip.port().to_be_bytes());
            }
        }
        h
    }

    /// For fluxd's own connections (health checks): v2 LOCAL, v1 `PROXY UNKNOWN`; the
    /// receiver keeps the connection's own addresses.
    pub fn local(version: ProxyProtocol) -> Header {
        let mut h = Header {
            buf: [0; MAX],
            len: 0,
        };
        match version {
            ProxyProtocol::V1 => h.push(b"PROXY UNKNOWN\r\n"),
            ProxyProtocol::V2 => h.v2_start(V2_LOCAL, V2_UNSPEC, 0),
        }
        h
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn v2_start(&mut self, command: u8, family: u8, addresses_len: u16) {
        self.push(&V2_SIGNATURE);
        self.push(&[command, family]);
        self.push(&addresses_len.to_be_bytes());
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_is_the_spec_line() {
        let h = Header::relayed(ProxyProtocol::V1, a("192.0.2.7:51000"), a("198.18.0.1:80"));
        assert_eq!(h.bytes(), b"PROXY TCP4 192.0.2.7 198.18.0.1 51000 80\r\n");
        let longest = Header::relayed(
            ProxyProtocol::V1,
            a("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]:65535"),
            a("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]:65535"),
        );
        assert_eq!(longest.bytes().len(), MAX);
        assert!(longest.bytes().ends_with(b"65535 65535\r\n"));
        assert_eq!(
            Header::local(ProxyProtocol::V1).bytes(),
            b"PROXY UNKNOWN\r\n"
        );
    }

    #[test]
    fn v2_is_the_spec_layout() {
        let h = Header::relayed(ProxyProtocol::V2, a("192.0.2.7:51000"), a("198.18.0.1:80"));
        // The spec's example signature, then 0x21 0x11, length 12, addresses, ports.
        let mut want = vec![
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11,
            0x00, 0x0C, 192, 0, 2, 7, 198, 18, 0, 1,
        ];
        want.extend_from_slice(&51000u16.to_be_bytes());
        want.extend_from_slice(&80u16.to_be_bytes());
        assert_eq!(h.bytes(), &want[..]);
        let local = Header::local(ProxyProtocol::V2);
        assert_eq!(&local.bytes()[..12], &want[..12]);
        assert_eq!(&local.bytes()[12..], &[0x20, 0x00, 0x00, 0x00]);
    }

    #[test]
    fn v6_headers() {
        let h = Header::relayed(ProxyProtocol::V1, a("[fd00::7]:51000"), a("[fd00::1]:80"));
        assert_eq!(h.bytes(), b"PROXY TCP6 fd00::7 fd00::1 51000 80\r\n");
        let h = Header::relayed(ProxyProtocol::V2, a("[fd00::7]:51000"), a("[fd00::1]:80"));
        assert_eq!(&h.bytes()[12..16], &[0x21, 0x21, 0x00, 36]);
        assert_eq!(h.bytes().len(), 16 + 36);
        assert_eq!(h.bytes()[16 + 15], 7);
        assert_eq!(&h.bytes()[48..], &[0xC7, 0x38, 0x00, 80]);
        // Mixed families: both mapped into IPv6.
        let h = Header::relayed(ProxyProtocol::V1, a("192.0.2.7:1"), a("[fd00::1]:80"));
        assert_eq!(h.bytes(), b"PROXY TCP6 ::ffff:192.0.2.7 fd00::1 1 80\r\n");
    }
}
