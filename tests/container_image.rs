//! Issue 14, item 6: flux's container images (packaging/docker), built and run for real. No
//! registry is reachable, so the base image is a Debian bookworm made with debootstrap and
//! imported into a dockerd that runs inside a namespace the test creates; the images are built
//! there by packaging/docker/build (Docker's classic builder) from this test build's fluxd and
//! fluxctl, and run there with that namespace as their "host" network, exactly as the README's
//! "Running fluxd as a container" runs them on a real host.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::backend::who_serves;
use support::docker::{Dockerd, NAME_PORT};
use support::fluxd::{fluxctl, wait_until, Fluxd};
use support::netns::Netns;

const VIP: &str = "198.18.0.10:80";
const BASE: &str = "flux-base:bookworm";
const IMAGE: &str = "flux-test";

fn vip() -> SocketAddrV4 {
    VIP.parse().unwrap()
}

/// A namespace with its dockerd, the debootstrapped base imported and the busybox image
/// `webimg` for the instances. Drop order: Docker, then the namespace.
struct Host {
    docker: Dockerd,
    ns: Netns,
    /// Scratch files bind-mounted into containers (the API socket directory, /etc/group).
    tmp: tempfile::TempDir,
}

fn host(tag: &str) -> Host {
    let tar = support::base_image::rootfs_tar();
    let ns = Netns::new(tag);
    let docker = Dockerd::new(&ns);
    let started = Instant::now();
    docker.ok(&["import", &tar.display().to_string(), BASE]);
    eprintln!("imported {BASE} in {:?}", started.elapsed());
    docker.import_image("webimg:latest");
    let tmp = tempfile::tempdir().unwrap();
    Host { docker, ns, tmp }
}

/// `packaging/docker/build --only WHICH` against the namespace's dockerd, from the base above
/// and the binaries of this test build.
fn build(h: &Host, which: &str) {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_fluxd")).parent().unwrap();
    assert_eq!(
        Path::new(env!("CARGO_BIN_EXE_fluxctl")).parent().unwrap(),
        bin_dir
    );
    let started = Instant::now();
    let out = Command::new("timeout")
        .arg("600")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/docker/build"))
        .arg("--bin-dir")
        .arg(bin_dir)
        .args(["--base", BASE, "--image", IMAGE, "--only", which])
        .env("DOCKER", "/usr/bin/docker")
        .env("DOCKER_HOST", h.docker.endpoint())
        .env("DOCKER_CONFIG", h.docker.dir.join("cli"))
        // The classic builder: it builds from a local image without asking a registry.
        .env("DOCKER_BUILDKIT", "0")
        .env_remove("DOCKER_CONTEXT")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "build --only {which}: {text}");
    // The local base already has every package: the build must not have tried the network.
    assert!(text.contains("nothing to install"), "{text}");
    eprintln!("built the {which} image in {:?}", started.elapsed());
}

/// The fluxd container's API socket as the host sees it, through the bind mount.
fn socket(h: &Host) -> PathBuf {
    h.tmp.path().join("run-fluxd/fluxd.sock")
}

fn ctl(h: &Host, args: &[&str]) -> String {
    let out = fluxctl(&socket(h), args);
    assert!(
        out.status.success(),
        "fluxctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `docker run -d --name fluxd` as README's "Running fluxd as a container" has it: host network
/// (here, the namespace's), CAP_NET_ADMIN, the Docker socket, a named volume for the store, the
/// API socket directory on the host and the host's groups (here a file whose `flux` is 4242),
/// a setting as a FLUXD_* variable; `cmd` after the image. Waits until the API answers.
fn run_fluxd(h: &Host, cmd: &[&str]) -> String {
    let run_dir = h.tmp.path().join("run-fluxd");
    std::fs::create_dir_all(&run_dir).unwrap();
    let group = h.tmp.path().join("group");
    std::fs::write(&group, "root:x:0:\nflux:x:4242:\n").unwrap();
    let mounts = [
        format!("{}:/var/run/docker.sock", h.docker.socket.display()),
        format!("{}:/run/fluxd", run_dir.display()),
        format!("{}:/etc/group:ro", group.display()),
        "fluxd-state:/var/lib/fluxd".to_string(),
    ];
    let host_ip = format!("FLUXD_HOST_IP={}", h.docker.bridge_ip);
    let mut args = vec![
        "run",
        "-d",
        "--name",
        "fluxd",
        "--network",
        "host",
        "--cap-add",
        "NET_ADMIN",
        "-e",
        &host_ip,
    ];
    for m in &mounts {
        args.extend(["-v", m]);
    }
    args.push(IMAGE);
    args.extend_from_slice(cmd);
    let id = h.docker.ok(&args);
    let ready = wait_until(Duration::from_secs(20), || {
        fluxctl(&socket(h), &["list"]).status.success()
    });
    assert!(
        ready.is_some(),
        "fluxd container not answering: {}",
        h.docker.ok(&["logs", &id])
    );
    id
}

fn logs(h: &Host, id: &str) -> String {
    let out = h.docker.docker(&["logs", id]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What a client in the namespace gets from the VIP: the serving container's name, or the error.
fn ask_vip(h: &Host) -> Result<String, String> {
    h.ns.run(|| who_serves(vip()).map_err(|e| e.to_string()))
}

/// Whether flux's steering is in the namespace on either path: nat rules or set members, or
/// the bpf path's local routes (the image's fluxd, with CAP_NET_ADMIN but no CAP_BPF nor bpf
/// file system, runs nat through `--steering auto`'s fallback).
fn rules_installed(h: &Host) -> bool {
    h.ns.nat_table().contains("FLUX-SERVICES")
        || h.ns.vip_set().contains("flux:")
        || !h.ns.flux_routes().is_empty()
}

#[test]
fn fluxd_image_routes_a_vip_to_a_container_and_cleans_up() {
    let h = host("img-fluxd");
    build(&h, "fluxd");

    // Without CAP_NET_ADMIN fluxd cannot program the kernel and says so: the capability the
    // README asks for is needed, and (below) enough.
    let out = h
        .docker
        .docker(&["run", "--rm", "--network", "host", IMAGE]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Operation not permitted"),
        "{}: {err}",
        out.status
    );
    assert!(!rules_installed(&h), "{}", h.ns.nat_table());

    // The image's default command (`run`), driven from the host through the mounted socket.
    let c = run_fluxd(&h, &[]);
    let meta = std::fs::metadata(socket(&h)).unwrap();
    assert_eq!(
        (meta.gid(), meta.permissions().mode() & 0o777),
        (4242, 0o660),
        "the API socket belongs to the host's group flux through the mounted /etc/group"
    );
    ctl(
        &h,
        &[
            "service",
            "add",
            "web",
            "--address",
            VIP,
            "--instance-port",
            &NAME_PORT.to_string(),
        ],
    );
    ctl(&h, &["select", "web", "all", "--image", "webimg"]);
    let web = h.docker.run_name_server("webimg", "web0", &["-p", "8080"]);
    let enrolled = wait_until(Duration::from_secs(10), || {
        ctl(&h, &["query", "--service", "web", "--quiet"]).trim() == &web[..12]
    });
    assert!(enrolled.is_some(), "web0 not enrolled: {}", logs(&h, &c));
    let served = wait_until(Duration::from_secs(5), || {
        ask_vip(&h).is_ok_and(|n| n == "web0")
    });
    assert!(served.is_some(), "VIP: {:?}\n{}", ask_vip(&h), logs(&h, &c));

    // `docker stop`: fluxd gets SIGTERM, exits 0 and removes its rules and set.
    h.docker.ok(&["stop", "fluxd"]);
    let state = h.docker.inspect(&c)["State"].clone();
    assert_eq!(state["ExitCode"], 0, "{state}\n{}", logs(&h, &c));
    assert!(
        !rules_installed(&h),
        "rules left after docker stop:\n{}\n{}",
        h.ns.nat_table(),
        h.ns.vip_set()
    );
    h.docker.rm(&c);

    // `run --keep-rules` on the same volume: the service is still in the store, and routed.
    let c = run_fluxd(&h, &["run", "--keep-rules"]);
    assert!(
        ctl(&h, &["list"]).contains("web"),
        "store lost with the container"
    );
    let served = wait_until(Duration::from_secs(10), || {
        ask_vip(&h).is_ok_and(|n| n == "web0")
    });
    assert!(served.is_some(), "{:?}\n{}", ask_vip(&h), logs(&h, &c));

    // `docker restart` under a client loop: what clients see while fluxd is away (README).
    let probe = restart_probe(&h);
    eprintln!("docker restart with --keep-rules: {probe}");
    assert!(
        probe.back_after < Duration::from_secs(10) && probe.slowest < Duration::from_secs(3),
        "{probe}\n{}",
        logs(&h, &c)
    );

    // `docker stop` with --keep-rules: the rules stay, a VIP connection is refused at once
    // (nobody listens on the proxy port), and `fluxd cleanup` from the image removes them.
    h.docker.ok(&["stop", "fluxd"]);
    assert!(rules_installed(&h), "--keep-rules: rules gone after stop");
    let err = ask_vip(&h).unwrap_err();
    assert!(err.contains("refused"), "{err}");
    h.docker.ok(&[
        "run",
        "--rm",
        "--network",
        "host",
        "--cap-add",
        "NET_ADMIN",
        IMAGE,
        "cleanup",
    ]);
    assert!(
        !rules_installed(&h),
        "after fluxd cleanup:\n{}\n{}",
        h.ns.nat_table(),
        h.ns.vip_set()
    );
}

/// What a connecting client saw around a `docker restart fluxd`.
struct Probe {
    /// Attempts that failed, by error, and the span from the first failure to the last.
    failures: std::collections::BTreeMap<String, usize>,
    failing_for: Duration,
    /// The slowest single attempt (a connection made while no rule existed waits for a SYN
    /// retransmit), and the time from the restart command to the first success after the
    /// last failure.
    slowest: Duration,
    back_after: Duration,
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "failed {:?} over {:?}; slowest attempt {:?}; routed again {:?} after the command",
            self.failures, self.failing_for, self.slowest, self.back_after
        )
    }
}

fn restart_probe(h: &Host) -> Probe {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let client = h.ns.spawn(move || {
        let mut seen = Vec::new();
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            let t = Instant::now();
            let r = who_serves(vip()).map_err(|e| e.kind().to_string());
            seen.push((t, t.elapsed(), r));
            std::thread::sleep(Duration::from_millis(10));
        }
        seen
    });
    std::thread::sleep(Duration::from_millis(500));
    let restart = Instant::now();
    h.docker.ok(&["restart", "fluxd"]);
    // Routed again, then a little more so that a late failure would show.
    let deadline = Instant::now() + Duration::from_secs(15);
    while ask_vip(h).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = client.join().unwrap();
    let mut failures = std::collections::BTreeMap::new();
    let mut first_fail: Option<Instant> = None;
    let mut last_fail = restart;
    for (t, _, r) in &seen {
        if let Err(e) = r {
            *failures.entry(e.clone()).or_insert(0) += 1;
            first_fail.get_or_insert(*t);
            last_fail = *t;
        }
    }
    // Routed again: the first success that began after the last failure.
    let back = seen
        .iter()
        .find(|(t, _, r)| *t > last_fail && r.is_ok())
        .map_or(Duration::MAX, |(t, took, _)| {
            (*t + *took).duration_since(restart)
        });
    Probe {
        failing_for: first_fail.map_or(Duration::ZERO, |f| last_fail.duration_since(f)),
        failures,
        slowest: seen.iter().map(|(_, took, _)| *took).max().unwrap(),
        back_after: back,
    }
}

/// One `GET /` on a fresh connection: the status and the body.
fn http_get(addr: SocketAddrV4) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: example.com\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string();
    Ok((status, body))
}

#[test]
fn edge_image_serves_a_service_through_nginx() {
    let h = host("img-edge");
    build(&h, "edge");
    // The host's fluxd (the binary here; the fluxd image is the other test's), its API socket
    // directory mounted read-only into the edge container as /run/fluxd.
    let fluxd = Fluxd::dataplane(
        &h.ns.name,
        &[
            "--docker",
            &h.docker.endpoint(),
            "--host-ip",
            &h.docker.bridge_ip.to_string(),
        ],
    );
    fluxd.ok(&["service", "add", "site", "--address", VIP]);
    fluxd.ok(&[
        "select",
        "site",
        "all",
        "--image",
        "webimg",
        "--instance-port",
        "8080",
    ]);
    // Two busybox HTTP servers answering their name.
    let serve = |name: &str| {
        let script = format!("echo {name} >/www/index.html && exec httpd -f -p 8080 -h /www");
        h.docker.run(&[
            "--init", "--name", name, "-p", "8080", "webimg", "sh", "-c", &script,
        ])
    };
    let h1 = serve("h1");
    let _h2 = serve("h2");

    let mount = format!("{}:/run/fluxd:ro", fluxd.dir.display());
    let edge = h.docker.ok(&[
        "run",
        "-d",
        "--name",
        "edge",
        "--network",
        "host",
        "-v",
        &mount,
        &format!("{IMAGE}-edge"),
        "--service",
        "site=127.0.0.1:8088",
        "--interval-ms",
        "200",
    ]);
    let nginx: SocketAddrV4 = "127.0.0.1:8088".parse().unwrap();
    let get = || h.ns.run(move || http_get(nginx).map_err(|e| e.to_string()));
    // Both instances answer through nginx.
    let mut seen = std::collections::BTreeSet::new();
    let both = wait_until(Duration::from_secs(20), || {
        if let Ok((200, body)) = get() {
            seen.insert(body);
        }
        seen.len() == 2
    });
    assert!(
        both.is_some(),
        "seen {seen:?}, last {:?}\n{}",
        get(),
        logs(&h, &edge)
    );
    assert_eq!(
        seen,
        ["h1", "h2"].map(String::from).into(),
        "{}",
        logs(&h, &edge)
    );
    let conf = h
        .docker
        .ok(&["exec", "edge", "cat", "/etc/nginx/conf.d/flux.conf"]);
    assert!(conf.contains("upstream flux_site"), "{conf}");

    // h1 stops: nginx's upstream follows, and only h2 answers.
    let h1_upstream = format!(":{} ", h.docker.host_port(&h1, 8080).unwrap());
    assert!(conf.contains(&h1_upstream), "{h1_upstream} not in {conf}");
    h.docker.stop(&h1);
    let followed = wait_until(Duration::from_secs(10), || {
        !h.docker
            .ok(&["exec", "edge", "cat", "/etc/nginx/conf.d/flux.conf"])
            .contains(&h1_upstream)
    });
    assert!(followed.is_some(), "{}", logs(&h, &edge));
    for _ in 0..10 {
        assert_eq!(get(), Ok((200, "h2".to_string())), "{}", logs(&h, &edge));
    }

    // `docker stop`: nginx and fluxd edge end cleanly, and the port closes.
    h.docker.ok(&["stop", "edge"]);
    let state = h.docker.inspect(&edge)["State"].clone();
    assert_eq!(state["ExitCode"], 0, "{state}\n{}", logs(&h, &edge));
    assert!(get().is_err(), "nginx still answers after docker stop");
}
