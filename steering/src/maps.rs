//! The program's four maps and the layout of their keys and values, shared by the program
//! (which reads them) and by userspace (which fills them and reads them back for drift).

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, OwnedFd};

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
        })
    }

    /// Puts `listener` at index 0 of the socket map.
    pub(crate) fn set_socket(&self, listener: std::os::fd::BorrowedFd) -> io::Result<()> {
        let fd = listener.as_fd();
        let value = (std::os::fd::AsRawFd::as_raw_fd(&fd) as u64).to_ne_bytes();
        sys::map_update(self.socket.as_fd(), &0u32.to_ne_bytes(), &value)
    }

    /// The cookie of the socket at index 0, if any.
    pub(crate) fn socket_cookie(&self) -> io::Result<Option<u64>> {
        let mut value = [0u8; 8];
        let found = sys::map_lookup(self.socket.as_fd(), &0u32.to_ne_bytes(), &mut value)?;
        Ok(found.then(|| u64::from_ne_bytes(value)))
    }
}
