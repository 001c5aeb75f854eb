//! PROXY protocol for `tcp` services (issue 16): a real nginx listening with `proxy_protocol`
//! behind a flux VIP sees the client's own address and the VIP (v1, then v2 after
//! `fluxctl service set`), while fluxd's active health checks, which send a LOCAL header
//! first, keep the instance in the pool. The client connects from an address of its own, so
//! the one nginx reports can only have come from the header. Everything runs inside a
//! namespace the test creates.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::time::Duration;

use support::fluxd::{wait_until, Fluxd};
use support::netns::Netns;
use support::nginx::Nginx;

const VIP: &str = "198.18.0.20:80";
/// The client's own address in the namespace (TESTBED's test LAN range).
const CLIENT_IP: &str = "198.19.250.7";
const NGINX: &str = "127.0.0.1:9100";

/// nginx answering with what the PROXY header told it, and logging every request with it.
fn nginx_expecting_the_header(ns: &Netns) -> Nginx {
    let nginx = Nginx::start(ns);
    let d = nginx.dir.display();
    std::fs::write(
        nginx.dir.join("conf.d/pp.conf"),
        format!(
            r#"log_format pp '$proxy_protocol_addr $request_uri';
server {{
    listen {NGINX} proxy_protocol;
    access_log {d}/access.log pp;
    location = /healthz {{ return 200 "ok\n"; }}
    location / {{
        return 200 "client=$proxy_protocol_addr:$proxy_protocol_port vip=$proxy_protocol_server_addr:$proxy_protocol_server_port remote=$remote_addr\n";
    }}
}}
"#
        ),
    )
    .unwrap();
    let out = ns.exec(&["sh", "-c", &nginx.reload_cmd()]);
    assert!(out.status.success(), "reload: {out:?}");
    let addr: SocketAddrV4 = NGINX.parse().unwrap();
    let up = wait_until(Duration::from_secs(10), || {
        ns.run(move || TcpStream::connect(addr).is_ok())
    });
    assert!(up.is_some(), "nginx not listening: {}", nginx.error_log());
    nginx
}

/// `GET /` from CLIENT_IP to `to`: the client's port and the body.
fn get_from_client(ns: &Netns, to: SocketAddrV4) -> (u16, String) {
    ns.run(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let from: SocketAddrV4 = format!("{CLIENT_IP}:0").parse().unwrap();
        s.bind(&from.into()).unwrap();
        s.connect_timeout(&to.into(), Duration::from_secs(5))
            .unwrap();
        let mut s: TcpStream = s.into();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let port = s.local_addr().unwrap().port();
        s.write_all(b"GET / HTTP/1.0\r\nHost: pp\r\n\r\n").unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        (port, answer)
    })
}

fn check_state(fluxd: &Fluxd) -> String {
    let q = fluxd.json(&["query", "--service", "pp"]);
    q[0]["health"]["check"]["state"]
        .as_str()
        .unwrap_or("none")
        .to_string()
}

#[test]
fn nginx_behind_a_vip_sees_the_client_address_with_v1_and_v2() {
    let ns = Netns::new("pp");
    ns.ip(&["addr", "add", &format!("{CLIENT_IP}/32"), "dev", "lo"]);
    let nginx = nginx_expecting_the_header(&ns);
    let fluxd = Fluxd::dataplane(&ns.name, &[]);
    let vip: SocketAddrV4 = VIP.parse().unwrap();

    // nginx really insists on the header: a plain request gets no answer.
    let (_, plain) = get_from_client(&ns, NGINX.parse().unwrap());
    assert!(!plain.contains("200 OK"), "{plain}");

    fluxd.ok(&[
        "service",
        "add",
        "pp",
        "--address",
        VIP,
        "--proxy-protocol",
        "v1",
        "--health",
        "http:/healthz",
        "--health-interval",
        "200ms",
        "--health-timeout",
        "150ms",
    ]);
    fluxd.add_instance("pp", "nginx", NGINX);
    fluxd.wait_routed("pp");

    for version in ["v1", "v2"] {
        if version == "v2" {
            fluxd.ok(&["service", "set", "pp", "--proxy-protocol", "v2"]);
            let applied = wait_until(Duration::from_secs(10), || {
                fluxd.debug()["services"][0]["settings"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("proxy-protocol v2"))
            });
            assert!(applied.is_some(), "{}", fluxd.debug());
        }
        // The checks (with their LOCAL header) pass, and keep passing.
        let passing = wait_until(Duration::from_secs(10), || check_state(&fluxd) == "passing");
        assert!(
            passing.is_some(),
            "{version}: check not passing: {}\n{}",
            fluxd.ok(&["query", "--service", "pp"]),
            nginx.error_log()
        );
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(check_state(&fluxd), "passing", "{version}");

        let (port, answer) = get_from_client(&ns, vip);
        assert!(answer.starts_with("HTTP/1.1 200"), "{version}: {answer}");
        let want = format!("client={CLIENT_IP}:{port} vip={VIP} remote=127.0.0.1");
        assert!(answer.contains(&want), "{version}: want {want} in {answer}");
        eprintln!(
            "{version}: nginx answered {}",
            answer.lines().last().unwrap_or("")
        );
    }

    // Health checks arrived with a header nginx accepted (LOCAL: no client address).
    let log = std::fs::read_to_string(nginx.dir.join("access.log")).unwrap_or_default();
    assert!(log.lines().any(|l| l.ends_with(" /healthz")), "{log}");
    assert!(log.lines().any(|l| l.starts_with(CLIENT_IP)), "{log}");
    // The only connection nginx refused is the plain request above.
    let errors = nginx.error_log();
    assert_eq!(errors.matches("broken header").count(), 1, "{errors}");

    let info = fluxd.ok(&["info", "pp"]);
    assert!(info.contains("proxy-protocol v2"), "{info}");
    let list = fluxd.ok(&["list", "-v"]);
    assert!(list.contains("  proxy-protocol v2"), "{list}");
    let debug = std::process::Command::new(env!("CARGO_BIN_EXE_fluxd"))
        .args(["debug", "--api"])
        .arg(format!("unix://{}", fluxd.socket.display()))
        .output()
        .unwrap();
    let debug = String::from_utf8_lossy(&debug.stdout);
    assert!(
        debug.contains(&format!("pp {VIP}: proxy-protocol v2 (destination {VIP})")),
        "{debug}"
    );

    // Refused where no header can be written, with a one-line error naming the field.
    for args in [&["--protocol", "http"][..], &["--forward", "kernel"][..]] {
        let mut a = vec!["service", "set", "pp"];
        a.extend_from_slice(args);
        let out = fluxd.ctl(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.starts_with("fluxctl: proxy_protocol: "), "{err}");
    }
}
