//! Issue 8 acceptance: restarting fluxd under a client loop to a VIP refuses no connection when
//! the proxy socket comes from outside (systemd's socket activation, emulated here: the test
//! binds the socket in the namespace and passes it as fd 3 with LISTEN_FDS/LISTEN_PID).
//! fluxd runs with its default steering (bpf here: the pinned program keeps handing VIP
//! connections to the passed socket while no fluxd runs; nat where bpf cannot load).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use support::backend::{who_serves, Backend};
use support::client_loop::ClientLoop;
use support::fluxd::{wait_until, Fluxd};
use support::netns::Netns;

const VIP: &str = "198.18.0.10:80";
const PROXY_PORT: u16 = 7171;

fn vip() -> SocketAddrV4 {
    VIP.parse().unwrap()
}

/// A listening TCP socket on 0.0.0.0:7171 inside `ns`, as `ListenStream=0.0.0.0:7171` makes.
fn systemd_socket(ns: &Netns) -> std::net::TcpListener {
    ns.run(|| {
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], PROXY_PORT)).into())
            .unwrap();
        s.listen(4096).unwrap();
        s.into()
    })
}

/// One client connection: connect, read the backend's name, send a line, read its echo.
fn exchange(vip: SocketAddrV4, i: u64) -> std::io::Result<()> {
    let limit = Duration::from_secs(10);
    let s = TcpStream::connect_timeout(&vip.into(), limit)?;
    s.set_read_timeout(Some(limit))?;
    s.set_write_timeout(Some(limit))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut name = String::new();
    r.read_line(&mut name)?;
    if !name.ends_with('\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before the backend's name",
        ));
    }
    let line = format!("ping {i}\n");
    (&s).write_all(line.as_bytes())?;
    let mut echo = String::new();
    r.read_line(&mut echo)?;
    if echo != line {
        return Err(std::io::Error::other(format!("echo {echo:?}")));
    }
    Ok(())
}

/// Whether the VIP is routed to the proxy: a local route of the bpf steering, or a member of
/// the nat path's set.
fn vip_routed(ns: &Netns) -> bool {
    ns.flux_routes().contains("198.18.0.10")
        || ns
            .vip_set()
            .contains(r#"198.18.0.10,tcp:80 comment "flux:web""#)
}

fn wait_for_service(ns: &Netns, fluxd: &Fluxd) {
    let installed = wait_until(Duration::from_secs(5), || vip_routed(ns));
    assert!(installed.is_some(), "rule never installed: {}", fluxd.log());
    let ok = ns.run(|| wait_until(Duration::from_secs(5), || who_serves(vip()).is_ok()));
    assert!(ok.is_some(), "VIP never answered: {}", fluxd.log());
}

#[test]
fn restart_with_a_passed_socket_refuses_no_connection() {
    let ns = Netns::new("restart");
    let before = ns.nat_table();
    let socket = systemd_socket(&ns);
    let _b0 = Backend::start(&ns, "b0", 9000);
    let _b1 = Backend::start(&ns, "b1", 9001);
    let mut fluxd = Fluxd::unstarted_in_netns(&ns.name, "h1", &["--drain-seconds", "5"]);
    fluxd.start_with_socket(socket.as_raw_fd());
    assert!(
        fluxd
            .log()
            .contains("using the listening socket passed by systemd"),
        "{}",
        fluxd.log()
    );
    fluxd.ok(&["service", "add", "web", "--address", VIP]);
    for (name, port) in [("b0", 9000), ("b1", 9001)] {
        fluxd.ok(&[
            "instance",
            "add",
            "web",
            name,
            "--address",
            &format!("127.0.0.1:{port}"),
        ]);
    }
    wait_for_service(&ns, &fluxd);

    // At most 3,000 connections or 30 s, from four clients at once so that some connect while
    // no fluxd runs.
    let clients = ClientLoop::start(&ns, 4, 3000, Duration::from_secs(30), |i| {
        exchange(vip(), i)
    });
    clients
        .progressed(0, 100)
        .unwrap_or_else(|e| panic!("no traffic before the restarts: {e}"));
    for round in 1..=2 {
        fluxd.stop();
        // The socket outlives fluxd, and so do the rules that lead to it.
        assert!(
            vip_routed(&ns),
            "round {round}: rules removed on a stop with a passed socket: {}",
            fluxd.log()
        );
        assert!(fluxd.log().contains("keeping flux's rules installed"));
        let at_restart = clients.served();
        fluxd.start_with_socket(socket.as_raw_fd());
        if let Err(e) = clients.progressed(at_restart, 100) {
            panic!(
                "round {round}: no connection served after the restart: {e}\n{}",
                fluxd.log()
            );
        }
    }
    clients
        .finish()
        .assert_none_failed("connections across two restarts", &fluxd.log());

    // A real stop (fluxd.socket's ExecStopPost): fluxd, then `fluxd cleanup`.
    fluxd.stop();
    drop(socket);
    fluxd.cleanup();
    assert_eq!(before, ns.nat_table());
    assert_eq!(ns.vip_set(), "");
    assert_eq!(ns.flux_routes(), "");
}

#[test]
fn without_a_passed_socket_a_stop_removes_the_rules() {
    let ns = Netns::new("nosock");
    let before = ns.nat_table();
    let mut fluxd = Fluxd::dataplane(&ns.name, &[]);
    let _b0 = Backend::start(&ns, "b0", 9000);
    fluxd.ok(&["service", "add", "web", "--address", VIP]);
    fluxd.ok(&[
        "instance",
        "add",
        "web",
        "b0",
        "--address",
        "127.0.0.1:9000",
    ]);
    wait_for_service(&ns, &fluxd);
    assert!(!fluxd.log().contains("passed by systemd"));
    fluxd.stop();
    assert!(
        fluxd.log().contains("removed flux's rules"),
        "{}",
        fluxd.log()
    );
    assert_eq!(before, ns.nat_table());
    assert_eq!(ns.vip_set(), "");
    assert_eq!(ns.flux_routes(), "");
}

#[test]
fn a_passed_socket_of_the_wrong_kind_is_refused_with_one_line() {
    let ns = Netns::new("wrongsock");
    let before = ns.nat_table();
    let udp = ns.run(|| std::net::UdpSocket::bind(("0.0.0.0", PROXY_PORT)).unwrap());
    let other_port = ns.run(|| std::net::TcpListener::bind("0.0.0.0:7172").unwrap());
    for (fd, expected) in [
        (
            udp.as_raw_fd(),
            "LISTEN_FDS: fd 3 is a UDP socket on 0.0.0.0:7171",
        ),
        (
            other_port.as_raw_fd(),
            "LISTEN_FDS: fd 3 listens on 0.0.0.0:7172, not on the proxy port 7171",
        ),
    ] {
        let mut fluxd = Fluxd::unstarted_in_netns(&ns.name, "h1", &[]);
        fluxd.set_listen_fd(fd);
        fluxd.spawn();
        let status = fluxd
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("fluxd kept running with {expected:?}: {}", fluxd.log()));
        assert_eq!(status.code(), Some(1), "{}", fluxd.log());
        let log = fluxd.log();
        let line = log
            .lines()
            .find(|l| l.starts_with("fluxd: "))
            .unwrap_or_else(|| panic!("no error line: {log}"));
        assert!(line.contains(expected), "{line}");
        assert!(line.contains("ListenStream=0.0.0.0:7171"), "{line}");
        assert_eq!(
            before,
            ns.nat_table(),
            "rules installed by a fluxd that refused to start"
        );
    }
}

#[test]
fn a_stop_drains_established_connections() {
    let ns = Netns::new("drain");
    let socket = systemd_socket(&ns);
    let _b0 = Backend::start(&ns, "b0", 9000);
    let mut fluxd = Fluxd::unstarted_in_netns(&ns.name, "h1", &["--drain-seconds", "30"]);
    fluxd.start_with_socket(socket.as_raw_fd());
    fluxd.ok(&["service", "add", "web", "--address", VIP]);
    fluxd.ok(&[
        "instance",
        "add",
        "web",
        "b0",
        "--address",
        "127.0.0.1:9000",
    ]);
    wait_for_service(&ns, &fluxd);
    let conn = ns.run(|| {
        let s = TcpStream::connect(vip()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut name = String::new();
        r.read_line(&mut name).unwrap();
        assert_eq!(name, "b0\n");
        (s, r)
    });
    let pid = nix::unistd::Pid::from_raw(fluxd.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let draining = wait_until(Duration::from_secs(10), || {
        fluxd.log().contains("draining established connections")
    });
    assert!(draining.is_some(), "{}", fluxd.log());
    // The established connection still carries bytes both ways.
    let (s, mut r) = conn;
    (&s).write_all(b"still here\n").unwrap();
    let mut echo = String::new();
    r.read_line(&mut echo).unwrap();
    assert_eq!(echo, "still here\n");
    // Once it ends, fluxd exits without waiting out the 30 s.
    let closed = Instant::now();
    drop((s, r));
    let status = fluxd.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?} {:?} after the last connection closed: {}",
        closed.elapsed(),
        fluxd.log()
    );
    assert!(
        fluxd.log().contains("every connection ended"),
        "{}",
        fluxd.log()
    );
}
