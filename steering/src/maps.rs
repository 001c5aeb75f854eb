//! The program's maps (four for IPv4, three more for IPv6, the interfaces shared) and the layout
//! of their keys and values, shared by the program (which reads them) and by userspace (which
//! fills them and reads them back for drift).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::OwnedFd;

use crate::sys;

/// What the program does with a connection to a VIP:port in [`Maps::services`].
pub const ACTION_PROXY: u32 = 1;
/// Refuse it (a `tcp` service with no instance): the client gets a RST to its SYN.
pub const ACTION_REFUSE: u32 = 2;

/// Most entries of the services and addresses maps. Entries are allocated as they are added
/// (`BPF_F_NO_PREALLOC`), so this bounds memory, it does not reserve it.
const MAX_VIPS: u32 = 1 << 20;
/// Most allowed ingress interfaces (lo and the bridges).
const MAX_IFACES: u32 = 4096;

/// Keys of the services map: the address in network order, the port in host order (as the
/// program reads them from `struct bpf_sk_lookup`).
pub(crate) fn service_key(vip: SocketAddrV4) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&vip.ip().octets());
    k[4..].copy_from_slice(&u32::from(vip.port()).to_ne_bytes());
    k
}

pub(crate) fn parse_service_key(k: &[u8]) -> Option<SocketAddrV4> {
    let ip: [u8; 4] = k.get(..4)?.try_into().ok()?;
    let port = u32::from_ne_bytes(k.get(4..8)?.try_into().ok()?);
    Some(SocketAddrV4::new(
        Ipv4Addr::from(ip),
        u16::try_from(port).ok()?,
    ))
}

/// Keys of the IPv6 services map: the address's 16 bytes in network order, the port as a u32
/// in host order.
pub(crate) fn service_key6(vip: SocketAddrV6) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..16].copy_from_slice(&vip.ip().octets());
    k[16..].copy_from_slice(&u32::from(vip.port()).to_ne_bytes());
    k
}

pub(crate) fn parse_service_key6(k: &[u8]) -> Option<SocketAddrV6> {
    let ip: [u8; 16] = k.get(..16)?.try_into().ok()?;
    let port = u32::from_ne_bytes(k.get(16..20)?.try_into().ok()?);
    Some(SocketAddrV6::new(
        Ipv6Addr::from(ip),
        u16::try_from(port).ok()?,
        0,
        0,
    ))
}

/// Keys of the IPv6 addresses map (an LPM trie): prefix length in host order, then the
/// address.
pub(crate) fn address_key6(addr: Ipv6Addr, prefix_len: u8) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..4].copy_from_slice(&u32::from(prefix_len).to_ne_bytes());
    k[4..].copy_from_slice(&addr.octets());
    k
}

pub(crate) fn parse_address_key6(k: &[u8]) -> Option<(Ipv6Addr, u8)> {
    let len = u32::from_ne_bytes(k.get(..4)?.try_into().ok()?);
    let ip: [u8; 16] = k.get(4..20)?.try_into().ok()?;
    Some((Ipv6Addr::from(ip), u8::try_from(len).ok()?))
}

/// Keys of the addresses map (an LPM trie): prefix length in host order, then the address.
pub(crate) fn address_key(addr: Ipv4Addr, prefix_len: u8) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&u32::from(prefix_len).to_ne_bytes());
    k[4..].copy_from_slice(&addr.octets());
    k
}

pub(crate) fn parse_address_key(k: &[u8]) -> Option<(Ipv4Addr, u8)> {
    let len = u32::from_ne_bytes(k.get(..4)?.try_into().ok()?);
    let ip: [u8; 4] = k.get(4..8)?.try_into().ok()?;
    Some((Ipv4Addr::from(ip), u8::try_from(len).ok()?))
}

/// The maps of one loaded program.
pub struct Maps {
    /// `SOCKMAP` with one entry, index 0: fluxd's proxy listener (the first of its reuseport
    /// group, or the socket systemd passed). Holding the socket, not an fd: a socket that is
    /// closed leaves the map by itself.
    pub(crate) socket: OwnedFd,
    /// VIP:port -> [`ACTION_PROXY`] or [`ACTION_REFUSE`].
    pub(crate) services: OwnedFd,
    /// The VIP ranges and the /32 of every VIP outside them: what fluxd routes locally.
    pub(crate) addresses: OwnedFd,
    /// Interfaces whose connections may be steered: lo and the bridges.
    pub(crate) ifaces: OwnedFd,
    /// fluxd's IPv6-only proxy listener, for IPv6 VIPs (an IPv4 socket cannot take them).
    pub(crate) socket6: OwnedFd,
    /// IPv6 VIP:port -> action, as `services`.
    pub(crate) services6: OwnedFd,
    /// The /128 of every IPv6 VIP (there are no IPv6 VIP ranges).
    pub(crate) addresses6: OwnedFd,
}

impl Maps {
    pub(crate) fn create() -> io::Result<Maps> {
        Ok(Maps {
            socket: sys::map_create(sys::MAP_TYPE_SOCKMAP, 4, 8, 1, 0, "flux_socket")?,
            services: sys::map_create(
                sys::MAP_TYPE_HASH,
                8,
                4,
                MAX_VIPS,
                sys::F_NO_PREALLOC,
                "flux_services",
            )?,
            addresses: sys::map_create(
                sys::MAP_TYPE_LPM_TRIE,
                8,
                4,
                MAX_VIPS,
                sys::F_NO_PREALLOC,
                "flux_addresses",
            )?,
            ifaces: sys::map_create(sys::MAP_TYPE_HASH, 4, 4, MAX_IFACES, 0, "flux_ifaces")?,
            socket6: sys::map_create(sys::MAP_TYPE_SOCKMAP, 4, 8, 1, 0, "flux_socket6")?,
            services6: sys::map_create(
                sys::MAP_TYPE_HASH,
                20,
                4,
                MAX_VIPS,
                sys::F_NO_PREALLOC,
                "flux_services6",
            )?,
            addresses6: sys::map_create(
                sys::MAP_TYPE_LPM_TRIE,
                20,
                4,
                MAX_VIPS,
                sys::F_NO_PREALLOC,
                "flux_addrs6",
            )?,
        })
    }

    /// Puts `listener` at index 0 of `map` (`socket` or `socket6`).
    pub(crate) fn set_socket(
        map: std::os::fd::BorrowedFd,
        listener: std::os::fd::BorrowedFd,
    ) -> io::Result<()> {
        let value = (std::os::fd::AsRawFd::as_raw_fd(&listener) as u64).to_ne_bytes();
        sys::map_update(map, &0u32.to_ne_bytes(), &value)
    }

    /// The cookie of the socket at index 0 of `map`, if any.
    pub(crate) fn socket_cookie(map: std::os::fd::BorrowedFd) -> io::Result<Option<u64>> {
        let mut value = [0u8; 8];
        let found = sys::map_lookup(map, &0u32.to_ne_bytes(), &mut value)?;
        Ok(found.then(|| u64::from_ne_bytes(value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_keys_read_back_as_written() {
        let vip: SocketAddrV6 = "[fd00:18::a]:8080".parse().unwrap();
        let k = service_key6(vip);
        assert_eq!(&k[..2], &[0xfd, 0x00]);
        assert_eq!(parse_service_key6(&k), Some(vip));
        let a: Ipv6Addr = "fd00:18::a".parse().unwrap();
        assert_eq!(parse_address_key6(&address_key6(a, 128)), Some((a, 128)));
        assert_eq!(parse_service_key6(&k[..19]), None);
    }
}
