//! The VIP:port a client connected to, read once per connection with one syscall: on the nat
//! path the accepted socket's address is the proxy port (REDIRECT rewrote it) and conntrack
//! keeps the original (`SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` for an IPv6 connection);
//! on the bpf path the program handed the connection over untouched, so the socket's own
//! address (`getsockname`) is the VIP.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use nix::sys::socket::{
    getsockopt,
    sockopt::{Ip6tOriginalDst, OriginalDst},
};
use tokio::net::TcpStream;

/// Where the proxy reads the VIP, fixed at start by the steering in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VipSource {
    /// nat path: `SO_ORIGINAL_DST`.
    OriginalDst,
    /// bpf path: the accepted socket's local address; when that is no service, the connection
    /// was redirected by nat rules a fluxd of the other mode left (a switch of mode across a
    /// restart, for the moment before they are removed), and `SO_ORIGINAL_DST` is asked too.
    LocalAddress,
}

/// The VIP of `client`; `is_service` tells whether an address is one.
pub(super) fn vip(
    client: &TcpStream,
    source: VipSource,
    is_service: impl Fn(&SocketAddr) -> bool,
) -> Option<SocketAddr> {
    match source {
        VipSource::OriginalDst => original_dst(client),
        VipSource::LocalAddress => match client.local_addr().ok()? {
            local if is_service(&local) => Some(local),
            _ => original_dst(client),
        },
    }
}

/// The VIP:port the client connected to, before the nat redirect. IPv4 is asked first, so an
/// IPv4 connection still costs one syscall; on an IPv6 socket that option fails and the IPv6
/// one is asked.
fn original_dst(client: &TcpStream) -> Option<SocketAddr> {
    if let Ok(sin) = getsockopt(client, OriginalDst) {
        return Some(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            u16::from_be(sin.sin_port),
        )));
    }
    let sin6 = getsockopt(client, Ip6tOriginalDst).ok()?;
    Some(SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::from(sin6.sin6_addr.s6_addr),
        u16::from_be(sin6.sin6_port),
        0,
        0,
    )))
}
