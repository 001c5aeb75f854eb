//! The steering against a real kernel, inside network namespaces these tests create (and a bpf
//! file system mounted on a temporary directory for the pins): host and bridge clients reach
//! the listener with the VIP as its local address, empty services and unknown ports are
//! refused at once, the LAN is not captured, damage (a deleted map entry, route or a detached
//! link) shows as drift and is repaired, a second load takes over from the first without a
//! gap, removal leaves nothing, and IPv6 VIPs go to the IPv6 listener likewise. Each test takes
//! well under a second.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use netfilter::CommandRunner;
use steering::{Action, Desired, Steering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace of this test, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!(
            "flux-st-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["ip", "-n", &self.0];
        a.extend_from_slice(args);
        run(&a)
    }

    fn exec(&self, args: &[&str]) -> String {
        let mut a = vec!["ip", "netns", "exec", &self.0];
        a.extend_from_slice(args);
        run(&a)
    }

    /// Runs `f` on a thread that joined the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A bpf file system mounted on a temporary directory for one test, unmounted on drop.
struct BpfFs {
    dir: tempfile_dir::Dir,
}

mod tempfile_dir {
    /// A fresh directory under the system's temp dir, removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
}

impl BpfFs {
    fn mount() -> BpfFs {
        let dir = std::env::temp_dir().join(format!(
            "flux-st-bpf-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        run(&["mount", "-t", "bpf", "bpf", dir.to_str().unwrap()]);
        BpfFs {
            dir: tempfile_dir::Dir(dir),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.0.join("flux")
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir.0).status();
    }
}

fn vip(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Two services on single VIPs (one served, one with no instance) and a range.
fn desired(ifaces: &[String]) -> Desired {
    let mut d = Desired::default();
    d.services
        .insert(vip("10.99.0.1:80"), ("web".into(), Action::Proxy));
    d.services
        .insert(vip("10.99.0.2:80"), ("idle".into(), Action::Refuse));
    d.services
        .insert(vip("198.18.3.4:443"), ("api".into(), Action::Proxy));
    d.ranges.insert(("198.18.0.0".parse().unwrap(), 16));
    d.ifaces = steering::interfaces::steered(ifaces).unwrap();
    d
}

/// Connects, and on success returns the local address of the accepted connection.
fn connect_via(listener: &TcpListener, to: SocketAddr) -> std::io::Result<SocketAddr> {
    let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    c.write_all(b"x")?;
    listener.set_nonblocking(false)?;
    let (mut s, _) = listener.accept()?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    s.local_addr()
}

/// Refused at once: the RST answers the first SYN, not a retransmission a second later.
fn refused(to: SocketAddr) -> bool {
    let t = std::time::Instant::now();
    let r = TcpStream::connect_timeout(&to, Duration::from_secs(2));
    eprintln!("{to}: {r:?} after {:?}", t.elapsed());
    matches!(r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
        && t.elapsed() < Duration::from_millis(500)
}

fn pin_dir(bpf: &Path, ns: &Netns) -> PathBuf {
    let ino = ns.exec(&["stat", "-L", "-c", "%i", "/proc/self/ns/net"]);
    bpf.join(format!("netns-{}", ino.trim()))
}

/// Deletes `key` from the map pinned at `map`, as someone with bpftool would.
fn delete_entry(map: &Path, key: &[u8]) {
    let hex: Vec<String> = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut args = vec![
        "bpftool",
        "map",
        "delete",
        "pinned",
        map.to_str().unwrap(),
        "key",
        "hex",
    ];
    args.extend(hex.iter().map(String::as_str));
    run(&args);
}

/// Deletes flux's local route to `prefix` in the namespace `ns`.
fn delete_route(ns: &str, prefix: &str) {
    run(&[
        "ip", "-n", ns, "route", "del", "local", prefix, "table", "local", "proto", "171",
    ]);
}

#[test]
fn host_clients_are_steered_empty_services_refused_drift_repaired() {
    let ns = Netns::new("host");
    let bpf = BpfFs::mount();
    let (dir, runner) = (bpf.path(), CommandRunner::in_netns(&ns.0));
    let pins = pin_dir(&dir, &ns);
    let name = ns.0.clone();
    ns.run(move || {
        let listener = TcpListener::bind("0.0.0.0:7171").unwrap();
        let s = Steering::load(&dir, runner).unwrap();
        s.set_socket(listener.as_fd()).unwrap();
        let d = desired(&[]);
        s.apply(&d).unwrap();
        assert!(s.drift(&d).unwrap().is_clean(), "{}", s.drift(&d).unwrap());
        // The VIP is the accepted socket's own address: getsockname() finds the service.
        assert_eq!(
            connect_via(&listener, vip("10.99.0.1:80")).unwrap(),
            vip("10.99.0.1:80")
        );
        assert_eq!(
            connect_via(&listener, vip("198.18.3.4:443")).unwrap(),
            vip("198.18.3.4:443")
        );
        assert!(
            refused(vip("10.99.0.2:80")),
            "a service with no instance is refused"
        );
        assert!(
            refused(vip("198.18.9.9:80")),
            "a range address of no service is refused"
        );
        assert!(
            refused(vip("10.99.0.1:22")),
            "another port of a VIP is refused"
        );

        // Kept in step one change at a time.
        let mut next = d.clone();
        next.services
            .insert(vip("10.99.0.2:80"), ("idle".into(), Action::Proxy));
        next.services.remove(&vip("198.18.3.4:443"));
        s.apply_change(&d, &next).unwrap();
        assert!(s.drift(&next).unwrap().is_clean());
        assert_eq!(
            connect_via(&listener, vip("10.99.0.2:80")).unwrap(),
            vip("10.99.0.2:80")
        );
        assert!(refused(vip("198.18.3.4:443")));

        // Someone damages it: a map entry (10.99.0.1, port 80 in host order), a route, the link.
        delete_entry(&pins.join("services"), &[10, 99, 0, 1, 80, 0, 0, 0]);
        delete_route(&name, "10.99.0.2/32");
        run(&[
            "bpftool",
            "link",
            "detach",
            "pinned",
            pins.join("link").to_str().unwrap(),
        ]);
        let drift = s.drift(&next).unwrap();
        assert_eq!(
            drift.lines,
            [
                "program is not attached (link detached)",
                "missing map entry: 10.99.0.1:80 proxy (web)",
                "missing route: local 10.99.0.2/32",
            ],
        );
        assert!(
            refused(vip("10.99.0.1:80")) || connect_via(&listener, vip("10.99.0.1:80")).is_err()
        );
        s.apply(&next).unwrap();
        assert!(
            s.drift(&next).unwrap().is_clean(),
            "{}",
            s.drift(&next).unwrap()
        );
        assert_eq!(
            connect_via(&listener, vip("10.99.0.1:80")).unwrap(),
            vip("10.99.0.1:80")
        );
        assert_eq!(
            connect_via(&listener, vip("10.99.0.2:80")).unwrap(),
            vip("10.99.0.2:80")
        );

        // Removal leaves no route and no pin, and VIPs are no longer local.
        s.remove().unwrap();
        assert_eq!(
            run(&["ip", "-n", &name, "route", "show", "table", "local", "proto", "171"]),
            ""
        );
        assert!(!pins.exists());
        assert!(TcpStream::connect_timeout(&vip("10.99.0.1:80"), Duration::from_secs(1)).is_err());
    });
}

/// A second fluxd (a restart) takes over from the first: its program is in place before the
/// first's is detached, so a client connecting all along is never refused; then the
/// leftovers of either are removed by `remove_leftovers` (a fluxd in nat mode, `fluxd cleanup`).
#[test]
fn a_restart_takes_over_without_a_gap_and_leftovers_go() {
    let ns = Netns::new("restart");
    let bpf = BpfFs::mount();
    let (dir, name) = (bpf.path(), ns.0.clone());
    ns.run(move || {
        // systemd's socket: it outlives both.
        let listener = TcpListener::bind("0.0.0.0:7171").unwrap();
        let d = desired(&[]);
        let first = Steering::load(&dir, CommandRunner::in_netns(&name)).unwrap();
        first.set_socket(listener.as_fd()).unwrap();
        first.apply(&d).unwrap();
        let first_link = first.installed().unwrap().link;
        drop(first); // fluxd exits, keeping its steering (pinned)
        assert_eq!(
            connect_via(&listener, vip("10.99.0.1:80")).unwrap(),
            vip("10.99.0.1:80")
        );
        let second = Steering::load(&dir, CommandRunner::in_netns(&name)).unwrap();
        second.set_socket(listener.as_fd()).unwrap();
        assert_eq!(
            connect_via(&listener, vip("10.99.0.1:80")).unwrap(),
            vip("10.99.0.1:80")
        );
        second.apply(&d).unwrap();
        let link = second.installed().unwrap().link;
        assert!(link.attached && link.pinned, "{link:?}");
        assert_ne!(
            link.link_id, first_link.link_id,
            "the pin now holds the new link"
        );
        assert_eq!(
            connect_via(&listener, vip("10.99.0.1:80")).unwrap(),
            vip("10.99.0.1:80")
        );
        drop(second);
        assert!(steering::remove_leftovers(&dir, &CommandRunner::in_netns(&name)).unwrap());
        assert!(!steering::remove_leftovers(&dir, &CommandRunner::in_netns(&name)).unwrap());
        assert!(TcpStream::connect_timeout(&vip("10.99.0.1:80"), Duration::from_secs(1)).is_err());
    });
}

/// Containers on a bridge are steered; a neighbour on the LAN (another namespace behind a veth
/// that is no bridge interface) sending to the same VIP through this host is not: its
/// connection never reaches the listener.
#[test]
fn bridge_clients_are_steered_the_lan_is_not() {
    let host = Netns::new("h");
    let container = Netns::new("c");
    let lan = Netns::new("lan");
    // A bridge with one "container" behind a veth.
    host.ip(&["link", "add", "br-test", "type", "bridge"]);
    host.ip(&["addr", "add", "198.19.1.1/24", "dev", "br-test"]);
    host.ip(&["link", "set", "br-test", "up"]);
    host.ip(&[
        "link",
        "add",
        "vc",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &container.0,
    ]);
    host.ip(&["link", "set", "vc", "master", "br-test", "up"]);
    container.ip(&["addr", "add", "198.19.1.2/24", "dev", "eth0"]);
    container.ip(&["link", "set", "eth0", "up"]);
    container.ip(&["route", "add", "default", "via", "198.19.1.1"]);
    // The LAN: a neighbour routing the VIPs through this host.
    host.ip(&[
        "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", &lan.0,
    ]);
    host.ip(&["addr", "add", "198.19.250.1/24", "dev", "eth1"]);
    host.ip(&["link", "set", "eth1", "up"]);
    lan.ip(&["addr", "add", "198.19.250.2/24", "dev", "eth0"]);
    lan.ip(&["link", "set", "eth0", "up"]);
    lan.ip(&["route", "add", "10.99.0.0/16", "via", "198.19.250.1"]);

    let bpf = BpfFs::mount();
    let (dir, runner) = (bpf.path(), CommandRunner::in_netns(&host.0));
    let (listener, s) = host.run(move || {
        let listener = TcpListener::bind("0.0.0.0:7171").unwrap();
        let s = Steering::load(&dir, runner).unwrap();
        s.set_socket(listener.as_fd()).unwrap();
        let d = desired(&["docker0".into(), "br-+".into()]);
        assert!(d.ifaces.values().any(|n| n == "br-test"), "{:?}", d.ifaces);
        assert!(!d.ifaces.values().any(|n| n == "eth1"));
        s.apply(&d).unwrap();
        (listener, s)
    });
    listener.set_nonblocking(true).unwrap();
    let from_container = container
        .run(|| TcpStream::connect_timeout(&vip("10.99.0.1:80"), Duration::from_secs(2)).map(drop));
    assert!(from_container.is_ok(), "{from_container:?}");
    let (accepted, peer) = listener.accept().unwrap();
    assert_eq!(accepted.local_addr().unwrap().to_string(), "10.99.0.1:80");
    assert_eq!(peer.ip().to_string(), "198.19.1.2");
    let from_lan = lan
        .run(|| TcpStream::connect_timeout(&vip("10.99.0.1:80"), Duration::from_secs(2)).map(drop));
    assert!(from_lan.is_err(), "a LAN connection to a VIP was accepted");
    assert!(
        listener.accept().is_err(),
        "a LAN connection reached the listener"
    );
    drop(s);
}

/// An IPv6-only listener on `[::]:7171`, as fluxd's beside its IPv4 one.
fn listener6() -> TcpListener {
    let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
    s.set_only_v6(true).unwrap();
    s.bind(&vip("[::]:7171").into()).unwrap();
    s.listen(128).unwrap();
    s.into()
}

/// IPv6 VIPs: handed to the IPv6 listener with the VIP as its local address (an IPv4 listener
/// beside it sees none of them), refused when the service has no instance, on another port,
/// or while no IPv6 listener is in its map; damage shows as drift and is repaired.
#[test]
fn ipv6_vips_go_to_the_ipv6_listener() {
    let ns = Netns::new("v6");
    ns.exec(&[
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=0",
        "net.ipv6.conf.lo.disable_ipv6=0",
    ]);
    let bpf = BpfFs::mount();
    let (dir, runner) = (bpf.path(), CommandRunner::in_netns(&ns.0));
    let pins = pin_dir(&dir, &ns);
    let name = ns.0.clone();
    ns.run(move || {
        let listener = TcpListener::bind("0.0.0.0:7171").unwrap();
        let l6 = listener6();
        let s = Steering::load(&dir, runner).unwrap();
        s.set_socket(listener.as_fd()).unwrap();
        let mut d = desired(&[]);
        d.services
            .insert(vip("[fd00:18::a]:80"), ("web6".into(), Action::Proxy));
        d.services
            .insert(vip("[fd00:18::b]:80"), ("idle6".into(), Action::Refuse));
        s.apply(&d).unwrap();
        // No IPv6 listener yet: said, and its VIPs refused rather than left to the usual lookup.
        assert_eq!(
            s.drift(&d).unwrap().lines,
            ["IPv6 socket map holds no listening socket"]
        );
        assert!(refused(vip("[fd00:18::a]:80")));
        s.set_socket6(l6.as_fd()).unwrap();
        assert!(s.drift(&d).unwrap().is_clean(), "{}", s.drift(&d).unwrap());
        let routes = run(&[
            "ip", "-n", &name, "-6", "route", "show", "table", "local", "proto", "171",
        ]);
        assert!(routes.contains("local fd00:18::a dev lo"), "{routes}");
        assert_eq!(
            connect_via(&l6, vip("[fd00:18::a]:80")).unwrap(),
            vip("[fd00:18::a]:80")
        );
        listener.set_nonblocking(true).unwrap();
        assert!(
            listener.accept().is_err(),
            "an IPv6 VIP reached the IPv4 listener"
        );
        assert_eq!(
            connect_via(&listener, vip("10.99.0.1:80")).unwrap(),
            vip("10.99.0.1:80")
        );
        assert!(refused(vip("[fd00:18::b]:80")), "no instance");
        assert!(refused(vip("[fd00:18::a]:22")), "another port of a VIP");

        // Someone deletes the entry ([fd00:18::a], port 80 in host order) and the route.
        let mut key = vec![0xfd, 0, 0, 0x18];
        key.extend([0; 11]);
        key.extend([0x0a, 80, 0, 0, 0]);
        delete_entry(&pins.join("services6"), &key);
        delete_route(&name, "fd00:18::b/128");
        assert_eq!(
            s.drift(&d).unwrap().lines,
            [
                "missing map entry: [fd00:18::a]:80 proxy (web6)",
                "missing route: local fd00:18::b/128",
            ]
        );
        s.apply(&d).unwrap();
        assert!(s.drift(&d).unwrap().is_clean(), "{}", s.drift(&d).unwrap());
        assert_eq!(
            connect_via(&l6, vip("[fd00:18::a]:80")).unwrap(),
            vip("[fd00:18::a]:80")
        );

        // A change at a time, then removal: no IPv6 route left.
        let mut next = d.clone();
        next.services.remove(&vip("[fd00:18::a]:80"));
        s.apply_change(&d, &next).unwrap();
        assert!(s.drift(&next).unwrap().is_clean());
        s.remove().unwrap();
        assert_eq!(
            run(&["ip", "-n", &name, "-6", "route", "show", "table", "local", "proto", "171"]),
            ""
        );
    });
}
