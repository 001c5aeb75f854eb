//! Issue 14, item 3: which address a container instance gets, with real dockerd and fluxd inside
//! namespaces the tests create. A `--net=host` container is served at the host IP and instance
//! port in either network mode; a port published only on 127.0.0.1 serves a lone host and is
//! `no address` (saying why) while another host shares the store; among several bindings the
//! one other hosts can reach wins.

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::Duration;

use support::backend::who_serves;
use support::docker::{Dockerd, NAME_PORT};
use support::etcd::Etcd;
use support::fluxd::{wait_until, Fluxd};
use support::netns::Netns;

fn short(id: &str) -> String {
    id[..12].to_string()
}

/// Fluxd with its data plane, this Docker, and the bridge address as host IP (how other hosts
/// would reach published ports); `extra` adds the store or the network mode.
fn fluxd_with_docker(ns: &Netns, docker: &Dockerd, host: &str, extra: &[&str]) -> Fluxd {
    let endpoint = docker.endpoint();
    let ip = docker.bridge_ip.to_string();
    let mut args = vec!["--docker", endpoint.as_str(), "--host-ip", ip.as_str()];
    args.extend_from_slice(extra);
    Fluxd::in_netns(&ns.name, host, &args)
}

/// Service `name` at `vip`, instance port 8080, selecting containers labelled `role=NAME`.
fn add_service(f: &Fluxd, name: &str, vip: &str) {
    let port = NAME_PORT.to_string();
    f.ok(&[
        "service",
        "add",
        name,
        "--address",
        vip,
        "--instance-port",
        &port,
    ]);
    let labels = format!("role={name}");
    f.ok(&["select", name, "all", "--labels", &labels]);
}

/// The one instance of `service` as `fluxctl query --json` shows it, once it is listed.
fn wait_instance(
    f: &Fluxd,
    service: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let found = wait_until(Duration::from_secs(10), || {
        last = f.json(&["query", "--service", service]);
        last.as_array().is_some_and(|a| a.len() == 1 && ok(&a[0]))
    });
    assert!(found.is_some(), "{service}: {last}\n{}", f.log());
    last[0].clone()
}

/// The host bindings Docker reports for `port/tcp`, in its order.
fn bindings(docker: &Dockerd, id: &str, port: u16) -> Vec<(String, u16)> {
    let v = docker.inspect(id);
    v["NetworkSettings"]["Ports"][format!("{port}/tcp")]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| !b["HostIp"].as_str().unwrap_or("").contains(':'))
        .map(|b| {
            (
                b["HostIp"].as_str().unwrap().to_string(),
                b["HostPort"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// `GET /` over HTTP/1.0 from the calling thread's namespace; the body.
fn http_body(addr: SocketAddrV4) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

#[test]
fn host_network_container_is_served_at_the_host_ip_in_both_modes() {
    let ns = Netns::new("ca-hostnet");
    let docker = Dockerd::new(&ns);
    docker.import_image("webimg:latest");
    // busybox httpd on the host's (the namespace's) own port 8080.
    let id = docker.run(&[
        "--init",
        "--net=host",
        "--name",
        "hostnet",
        "-l",
        "role=web",
        "webimg",
        "sh",
        "-c",
        "echo hostnet > /www/index.html && exec httpd -f -p 8080 -h /www",
    ]);
    let direct = SocketAddrV4::new(docker.bridge_ip, NAME_PORT);
    let up = ns.run(move || {
        wait_until(Duration::from_secs(10), || {
            http_body(direct).is_ok_and(|b| b == "hostnet\n")
        })
    });
    assert!(
        up.is_some(),
        "httpd not answering: {}",
        docker.ok(&["logs", &id])
    );
    let vip: SocketAddrV4 = "198.18.0.31:80".parse().unwrap();

    for mode in ["local", "global"] {
        let mut fluxd = fluxd_with_docker(&ns, &docker, "h1", &["--network-mode", mode]);
        add_service(&fluxd, "web", &vip.to_string());
        let i = wait_instance(&fluxd, "web", |i| i["state"] == "live");
        assert_eq!(i["name"], short(&id), "{mode}: {i}");
        assert_eq!(i["address"], direct.to_string(), "{mode}: {i}");
        assert!(i["container"].get("address_note").is_none(), "{mode}: {i}");
        fluxd.wait_routed("web");
        let body = ns.run(move || http_body(vip));
        assert_eq!(body.unwrap(), "hostnet\n", "{mode} through the VIP");
        // A clean stop removes this fluxd's rules before the next mode's starts.
        fluxd.stop();
    }
}

#[test]
fn single_host_uses_a_loopback_binding_and_prefers_one_others_can_reach() {
    let ns = Netns::new("ca-single");
    let docker = Dockerd::new(&ns);
    docker.import_image("webimg:latest");
    let fluxd = fluxd_with_docker(&ns, &docker, "h1", &[]);
    add_service(&fluxd, "loop", "198.18.0.41:80");
    add_service(&fluxd, "both", "198.18.0.42:80");

    // Published only on loopback: this host is the only one (embedded store), so it is used.
    let lo = docker.run_name_server(
        "webimg",
        "lo",
        &["-p", "127.0.0.1::8080", "-l", "role=loop"],
    );
    let hp = bindings(&docker, &lo, NAME_PORT)[0].1;
    let note = format!(
        "port 8080/tcp is published only on 127.0.0.1:{hp}; used because this is the only host"
    );
    let i = wait_instance(&fluxd, "loop", |i| i["state"] == "live");
    assert_eq!(i["address"], format!("127.0.0.1:{hp}"), "{i}");
    assert_eq!(i["container"]["address_note"], note, "{i}");
    fluxd.wait_routed("loop");
    let vip = "198.18.0.41:80".parse().unwrap();
    assert_eq!(ns.run(move || who_serves(vip)).unwrap(), "lo");
    // Said where people look: the table's last column, and `{{note}}`.
    let table = fluxd.ok(&["query", "--service", "loop"]);
    let mut lines = table.lines();
    assert!(lines.next().unwrap().ends_with("  NOTE"), "{table}");
    assert!(
        lines.next().unwrap().ends_with(&format!("  {note}")),
        "{table}"
    );
    assert_eq!(
        fluxd.ok(&[
            "query",
            "--service",
            "loop",
            "--format",
            "{{name}} {{note}}"
        ]),
        format!("{} {note}\n", short(&lo))
    );

    // A loopback binding and one on every address: the one other hosts can reach is used, at
    // the host IP, with nothing to explain. Docker 20.10 lists a container's bindings in the
    // reverse order of its `-p` flags, so both orders are run: one has loopback first.
    let both: Vec<String> = [
        ["-p", "127.0.0.1:40001:8080", "-p", "40002:8080"],
        ["-p", "40004:8080", "-p", "127.0.0.1:40003:8080"],
    ]
    .iter()
    .enumerate()
    .map(|(n, p)| {
        let mut args = p.to_vec();
        args.extend(["-l", "role=both"]);
        docker.run_name_server("webimg", &format!("both{n}"), &args)
    })
    .collect();
    let orders: Vec<Vec<(String, u16)>> = both
        .iter()
        .map(|id| bindings(&docker, id, NAME_PORT))
        .collect();
    assert!(
        orders.iter().any(|b| b[0].0 == "127.0.0.1"),
        "neither lists loopback first: {orders:?}"
    );
    let mut want: Vec<(String, String)> = both
        .iter()
        .zip(["40002", "40004"])
        .map(|(id, hp)| (short(id), format!("{}:{hp}", docker.bridge_ip)))
        .collect();
    want.sort();
    let mut last = serde_json::Value::Null;
    let listed = wait_until(Duration::from_secs(10), || {
        last = fluxd.json(&["query", "--service", "both", "--state", "live"]);
        let mut got: Vec<(String, String)> = last
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let addr = i["address"].as_str().unwrap_or("").to_string();
                (i["name"].as_str().unwrap().to_string(), addr)
            })
            .collect();
        got.sort();
        got == want
    });
    assert!(listed.is_some(), "want {want:?}: {last}");
    for i in last.as_array().unwrap() {
        assert!(i["container"].get("address_note").is_none(), "{i}");
    }
    fluxd.wait_routed("both");
    let vip = "198.18.0.42:80".parse().unwrap();
    let served = ns.run(move || {
        (0..20)
            .map(|_| who_serves(vip).unwrap())
            .collect::<Vec<_>>()
    });
    assert!(
        served.iter().any(|n| n == "both0") && served.iter().any(|n| n == "both1"),
        "{served:?}"
    );
    // No note among `both`'s instances: no NOTE column.
    assert!(!fluxd.ok(&["query", "--service", "both"]).contains("NOTE"));
}

#[test]
fn loopback_binding_is_no_address_while_another_host_shares_the_store() {
    let ns = Netns::new("ca-twohosts");
    let etcd = Etcd::start_in(&ns.name, Ipv4Addr::LOCALHOST);
    let store = format!("etcd://{}", etcd.endpoint.trim_start_matches("http://"));
    let docker = Dockerd::new(&ns);
    docker.import_image("webimg:latest");
    let a = fluxd_with_docker(&ns, &docker, "h1", &["--store", &store]);
    add_service(&a, "loop", "198.18.0.51:80");
    let lo = docker.run_name_server(
        "webimg",
        "lo",
        &["-p", "127.0.0.1::8080", "-l", "role=loop"],
    );
    let hp = bindings(&docker, &lo, NAME_PORT)[0].1;
    let vip: SocketAddrV4 = "198.18.0.51:80".parse().unwrap();
    let alone = |i: &serde_json::Value| {
        i["state"] == "live"
            && i["address"] == format!("127.0.0.1:{hp}")
            && i["container"]["address_note"]
                .as_str()
                .is_some_and(|n| n.ends_with("used because this is the only host"))
    };
    wait_instance(&a, "loop", alone);
    a.wait_routed("loop");
    assert_eq!(ns.run(move || who_serves(vip)).unwrap(), "lo");

    // A second host joins (no data plane: one set of rules per namespace; no Docker).
    let mut b = Fluxd::control_in_netns(&ns.name, "h2", &["--store", &store]);
    let note = format!(
        "port 8080/tcp is published only on 127.0.0.1:{hp}, which other hosts cannot reach"
    );
    let unreachable = |i: &serde_json::Value| {
        i["state"] == "no address"
            && i.get("address").is_none()
            && i["container"]["address_note"] == note
    };
    // Both hosts read it so from the store.
    wait_instance(&a, "loop", unreachable);
    wait_instance(&b, "loop", unreachable);
    let table = b.ok(&["query", "--service", "loop"]);
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .ends_with(&format!("  {note}")),
        "{table}"
    );
    assert!(
        ns.run(move || who_serves(vip)).is_err(),
        "no address, no traffic"
    );

    // It leaves cleanly: routable again at once, not at the next 30 s resync.
    b.stop();
    let i = wait_until(Duration::from_secs(5), || {
        a.json(&["query", "--service", "loop"])
            .as_array()
            .is_some_and(|v| v.len() == 1 && alone(&v[0]))
    });
    assert!(i.is_some(), "{}", a.ok(&["query"]));
    eprintln!(
        "routable again {:?} after the other host stopped",
        i.unwrap()
    );
    let served = ns.run(move || {
        wait_until(Duration::from_secs(3), || {
            who_serves(vip).is_ok_and(|n| n == "lo")
        })
    });
    assert!(served.is_some(), "{}", a.log());
}
