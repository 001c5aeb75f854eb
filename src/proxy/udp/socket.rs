//! The sockets of the UDP relay: the service socket clients send to (bound to the VIP:port,
//! reading each datagram's arrival interface and address), and one connected upstream socket
//! per flow (so an instance's replies, and its ICMP errors, map back to exactly one flow).

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use nix::sys::socket::{self, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Largest datagram the relay carries: the most an IPv4 UDP payload can be (65,535 bytes of
/// IP packet less 28 of headers), rounded up to 64 KiB for the buffer.
pub const MAX_DATAGRAM: usize = 64 * 1024;

/// Receive buffer asked for each service socket: bursts from many clients queue here while the
/// relay is busy; the kernel caps it at `net.core.rmem_max`.
const SERVICE_RCVBUF: usize = 4 << 20;

/// One datagram read from a service socket.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub len: usize,
    /// The client's address: the flow's key.
    pub client: SocketAddr,
    /// The interface it came in on (0 when the kernel did not say).
    pub ifindex: u32,
    /// The address it was sent to, as the kernel delivered it (after any NAT).
    pub local: Option<IpAddr>,
}

/// A socket bound to `vip` (the VIP:port, which the bpf path made a local address of this host
/// through its local route), asking for each datagram's arrival interface. `IP_FREEBIND` lets it
/// bind before the route is installed (the controller installs it right after the relay is
/// told), so no datagram arriving meanwhile finds no socket for long.
pub fn bind_service(vip: SocketAddr) -> io::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(vip);
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    match vip {
        SocketAddr::V4(_) => {
            socket::setsockopt(&s, sockopt::IpFreebind, &true)?;
            socket::setsockopt(&s, sockopt::Ipv4PacketInfo, &true)?;
        }
        SocketAddr::V6(_) => {
            s.set_only_v6(true)?;
            // IPV6_FREEBIND has no nix option; IPV6_TRANSPARENT needs more privilege.
            let on: libc::c_int = 1;
            // SAFETY: a valid fd, a c_int option value of the size given.
            let r = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_IPV6,
                    libc::IPV6_FREEBIND,
                    &on as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            socket::setsockopt(&s, sockopt::Ipv6RecvPacketInfo, &true)?;
        }
    }
    // Best effort: a smaller buffer only drops more of a burst.
    let _ = s.set_recv_buffer_size(SERVICE_RCVBUF);
    s.set_nonblocking(true)?;
    s.bind(&vip.into())?;
    UdpSocket::from_std(s.into())
}

/// A socket on a port the kernel picks, for the nat path's `REDIRECT --to-ports` (any local
/// address: the redirect rewrites the destination to the receiving interface's address, or
/// 127.0.0.1 for the host's own datagrams), asking for each datagram's arrival address.
pub fn bind_redirected(vip: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let any: SocketAddr = match vip {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(any),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    match any {
        SocketAddr::V4(_) => socket::setsockopt(&s, sockopt::Ipv4PacketInfo, &true)?,
        SocketAddr::V6(_) => {
            s.set_only_v6(true)?;
            socket::setsockopt(&s, sockopt::Ipv6RecvPacketInfo, &true)?
        }
    }
    let _ = s.set_recv_buffer_size(SERVICE_RCVBUF);
    s.set_nonblocking(true)?;
    s.bind(&any.into())?;
    Ok(s.into())
}

/// Sends a reply to `client` from `socket`, with `from` as its source address when given (the
/// nat path: the address the flow's datagrams arrived at, which conntrack maps back to the
/// VIP); without it, from the socket's own address.
pub fn send_reply(
    socket: &UdpSocket,
    payload: &[u8],
    client: SocketAddr,
    from: Option<IpAddr>,
) -> io::Result<usize> {
    let Some(from) = from else {
        return socket2::SockRef::from(socket).send_to(payload, &client.into());
    };
    let iov = [std::io::IoSlice::new(payload)];
    let to = SockaddrStorage::from(client);
    // Both kinds live here so that the one the match takes outlives the message borrowing it.
    let (v4, v6);
    let cmsg = match from {
        IpAddr::V4(ip) => {
            v4 = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(ip).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            socket::ControlMessage::Ipv4PacketInfo(&v4)
        }
        IpAddr::V6(ip) => {
            v6 = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: ip.octets(),
                },
                ipi6_ifindex: 0,
            };
            socket::ControlMessage::Ipv6PacketInfo(&v6)
        }
    };
    let sent = socket::sendmsg(
        socket.as_raw_fd(),
        &iov,
        &[cmsg],
        MsgFlags::MSG_DONTWAIT,
        Some(&to),
    );
    sent.map_err(io::Error::from)
}

/// Reads one datagram from a service socket into `buf`, with where it came from and in on. A
/// datagram longer than `buf` is cut (and flagged by the kernel), never an error.
pub async fn recv_arrival(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<Arrival> {
    let fd = socket.as_raw_fd();
    socket
        .async_io(Interest::READABLE, || {
            let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo);
            let mut iov = [IoSliceMut::new(buf)];
            let msg = socket::recvmsg::<SockaddrStorage>(
                fd,
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)?;
            let client = msg
                .address
                .as_ref()
                .and_then(storage_addr)
                .ok_or_else(|| io::Error::other("datagram without a source address"))?;
            let (mut ifindex, mut local) = (0, None);
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    match c {
                        ControlMessageOwned::Ipv4PacketInfo(i) => {
                            ifindex = i.ipi_ifindex as u32;
                            local =
                                Some(IpAddr::from(u32::from_be(i.ipi_addr.s_addr).to_be_bytes()));
                        }
                        ControlMessageOwned::Ipv6PacketInfo(i) => {
                            ifindex = i.ipi6_ifindex;
                            local = Some(IpAddr::from(i.ipi6_addr.s6_addr));
                        }
                        _ => {}
                    }
                }
            }
            Ok(Arrival {
                len: msg.bytes,
                client,
                ifindex,
                local,
            })
        })
        .await
}

fn storage_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(a) = s.as_sockaddr_in() {
        return Some(SocketAddr::from((a.ip(), a.port())));
    }
    s.as_sockaddr_in6()
        .map(|a| SocketAddr::from((a.ip(), a.port())))
}

/// A socket of its own for one flow, connected to the instance: the kernel then hands it only
/// that instance's datagrams, and reports an ICMP port unreachable as ECONNREFUSED on it.
pub fn connect_upstream(instance: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match instance {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = std::net::UdpSocket::bind(any)?;
    s.connect(instance)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn arrivals_name_client_interface_and_address() {
        let s = bind_service("127.0.0.1:0".parse().unwrap()).unwrap();
        let at = s.local_addr().unwrap();
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        c.send_to(b"ping", at).unwrap();
        let mut buf = vec![0; MAX_DATAGRAM];
        let a = recv_arrival(&s, &mut buf).await.unwrap();
        assert_eq!(&buf[..a.len], b"ping");
        assert_eq!(a.client, c.local_addr().unwrap());
        assert_eq!(a.local, Some("127.0.0.1".parse().unwrap()));
        assert!(a.ifindex > 0);
        // An empty datagram is a datagram, not an end of stream.
        c.send_to(b"", at).unwrap();
        assert_eq!(recv_arrival(&s, &mut buf).await.unwrap().len, 0);
    }

    #[tokio::test]
    async fn icmp_unreachable_surfaces_on_the_connected_socket() {
        // A port nobody listens on: bind then drop to learn a free one.
        let free = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let up = connect_upstream(free).unwrap();
        up.send(b"x").await.unwrap();
        let mut buf = [0u8; 16];
        let e = tokio::time::timeout(std::time::Duration::from_secs(5), up.recv(&mut buf))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }
}
