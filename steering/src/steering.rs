//! The handle the daemon holds: loads the program, keeps its maps, routes and pins level with
//! the desired state, reads them back, and takes everything away.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use netfilter::Runner;

use crate::desired::{Action, Desired};
use crate::drift::Drift;
use crate::error::Context;
use crate::installed::{Installed, LinkState};
use crate::maps::{self, Maps};
use crate::routes::{self, Prefix};
use crate::{pins, program, sys, Error};

/// Most entries read back from one map: more than any map can hold, so a read always ends.
const READ_LIMIT: usize = (1 << 20) + 1;

/// A loaded and attached steering program in this network namespace, with its maps.
///
/// [`Steering::load`] attaches the program at once, with empty maps: it then lets every
/// connection through to the usual lookup, so loading changes nothing until the first
/// [`Steering::apply`] fills the maps, pins the program in place of any earlier fluxd's and
/// adds the routes. Every method blocks on syscalls (and `ip` for routes): async callers use
/// `spawn_blocking`.
pub struct Steering {
    /// `<bpf-dir>/netns-<inode>`: where the link and maps are pinned.
    dir: PathBuf,
    maps: Maps,
    /// Kept to attach again if someone detaches the link.
    prog: OwnedFd,
    /// The program's attachment to this namespace; replaced if it is found detached.
    link: Mutex<Option<OwnedFd>>,
    /// The proxy's listening socket (a duplicate): put back into the socket map if it goes.
    socket: Mutex<Option<OwnedFd>>,
    /// Its IPv6 listener (a duplicate), likewise for the IPv6 socket map.
    socket6: Mutex<Option<OwnedFd>>,
    /// The namespace the link must be attached to.
    netns_ino: u64,
    /// Runs `ip` (routes) in this namespace.
    runner: Box<dyn Runner>,
}

impl Steering {
    /// Checks that `bpf_dir` is on a bpf file system, creates the maps, loads the program and
    /// attaches it to the calling thread's network namespace. Any failure (no CAP_BPF, a kernel
    /// older than 5.17, no bpf file system) is one error saying which step failed.
    pub fn load(bpf_dir: &Path, runner: impl Runner + 'static) -> Result<Steering, Error> {
        let dir = pins::namespace_dir(bpf_dir).map_err(|source| Error::Pins {
            path: "/proc/thread-self/ns/net".into(),
            source,
        })?;
        pins::create(&dir)?;
        let maps = Maps::create().bpf("creating the maps")?;
        let prog = sys::prog_load_sk_lookup(&program::instructions(&maps), "flux_steer")
            .bpf("loading the sk_lookup program")?;
        let netns =
            std::fs::File::open("/proc/thread-self/ns/net").map_err(|source| Error::Pins {
                path: "/proc/thread-self/ns/net".into(),
                source,
            })?;
        let link = sys::link_create_netns(prog.as_fd(), netns.as_fd())
            .bpf("attaching the program to this network namespace")?;
        Ok(Steering {
            dir,
            maps,
            prog,
            link: Mutex::new(Some(link)),
            socket: Mutex::new(None),
            socket6: Mutex::new(None),
            netns_ino: pins::own_netns_ino().unwrap_or(0),
            runner: Box::new(runner),
        })
    }

    /// Where the link and maps are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    /// Makes `listener` the socket VIP connections are handed to. With a reuseport group,
    /// any one of it: the kernel still spreads connections over the group.
    pub fn set_socket(&self, listener: BorrowedFd) -> Result<(), Error> {
        hold_socket(&self.socket, &self.maps.socket, listener)
    }

    /// Makes `listener` (IPv6-only: the kernel will not hand an IPv6 connection to an IPv4
    /// socket) the socket IPv6 VIP connections are handed to.
    pub fn set_socket6(&self, listener: BorrowedFd) -> Result<(), Error> {
        hold_socket(&self.socket6, &self.maps.socket6, listener)
    }

    /// Makes the kernel match `desired`, starting from what it holds now: repairs any drift.
    pub fn apply(&self, desired: &Desired) -> Result<(), Error> {
        let installed = self.read_maps()?;
        let wanted = desired.addresses();
        self.update_maps(
            &installed.services,
            &installed.addresses,
            &installed.ifaces,
            desired,
            &wanted,
        )?;
        if !installed.socket {
            Self::restore_socket(&self.socket, &self.maps.socket)?;
        }
        if !installed.socket6 {
            Self::restore_socket(&self.socket6, &self.maps.socket6)?;
        }
        self.attach_and_pin()?;
        let lines = routes::batch(&routes::read(self.runner.as_ref())?, &wanted);
        routes::apply(self.runner.as_ref(), &lines)
    }

    /// Sends only the difference between `previous` (applied last, successfully) and `next`:
    /// one map update for one service (and one route for a VIP outside the ranges). Reads
    /// nothing back: the drift check catches what changed behind flux's back.
    pub fn apply_change(&self, previous: &Desired, next: &Desired) -> Result<(), Error> {
        let services = previous
            .services
            .iter()
            .map(|(vip, (_, action))| (*vip, Some(*action)))
            .collect();
        let ifaces = previous.ifaces.keys().copied().collect();
        // Each address set is a walk over every service: made once.
        let (before, wanted) = (previous.addresses(), next.addresses());
        self.update_maps(&services, &before, &ifaces, next, &wanted)?;
        self.attach_and_pin()?;
        let lines = routes::batch(&before, &wanted);
        routes::apply(self.runner.as_ref(), &lines)
    }

    /// Brings the maps from `services`, `addresses` and `ifaces` to `desired` (whose addresses are `wanted`): additions and
    /// changes first, then removals.
    fn update_maps(
        &self,
        services: &BTreeMap<SocketAddr, Option<Action>>,
        addresses: &BTreeSet<Prefix>,
        ifaces: &BTreeSet<u32>,
        desired: &Desired,
        wanted: &BTreeSet<Prefix>,
    ) -> Result<(), Error> {
        let m = &self.maps;
        for (vip, (_, action)) in &desired.services {
            if services.get(vip) != Some(&Some(*action)) {
                let (map, key) = self.service_entry(*vip);
                sys::map_update(map, &key, &action.code().to_ne_bytes())
                    .bpf(format!("adding {vip} to the services map"))?;
            }
        }
        for (a, l) in wanted.difference(addresses) {
            let (map, key) = self.address_entry(*a, *l);
            sys::map_update(map, &key, &1u32.to_ne_bytes())
                .bpf(format!("adding {a}/{l} to the addresses map"))?;
        }
        for (index, name) in &desired.ifaces {
            if !ifaces.contains(index) {
                sys::map_update(m.ifaces.as_fd(), &index.to_ne_bytes(), &1u32.to_ne_bytes())
                    .bpf(format!("adding {name} to the interfaces map"))?;
            }
        }
        for vip in services.keys() {
            if !desired.services.contains_key(vip) {
                let (map, key) = self.service_entry(*vip);
                sys::map_delete(map, &key).bpf(format!("deleting {vip} from the services map"))?;
            }
        }
        for (a, l) in addresses.difference(wanted) {
            let (map, key) = self.address_entry(*a, *l);
            sys::map_delete(map, &key).bpf(format!("deleting {a}/{l} from the addresses map"))?;
        }
        for index in ifaces {
            if !desired.ifaces.contains_key(index) {
                sys::map_delete(m.ifaces.as_fd(), &index.to_ne_bytes()).bpf(format!(
                    "deleting interface {index} from the interfaces map"
                ))?;
            }
        }
        Ok(())
    }

    /// The services map of `vip`'s family and its key there.
    fn service_entry(&self, vip: SocketAddr) -> (BorrowedFd<'_>, Vec<u8>) {
        match vip {
            SocketAddr::V4(v) => (self.maps.services.as_fd(), maps::service_key(v).to_vec()),
            SocketAddr::V6(v) => (self.maps.services6.as_fd(), maps::service_key6(v).to_vec()),
        }
    }

    /// The addresses map of the prefix's family and its key there.
    fn address_entry(&self, addr: IpAddr, len: u8) -> (BorrowedFd<'_>, Vec<u8>) {
        match addr {
            IpAddr::V4(a) => (
                self.maps.addresses.as_fd(),
                maps::address_key(a, len).to_vec(),
            ),
            IpAddr::V6(a) => (
                self.maps.addresses6.as_fd(),
                maps::address_key6(a, len).to_vec(),
            ),
        }
    }

    /// Puts the listener `held` (if fluxd gave one) back into `map`.
    fn restore_socket(held: &Mutex<Option<OwnedFd>>, map: &OwnedFd) -> Result<(), Error> {
        let socket = held.lock().ok();
        if let Some(fd) = socket.as_ref().and_then(|s| s.as_ref()) {
            Maps::set_socket(map.as_fd(), fd.as_fd())
                .bpf("putting the listener back in the socket map")?;
        }
        Ok(())
    }

    /// Attaches again if the link was detached, then pins the maps and the link (replacing an
    /// earlier fluxd's pins, which detaches its program: this one is already in place).
    fn attach_and_pin(&self) -> Result<(), Error> {
        let mut link = self.link.lock().map_err(|_| Error::Pins {
            path: self.dir.clone(),
            source: std::io::Error::other("link lock poisoned"),
        })?;
        let attached = link
            .as_ref()
            .and_then(|l| sys::link_info(l.as_fd()).ok())
            .is_some_and(|i| u64::from(i.netns_ino) == self.netns_ino & 0xffff_ffff);
        if !attached {
            let netns =
                std::fs::File::open("/proc/thread-self/ns/net").map_err(|source| Error::Pins {
                    path: "/proc/thread-self/ns/net".into(),
                    source,
                })?;
            *link = Some(
                sys::link_create_netns(self.prog.as_fd(), netns.as_fd())
                    .bpf("attaching the program again")?,
            );
        }
        pins::create(&self.dir)?;
        for (name, fd) in self.map_pins() {
            pins::pin(fd, &self.dir.join(name), sys::map_id)?;
        }
        if let Some(l) = link.as_ref() {
            pins::pin(l.as_fd(), &self.dir.join("link"), link_id)?;
        }
        Ok(())
    }

    fn map_pins(&self) -> [(&'static str, BorrowedFd<'_>); 7] {
        [
            ("socket", self.maps.socket.as_fd()),
            ("services", self.maps.services.as_fd()),
            ("addresses", self.maps.addresses.as_fd()),
            ("ifaces", self.maps.ifaces.as_fd()),
            ("socket6", self.maps.socket6.as_fd()),
            ("services6", self.maps.services6.as_fd()),
            ("addresses6", self.maps.addresses6.as_fd()),
        ]
    }

    /// The maps' contents (routes and link left default).
    fn read_maps(&self) -> Result<Installed, Error> {
        let m = &self.maps;
        let mut installed = Installed::default();
        let v4 = read_services(m.services.as_fd(), 8, |k| {
            maps::parse_service_key(k).map(SocketAddr::V4)
        })?;
        let v6 = read_services(m.services6.as_fd(), 20, |k| {
            maps::parse_service_key6(k).map(SocketAddr::V6)
        })?;
        installed.services = v4.into_iter().chain(v6).collect();
        let v4 = read_addresses(m.addresses.as_fd(), 8, |k| {
            maps::parse_address_key(k).map(|(a, l)| (IpAddr::V4(a), l))
        })?;
        let v6 = read_addresses(m.addresses6.as_fd(), 20, |k| {
            maps::parse_address_key6(k).map(|(a, l)| (IpAddr::V6(a), l))
        })?;
        installed.addresses = v4.into_iter().chain(v6).collect();
        for key in
            sys::map_keys(m.ifaces.as_fd(), 4, READ_LIMIT).bpf("reading the interfaces map")?
        {
            if let Ok(k) = key.as_slice().try_into() {
                installed.ifaces.insert(u32::from_ne_bytes(k));
            }
        }
        installed.socket = Maps::socket_cookie(m.socket.as_fd())
            .bpf("reading the socket map")?
            .is_some();
        installed.socket6 = Maps::socket_cookie(m.socket6.as_fd())
            .bpf("reading the IPv6 socket map")?
            .is_some();
        Ok(installed)
    }

    /// Everything, as the kernel has it now.
    pub fn installed(&self) -> Result<Installed, Error> {
        let mut installed = self.read_maps()?;
        installed.routes = routes::read(self.runner.as_ref())?;
        let link = self.link.lock().ok();
        if let Some(l) = link.as_ref().and_then(|l| l.as_ref()) {
            let info = sys::link_info(l.as_fd()).bpf("reading the link")?;
            installed.link = LinkState {
                link_id: info.id,
                prog_id: info.prog_id,
                attached: u64::from(info.netns_ino) == self.netns_ino & 0xffff_ffff,
                pinned: pins::is_pinned(l.as_fd(), &self.dir.join("link"), link_id)
                    && self
                        .map_pins()
                        .iter()
                        .all(|(name, fd)| pins::is_pinned(*fd, &self.dir.join(name), sys::map_id)),
            };
        }
        Ok(installed)
    }

    /// Compares the kernel with `desired`.
    pub fn drift(&self, desired: &Desired) -> Result<Drift, Error> {
        Ok(Drift::between(desired, &self.installed()?))
    }

    /// Takes the steering away: the routes first (VIPs then follow their usual route, and no
    /// listener of the host can answer for them), then the pins, then the link itself.
    pub fn remove(&self) -> Result<(), Error> {
        let lines = routes::batch(&routes::read(self.runner.as_ref())?, &BTreeSet::new());
        routes::apply(self.runner.as_ref(), &lines)?;
        pins::remove(&self.dir)?;
        if let Ok(mut l) = self.link.lock() {
            l.take();
        }
        Ok(())
    }
}

/// Duplicates `listener` into `held` (to put it back if it leaves the map) and puts it in
/// `map`.
fn hold_socket(
    held: &Mutex<Option<OwnedFd>>,
    map: &OwnedFd,
    listener: BorrowedFd,
) -> Result<(), Error> {
    let dup = listener
        .try_clone_to_owned()
        .bpf("duplicating the listener")?;
    Maps::set_socket(map.as_fd(), dup.as_fd()).bpf("putting the listener in the socket map")?;
    if let Ok(mut s) = held.lock() {
        *s = Some(dup);
    }
    Ok(())
}

/// The prefixes in one addresses map, its keys parsed by `parse`.
fn read_addresses<T>(
    map: BorrowedFd,
    key_size: usize,
    parse: impl Fn(&[u8]) -> Option<T>,
) -> Result<Vec<T>, Error> {
    Ok(sys::map_keys(map, key_size, READ_LIMIT)
        .bpf("reading the addresses map")?
        .iter()
        .filter_map(|k| parse(k))
        .collect())
}

/// The entries of one services map, keys parsed by `parse`.
fn read_services(
    map: BorrowedFd,
    key_size: usize,
    parse: impl Fn(&[u8]) -> Option<SocketAddr>,
) -> Result<Vec<(SocketAddr, Option<Action>)>, Error> {
    let mut out = Vec::new();
    for key in sys::map_keys(map, key_size, READ_LIMIT).bpf("reading the services map")? {
        let Some(vip) = parse(&key) else {
            continue;
        };
        let mut value = [0u8; 4];
        if sys::map_lookup(map, &key, &mut value).bpf("reading the services map")? {
            out.push((vip, Action::from_code(u32::from_ne_bytes(value))));
        }
    }
    Ok(out)
}

fn link_id(fd: BorrowedFd) -> std::io::Result<u32> {
    sys::link_info(fd).map(|i| i.id)
}

/// Removes what a fluxd in BPF mode may have left in this namespace (after a stop with
/// `--keep-rules`, or a crash): flux's routes and the pins under `bpf_dir`, which detaches its
/// program. For `fluxd cleanup` and for a fluxd starting in nat mode. True when there was
/// anything to remove.
pub fn remove_leftovers(bpf_dir: &Path, runner: &dyn Runner) -> Result<bool, Error> {
    let installed = routes::read(runner)?;
    let lines = routes::batch(&installed, &BTreeSet::new());
    routes::apply(runner, &lines)?;
    let dir = pins::namespace_dir(bpf_dir).map_err(|source| Error::Pins {
        path: "/proc/thread-self/ns/net".into(),
        source,
    })?;
    let pinned = pins::remove(&dir)?;
    Ok(!installed.is_empty() || pinned)
}
