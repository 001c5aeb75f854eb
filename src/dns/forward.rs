//! `--dns-forward`: queries for names outside fluxd's domain relayed, as they came, to
//! resolvers (the host's, from /etc/resolv.conf, or the ones named), and their answer relayed
//! back unchanged. fluxd is then the only resolver a container needs.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::bail;
use hickory_proto::op::Header;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::answer::Transport;
use super::settings::Forward;

/// How long one resolver may take before the next is asked: stub resolvers retry after 5 s
/// (glibc's default), so an answer must come well within that.
const PER_RESOLVER: Duration = Duration::from_secs(2);

/// The resolvers queries for other zones go to.
#[derive(Debug, Clone)]
pub struct Forwarder {
    /// In order of preference, as resolv.conf lists them.
    upstreams: Vec<SocketAddr>,
}

impl Forwarder {
    /// None when forwarding is off. The host's resolvers are read once, at start; a resolver
    /// that is fluxd itself is left out (it would relay to itself forever).
    pub fn new(forward: &Forward, own: &[SocketAddr]) -> anyhow::Result<Option<Forwarder>> {
        let upstreams = match forward {
            Forward::Off => return Ok(None),
            Forward::To(list) => list.clone(),
            Forward::Host => {
                let text = std::fs::read_to_string("/etc/resolv.conf").map_err(|e| {
                    anyhow::anyhow!("dns_forward: cannot read /etc/resolv.conf: {e}")
                })?;
                let local = local_addresses();
                let servers = resolv_conf_servers(&text, own, &local);
                if servers.is_empty() {
                    bail!("dns_forward: /etc/resolv.conf names no resolver other than fluxd's own DNS listener");
                }
                servers
            }
        };
        Ok(Some(Forwarder { upstreams }))
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// The first answer any resolver gives to `query`, over the transport it came by (an
    /// answer too large for UDP comes back truncated, and the client asks again over TCP).
    pub async fn relay(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let id = Header::read(&mut BinDecoder::new(query)).ok()?.id();
        for upstream in &self.upstreams {
            let attempt = match transport {
                Transport::Udp => {
                    tokio::time::timeout(PER_RESOLVER, udp(*upstream, query, id)).await
                }
                Transport::Tcp => tokio::time::timeout(PER_RESOLVER, tcp(*upstream, query)).await,
            };
            match attempt {
                Ok(Ok(reply)) => return Some(reply),
                Ok(Err(e)) => tracing::debug!(%upstream, error = %e, "dns: resolver failed"),
                Err(_) => tracing::debug!(%upstream, "dns: resolver timed out"),
            }
        }
        None
    }
}

async fn udp(upstream: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let any: SocketAddr = match upstream.ip() {
        IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    // A socket of its own per query: a random source port, and replies from anyone but the
    // resolver are dropped by connect().
    let socket = UdpSocket::bind(any).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Anything but the answer to this query (a late answer to nothing) is skipped.
        if Header::read(&mut BinDecoder::new(&buf[..n])).is_ok_and(|h| h.id() == id) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn tcp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    let len = u16::try_from(query.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "query too long"))?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await?;
    let mut reply = vec![0u8; usize::from(len)];
    stream.read_exact(&mut reply).await?;
    Ok(reply)
}

/// The `nameserver` lines of a resolv.conf, port 53, less fluxd's own listeners: an address
/// it listens on, or, for a wildcard listener, loopback and this host's addresses on its port.
pub fn resolv_conf_servers(text: &str, own: &[SocketAddr], local: &[IpAddr]) -> Vec<SocketAddr> {
    let is_own = |a: &SocketAddr| {
        own.iter().any(|l| {
            l.port() == a.port()
                && (l.ip() == a.ip()
                    || (l.ip().is_unspecified()
                        && (a.ip().is_loopback() || local.contains(&a.ip()))))
        })
    };
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        // A scope suffix (fe80::1%eth0) is not for us to interpret: such a line is skipped.
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .filter(|a| !is_own(a))
        .collect()
}

/// This host's interface addresses (empty if they cannot be listed).
fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|i| {
            let a = i.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_less_our_own_listeners() {
        let text = "# comment\nsearch example\nnameserver 10.0.0.2\nnameserver 127.0.0.1\n\
                    nameserver  ::1 \nnameserver fe80::1%eth0\noptions ndots:2\nnameserver 192.0.2.7\n";
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let local: Vec<IpAddr> = vec!["192.0.2.7".parse().unwrap()];
        assert_eq!(
            resolv_conf_servers(text, &[], &local),
            [
                addr("10.0.0.2:53"),
                addr("127.0.0.1:53"),
                addr("[::1]:53"),
                addr("192.0.2.7:53")
            ]
        );
        // Listening on 127.0.0.1:53: that resolver is fluxd.
        assert_eq!(
            resolv_conf_servers(text, &[addr("127.0.0.1:53")], &local),
            [addr("10.0.0.2:53"), addr("[::1]:53"), addr("192.0.2.7:53")]
        );
        // On every address, port 53: loopback and this host's addresses are fluxd.
        assert_eq!(
            resolv_conf_servers(text, &[addr("0.0.0.0:53")], &local),
            [addr("10.0.0.2:53")]
        );
        // Another port: nothing is fluxd.
        assert_eq!(
            resolv_conf_servers(text, &[addr("0.0.0.0:5353")], &local).len(),
            4
        );
    }
}
