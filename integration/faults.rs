//! Issue 9, the fault suite: what a client sees when backends, instances, fluxd's own
//! resources, Docker or etcd misbehave, and that fluxd recovers each time without a restart.
//! Each test builds a one-host cluster (support/cluster.rs: its own namespace, dockerd, fluxd,
//! and etcd in a lan namespace), adds the faulty backends (support/faulty.rs) as static
//! instances or runs containers, and tears it all down on drop, also when it fails.
//!
//! Every test ends with the same recovery check (`assert_recovered`): the same fluxd process
//! (no restart) serves new connections through the same VIP from a healthy instance, and its
//! fd count is back near what it was before the fault.
//!
//! Run with `integration/run f` (one test at a time: the CPU bounds below assume nothing else
//! loads the machine's two cores).

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "support/client.rs"]
mod client;
#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/faulty.rs"]
mod faulty;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use client::{first_line, read_line, read_to_eof, Seen};
use cluster::{set, tail, web_vip, Cluster, ClusterConfig, Host, IMAGE};
use faulty::{Fault, Faulty, Flapper};
use support::backend::{who_serves, Backend};
use support::docker::NAME_PORT;
use support::fluxd::wait_until;

/// What fluxd may hold above its baseline once a fault is over: pipes its per-thread pools
/// keep after a burst (two fds each).
const FD_SLACK: usize = 16;

fn one_host() -> Cluster {
    Cluster::new(ClusterConfig {
        hosts: 1,
        ..Default::default()
    })
}

fn vip(last: u8) -> SocketAddrV4 {
    SocketAddrV4::new([198, 18, 0, last].into(), 80)
}

/// `service add NAME --address VIP` and each static instance, through host `h`; returns once
/// the data plane routes the VIP to all of them.
fn static_service(h: &Host, name: &str, vip: SocketAddrV4, instances: &[(&str, SocketAddrV4)]) {
    h.fluxd
        .ok(&["service", "add", name, "--address", &vip.to_string()]);
    for (n, addr) in instances {
        h.fluxd.add_instance(name, n, addr);
    }
    h.fluxd.wait_routed(name);
    wait_routes(h, name, instances.len());
}

/// Waits until the data plane routes `service` to `n` instances.
fn wait_routes(h: &Host, service: &str, n: usize) {
    let ok = wait_until(Duration::from_secs(10), || {
        cluster::routed_instances(&h.fluxd.socket, service).is_some_and(|r| r.len() == n)
    });
    assert!(
        ok.is_some(),
        "{service} not routed to {n} instances: {:?}\n{}",
        cluster::routed_instances(&h.fluxd.socket, service),
        tail(&h.fluxd.log(), 40)
    );
}

/// The instance's record in `fluxctl --json query`: (state, connect failures).
fn health(h: &Host, service: &str, instance: &str) -> (String, u64) {
    let v = h
        .fluxd
        .json(&["query", "--service", service])
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == instance)
        .cloned()
        .unwrap_or_else(|| panic!("{instance} not listed"));
    (
        v["state"].as_str().unwrap_or("").to_string(),
        v["health"]["connect_failures"].as_u64().unwrap_or(0),
    )
}

/// What fluxd is before a fault, for `assert_recovered`.
struct Baseline {
    pid: u32,
    fds: usize,
}

/// `n` connections through `vip`, so that the baseline includes what first use allocates.
fn baseline(h: &Host, vip: SocketAddrV4, n: usize) -> Baseline {
    h.ns.run(move || {
        for _ in 0..n {
            let _ = who_serves(vip);
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let b = Baseline {
        pid: h.fluxd.pid(),
        fds: h.fluxd.fd_count(),
    };
    eprintln!("baseline: fluxd pid {}, {} fds", b.pid, b.fds);
    b
}

/// The same fluxd process (no restart) serves 20 new connections through `vip`, every one from
/// an instance in `healthy` and each of those at least once, and holds no more fds than
/// before the fault (plus pooled pipes).
fn assert_recovered(h: &Host, vip: SocketAddrV4, healthy: &[&str], before: &Baseline) {
    assert_eq!(h.fluxd.pid(), before.pid, "fluxd was restarted");
    assert!(
        std::path::Path::new(&format!("/proc/{}", before.pid)).exists(),
        "fluxd died: {}",
        tail(&h.fluxd.log(), 40)
    );
    let served: Vec<Result<String, String>> = h.ns.run(move || {
        (0..20)
            .map(|_| who_serves(vip).map_err(|e| e.to_string()))
            .collect()
    });
    let names: BTreeSet<String> = served.iter().filter_map(|r| r.clone().ok()).collect();
    assert!(
        served
            .iter()
            .all(|r| r.as_ref().is_ok_and(|n| healthy.contains(&n.as_str())))
            && names == set(healthy),
        "after the fault, want every connection served by {healthy:?}: {served:?}\n{}",
        tail(&h.fluxd.log(), 40)
    );
    let limit = before.fds + FD_SLACK;
    let settled = wait_until(Duration::from_secs(10), || h.fluxd.fd_count() <= limit);
    let fds = h.fluxd.fd_count();
    eprintln!("recovered: {fds} fds (baseline {})", before.fds);
    assert!(
        settled.is_some(),
        "fluxd holds {fds} fds, baseline {}: {:?}",
        before.fds,
        fd_kinds(h.fluxd.pid())
    );
}

/// Counts of fluxd's open fds by kind (socket, pipe, anon_inode...), for messages.
fn fd_kinds(pid: u32) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
    {
        let t = std::fs::read_link(e.unwrap().path())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let kind = t.split(':').next().unwrap_or("").to_string();
        *m.entry(kind).or_default() += 1;
    }
    m
}

/// f1. A backend that resets: before a byte was exchanged, flux passes the connection to
/// another instance unnoticed (and marks the resetting one failed); in the middle of a
/// request, the client sees the reset itself, at once (a FIN would make a crash look like a
/// complete answer), while the other instance keeps serving.
#[test]
fn f1_backend_reset_reaches_the_client_and_others_keep_serving() {
    let c = one_host();
    let h = c.host('a');
    let good = Backend::start(&h.ns, "good", 9101);
    let early = Faulty::start(&h.ns, Fault::ResetOnAccept);
    let mid = Faulty::start(&h.ns, Fault::ResetAfterRequest);
    let v = vip(31);
    static_service(h, "f1", v, &[("good", good.addr), ("early", early.addr)]);
    let before = baseline(h, v, 10);

    // Reset on accept: every client is served, by `good`.
    let r = h.load(v, 100, Duration::from_secs(20)).wait();
    assert!(
        r.failures.is_empty() && r.served.keys().eq(["good"]) && r.total == 100,
        "reset on accept: {}",
        r.summary()
    );
    assert!(early.accepted.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert_eq!(health(h, "f1", "early").0, "failed");
    assert_eq!(health(h, "f1", "good"), ("live".to_string(), 0));

    // Reset in the middle of a request: the client sees a reset, within a second.
    h.fluxd.ok(&["instance", "rm", "f1", "early"]);
    h.fluxd.add_instance("f1", "mid", mid.addr);
    wait_routes(h, "f1", 2);
    let seen: Vec<(Duration, Seen)> = h.ns.run(move || {
        (0..10)
            .map(|_| {
                let t = Instant::now();
                let seen = match client::connect(v) {
                    Ok(mut s) => match s.write_all(b"request\n") {
                        Ok(()) => read_line(&mut s, Duration::from_secs(3)),
                        Err(e) => client::classify(&e),
                    },
                    Err(e) => client::classify(&e),
                };
                (t.elapsed(), seen)
            })
            .collect()
    });
    eprintln!("request then reset: {seen:?}");
    let resets = seen.iter().filter(|(_, s)| *s == Seen::Reset).count();
    let served = seen
        .iter()
        .filter(|(_, s)| *s == Seen::Line("good".into()))
        .count();
    assert!(
        resets + served == 10 && resets >= 3 && served >= 3,
        "want resets from `mid` and answers from `good`, nothing else: {seen:?}"
    );
    assert!(
        seen.iter().all(|(t, _)| *t < Duration::from_secs(1)),
        "{seen:?}"
    );
    // The instance answered the connect: an application-level reset does not fail it.
    assert_eq!(health(h, "f1", "mid").0, "live");

    h.fluxd.ok(&["instance", "rm", "f1", "mid"]);
    wait_routes(h, "f1", 1);
    assert_recovered(h, v, &["good"], &before);
}

/// f2. A backend that accepts and never answers: 50 clients that sent a request see silence
/// (no reset, no end of stream) until they give up; fluxd meanwhile holds both sockets of each
/// and burns no CPU on them; once the clients close, it frees both sockets of each.
#[test]
fn f2_silent_backend_costs_no_cpu_and_frees_sockets_on_close() {
    const CLIENTS: usize = 50;
    let c = one_host();
    let h = c.host('a');
    let good = Backend::start(&h.ns, "good", 9201);
    let silent = Faulty::start(&h.ns, Fault::Silent);
    let v = vip(32);
    static_service(h, "f2", v, &[("good", good.addr)]);
    let before = baseline(h, v, 10);
    h.fluxd.add_instance("f2", "silent", silent.addr);
    h.fluxd.ok(&["instance", "rm", "f2", "good"]);
    wait_routes(h, "f2", 1);

    let clients: Vec<TcpStream> = h.ns.run(move || {
        (0..CLIENTS)
            .map(|_| {
                let mut s = client::connect(v).expect("connect");
                s.write_all(b"request\n").unwrap();
                s
            })
            .collect()
    });
    let all_in = wait_until(Duration::from_secs(10), || {
        silent.accepted.load(std::sync::atomic::Ordering::Relaxed) == CLIENTS as u64
    });
    assert!(
        all_in.is_some(),
        "the silent backend did not get all clients"
    );
    let held = h.fluxd.fd_count();
    let cpu = h.fluxd.cpu_time();
    std::thread::sleep(Duration::from_secs(5));
    let used = h.fluxd.cpu_time() - cpu;
    eprintln!("{CLIENTS} stalled connections: fluxd holds {held} fds, used {used:?} CPU in 5 s");
    for (i, s) in clients.iter().enumerate() {
        assert_eq!(client::is_silent(s), Ok(()), "client {i}");
    }
    assert!(
        used < Duration::from_millis(500),
        "fluxd used {used:?} CPU over 5 s holding {CLIENTS} stalled connections"
    );
    assert!(
        held >= before.fds + 2 * CLIENTS,
        "{held} fds: both sockets of each connection should be held"
    );

    // The clients give up: each close reaches the backend, which closes too.
    drop(clients);
    let freed = wait_until(Duration::from_secs(10), || {
        h.fluxd.fd_count() <= before.fds + FD_SLACK
    });
    assert!(
        freed.is_some(),
        "fluxd holds {} fds after the clients closed: {:?}",
        h.fluxd.fd_count(),
        fd_kinds(h.fluxd.pid())
    );

    h.fluxd.add_instance("f2", "good", good.addr);
    h.fluxd.ok(&["instance", "rm", "f2", "silent"]);
    wait_routes(h, "f2", 1);
    assert_recovered(h, v, &["good"], &before);
}

/// f3. Half-closes pass through both ways: a backend that answers and shuts its write side
/// while it still reads (the client gets the answer and end of stream, then sends more, which
/// the backend receives), and a client that shuts its write side first (the backend answers
/// after it saw end of stream).
#[test]
fn f3_half_closes_pass_through_both_ways() {
    const MORE: usize = 10_000;
    const BODY: usize = 20_000;
    let c = one_host();
    let h = c.host('a');
    let good = Backend::start(&h.ns, "good", 9301);
    let half = Faulty::start(&h.ns, Fault::HalfClose);
    let v = vip(33);
    static_service(h, "f3", v, &[("good", good.addr)]);
    let before = baseline(h, v, 10);
    h.fluxd.add_instance("f3", "half", half.addr);
    h.fluxd.ok(&["instance", "rm", "f3", "good"]);
    wait_routes(h, "f3", 1);

    // The backend closes its write side first.
    let got = h.ns.run(move || {
        let mut s = client::connect(v)?;
        s.write_all(b"server-first\n")?;
        let reply = read_to_eof(&mut s, Duration::from_secs(5));
        s.write_all(&vec![b'x'; MORE])?;
        s.shutdown(Shutdown::Write)?;
        let rest = read_to_eof(&mut s, Duration::from_secs(5));
        Ok::<_, std::io::Error>((reply, rest))
    });
    let (reply, rest) = got.expect("server-first connection");
    assert_eq!(reply, Ok(b"reply\n".to_vec()), "answer, then end of stream");
    assert_eq!(rest, Ok(vec![]), "nothing after end of stream");
    assert_eq!(
        half.next_report(Duration::from_secs(5)),
        Some(MORE as u64),
        "the backend must receive what the client sent after the backend's half-close"
    );

    // The client closes its write side first.
    let got = h.ns.run(move || {
        let mut s = client::connect(v)?;
        s.write_all(b"client-first\n")?;
        s.write_all(&vec![b'y'; BODY])?;
        s.shutdown(Shutdown::Write)?;
        Ok::<_, std::io::Error>(read_to_eof(&mut s, Duration::from_secs(5)))
    });
    assert_eq!(
        got.expect("client-first connection"),
        Ok(format!("got {BODY}\n").into_bytes()),
        "the backend answers after it saw the client's end of stream"
    );

    h.fluxd.add_instance("f3", "good", good.addr);
    h.fluxd.ok(&["instance", "rm", "f3", "half"]);
    wait_routes(h, "f3", 1);
    assert_recovered(h, v, &["good"], &before);
}

/// f4. A slow backend (64 KiB at about 20 KiB/s): its client receives every byte intact, and a
/// concurrent connection of the same service to a fast instance is not slowed (1 MiB echoed
/// while the slow transfer goes on).
#[test]
fn f4_slow_backend_delivers_intact_and_slows_no_one_else() {
    const FAST_BYTES: usize = 1 << 20;
    let c = one_host();
    let h = c.host('a');
    let fast = Backend::start(&h.ns, "fast", 9401);
    let slow = Faulty::start(&h.ns, Fault::Slow);
    let v = vip(34);
    static_service(h, "f4", v, &[("fast", fast.addr)]);
    let before = baseline(h, v, 10);
    h.fluxd.add_instance("f4", "slow", slow.addr);
    wait_routes(h, "f4", 2);

    // One connection to each (round robin alternates; a few tries at most).
    let (mut to_slow, mut to_fast) = h.ns.run(move || {
        let (mut s, mut f) = (None, None);
        for _ in 0..6 {
            let mut c = client::connect(v).expect("connect");
            match read_line(&mut c, Duration::from_secs(5)) {
                Seen::Line(n) if n == "slow" && s.is_none() => s = Some(c),
                Seen::Line(n) if n == "fast" && f.is_none() => f = Some(c),
                Seen::Line(_) => {}
                other => panic!("{other:?}"),
            }
            if s.is_some() && f.is_some() {
                break;
            }
        }
        (
            s.expect("no slow connection"),
            f.expect("no fast connection"),
        )
    });
    let started = Instant::now();
    let slow_reader = std::thread::spawn(move || {
        let body = read_to_eof(&mut to_slow, Duration::from_secs(20));
        (body, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let data: Vec<u8> = (0..FAST_BYTES).map(|i| (i % 251) as u8).collect();
    let writer = {
        let mut w = to_fast.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || w.write_all(&data))
    };
    let mut echoed = vec![0u8; FAST_BYTES];
    to_fast
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    to_fast.read_exact(&mut echoed).expect("fast echo");
    writer.join().unwrap().unwrap();
    let fast_took = t.elapsed();
    let (body, slow_took) = slow_reader.join().unwrap();
    eprintln!("slow: 64 KiB in {slow_took:?}; fast: 1 MiB echoed in {fast_took:?} meanwhile");
    assert!(echoed == data, "fast echo corrupted");
    let body = body.expect("slow body");
    let want: Vec<u8> = (0..faulty::SLOW_BYTES).map(faulty::pattern).collect();
    assert_eq!(body.len(), want.len(), "slow body length");
    assert!(body == want, "slow body corrupted");
    assert!(
        slow_took > Duration::from_secs(2),
        "the slow backend was not slow: {slow_took:?}"
    );
    assert!(
        fast_took < Duration::from_secs(1) && t.elapsed() < slow_took,
        "the fast connection took {fast_took:?}, the slow one {slow_took:?}"
    );
    drop(to_fast);

    h.fluxd.ok(&["instance", "rm", "f4", "slow"]);
    wait_routes(h, "f4", 1);
    assert_recovered(h, v, &["fast"], &before);
}

/// f5. One of two instances flaps (its listener open 300 ms, closed 300 ms, for 10 s) while a
/// client loop runs: no client connection fails (flux retries the other instance), and once
/// the flapping stops both instances serve again.
#[test]
fn f5_flapping_instance_fails_no_client() {
    let c = one_host();
    let h = c.host('a');
    let stable = Backend::start(&h.ns, "stable", 9501);
    let period = Duration::from_millis(300);
    let flapping = Duration::from_secs(10);
    let flap = Flapper::start(&h.ns, "flapper", period, flapping);
    let started = Instant::now();
    let v = vip(35);
    static_service(
        h,
        "f5",
        v,
        &[("stable", stable.addr), ("flapper", flap.addr)],
    );
    let before = Baseline {
        pid: h.fluxd.pid(),
        fds: h.fluxd.fd_count(),
    };
    let r = h
        .load(v, 100_000, flapping.saturating_sub(started.elapsed()))
        .wait();
    eprintln!("clients while flapping: {}", r.summary());
    let (_, refused) = health(h, "f5", "flapper");
    assert!(
        r.failures.is_empty() && r.total > 100,
        "clients while the instance flapped: {}\n{}",
        r.summary(),
        tail(&h.fluxd.log(), 40)
    );
    assert!(
        refused > 0,
        "the flapper never failed a connect: no flapping?"
    );
    assert!(r.served.contains_key("flapper") && r.served.contains_key("stable"));

    let steady = wait_until(Duration::from_secs(5), || {
        flap.steady.load(std::sync::atomic::Ordering::SeqCst)
    });
    assert!(steady.is_some());
    // The flapper's retry may be up to a few backoff steps away.
    let back = h.first_served_by(v, "flapper", Duration::from_secs(40));
    eprintln!(
        "flapper served again {back:?} after it stopped flapping ({refused} refused connects)"
    );
    assert!(back.is_some(), "{}", tail(&h.fluxd.log(), 40));
    assert_recovered(h, v, &["stable", "flapper"], &before);
}

/// f6. fluxd at its fd limit (RLIMIT_NOFILE 256) with 200 clients: while saturated it does not
/// spin (accepts back off) nor flood its log; no client is reset; the connections it could not
/// take wait in the listen backlog and are served as soon as held ones close; no instance is
/// marked failed for fluxd's own lack of fds; afterwards everything works, same process.
#[test]
fn f6_fd_limit_backs_off_recovers_and_blames_no_instance() {
    const LIMIT: u64 = 256;
    const CLIENTS: usize = 200;
    let mut c = one_host();
    {
        let fluxd = &mut c.host_mut('a').fluxd;
        fluxd.stop();
        fluxd.set_fd_limit(LIMIT);
        fluxd.start();
    }
    let h = c.host('a');
    let one = Backend::start(&h.ns, "one", 9601);
    let two = Backend::start(&h.ns, "two", 9602);
    let v = vip(36);
    static_service(h, "f6", v, &[("one", one.addr), ("two", two.addr)]);
    let before = baseline(h, v, 20);
    assert!(before.fds < 150, "fluxd needs {} fds idle", before.fds);

    let log_start = h.fluxd.log().len();
    let saturated = Instant::now();
    // The clients connect (the kernel completes the handshake for the backlog too), then wait.
    let mut clients: Vec<TcpStream> = h.ns.run(move || {
        (0..CLIENTS)
            .map(|_| client::connect(v).expect("connect"))
            .collect()
    });
    let full = wait_until(Duration::from_secs(10), || {
        h.fluxd.fd_count() as u64 >= LIMIT - 2
    });
    assert!(
        full.is_some(),
        "fluxd never reached its fd limit: {} fds",
        h.fluxd.fd_count()
    );
    let cpu = h.fluxd.cpu_time();
    std::thread::sleep(Duration::from_secs(5));
    let used = h.fluxd.cpu_time() - cpu;
    let log = h.fluxd.log()[log_start..].to_string();
    let warnings = log.matches("backing off").count();
    eprintln!(
        "saturated at {} fds: fluxd used {used:?} CPU in 5 s, logged {warnings} accept warnings \
         in {:?}",
        h.fluxd.fd_count(),
        saturated.elapsed()
    );
    assert!(
        used < Duration::from_secs(1),
        "fluxd used {used:?} CPU over 5 s at its fd limit: spinning?"
    );
    assert!(
        (1..=2).contains(&warnings),
        "{warnings} accept warnings in {:?} at the fd limit (want one per 10 s):\n{}",
        saturated.elapsed(),
        tail(&log, 20)
    );

    // Served (the name came), or waiting in the backlog (silence); never reset.
    let mut waiting = Vec::new();
    let mut served = 0;
    for (i, mut s) in clients.drain(..).enumerate() {
        match client::is_silent(&s) {
            Ok(()) => waiting.push(s),
            Err(Seen::Other(_)) => match read_line(&mut s, Duration::from_secs(1)) {
                Seen::Line(n) if n == "one" || n == "two" => served += 1,
                other => panic!("client {i} while saturated: {other:?}"),
            },
            Err(other) => panic!("client {i} while saturated: {other:?}"),
        }
        // Served connections close here, which frees their fds for the ones waiting.
    }
    eprintln!(
        "while saturated: {served} served, {} waiting",
        waiting.len()
    );
    assert!(served > 0 && !waiting.is_empty(), "not saturated?");
    // Each waiting client is served in turn as fds come free (and closes).
    let t = Instant::now();
    for (i, mut s) in waiting.into_iter().enumerate() {
        match read_line(&mut s, Duration::from_secs(5)) {
            Seen::Line(n) if n == "one" || n == "two" => {}
            other => panic!(
                "waiting client {i}, {:?} after release: {other:?}",
                t.elapsed()
            ),
        }
    }
    eprintln!("the waiting clients were served within {:?}", t.elapsed());
    for name in ["one", "two"] {
        assert_eq!(
            health(h, "f6", name),
            ("live".to_string(), 0),
            "{name} blamed for fluxd's fd limit"
        );
    }
    assert_recovered(h, v, &["one", "two"], &before);
}

/// f7. A VIP whose every instance is gone (its only container removed): `fluxctl query` lists
/// none, and a new connection is refused or reset at once, not left hanging; a new container
/// brings the VIP back.
#[test]
fn f7_vip_without_instances_refuses_at_once_then_comes_back() {
    let c = one_host();
    c.add_web_service();
    let h = c.host('a');
    let id = h.run_web("a-web1");
    assert!(c
        .wait_converged("web", &set(&["a-web1"]), Duration::from_secs(15))
        .is_some());
    let before = baseline(h, web_vip(), 10);

    h.docker().rm(&id);
    assert!(
        c.wait_converged("web", &BTreeSet::new(), Duration::from_secs(10))
            .is_some(),
        "{}",
        c.dump("web")
    );
    assert_eq!(
        h.query("web"),
        Some(vec![]),
        "fluxctl query lists instances"
    );
    let v = web_vip();
    let seen: Vec<(Duration, Seen)> = h.ns.run(move || {
        (0..10)
            .map(|_| first_line(v, Duration::from_secs(5)))
            .collect()
    });
    eprintln!("connections to a VIP without instances: {seen:?}");
    for (took, s) in &seen {
        assert!(
            matches!(s, Seen::Reset | Seen::Refused) && *took < Duration::from_secs(1),
            "want an immediate reset or refusal: {seen:?}"
        );
    }

    h.run_web("a-web2");
    let back = h.first_served_by(v, "a-web2", Duration::from_secs(10));
    eprintln!("a new container served {back:?} after docker run returned");
    assert!(back.is_some(), "{}", c.dump("web"));
    assert_recovered(h, v, &["a-web2"], &before);
}

/// f8. Docker restarts (SIGTERM, start) while a client loop runs against a service with two
/// containers (`--restart always`) and a static instance: the only failures are connections
/// that were under way when the containers stopped (at most one per container: the loop has
/// one connection at a time); fluxd re-attaches to Docker by itself, routes to the restarted
/// containers, and to a container started after the restart.
#[test]
fn f8_docker_restart_under_load() {
    let mut c = one_host();
    c.add_web_service();
    let stat = {
        let h = c.host('a');
        let stat = Backend::start(&h.ns, "a-static", 9801);
        h.fluxd.add_instance("web", "a-static", stat.addr);
        for name in ["a-web1", "a-web2"] {
            h.docker().run_name_server(
                IMAGE,
                name,
                &["-p", &NAME_PORT.to_string(), "--restart", "always"],
            );
        }
        stat
    };
    let h = c.host('a');
    for name in ["a-web1", "a-web2", "a-static"] {
        assert!(
            h.first_served_by(web_vip(), name, Duration::from_secs(10))
                .is_some(),
            "{name} not served{}",
            c.dump("web")
        );
    }
    let before = baseline(h, web_vip(), 10);
    let load = h.load(web_vip(), 100_000, Duration::from_secs(90));
    std::thread::sleep(Duration::from_secs(1));

    let restart = c.host_mut('a').restart_docker();
    let h = c.host('a');
    eprintln!(
        "dockerd stopped in {:?}, answering {:?} later",
        restart.stopped - restart.stopping,
        restart.answering - restart.stopped
    );
    let mut back = Vec::new();
    for name in ["a-web1", "a-web2"] {
        let t = h.first_served_by(web_vip(), name, Duration::from_secs(30));
        assert!(
            t.is_some(),
            "{name} not routed after Docker's restart; docker ps: {}; who serves: {:?}{}",
            h.docker()
                .ok(&["ps", "-a", "--format", "{{.Names}} {{.Ports}} {{.Status}}"]),
            h.ns.run(|| (0..6)
                .map(|_| who_serves(web_vip()).map_err(|e| e.to_string()))
                .collect::<Vec<_>>()),
            c.dump("web")
        );
        back.push(t.unwrap());
    }
    eprintln!("restarted containers served again after {back:?}");
    h.run_web("a-web3");
    let new = h.first_served_by(web_vip(), "a-web3", Duration::from_secs(10));
    eprintln!("a container started after the restart served {new:?} after docker run");
    assert!(new.is_some(), "{}", c.dump("web"));
    std::thread::sleep(Duration::from_secs(1));
    let r = load.finish();
    eprintln!("clients: {}", r.summary());
    let stop_window = (
        restart.stopping.saturating_duration_since(r.started),
        restart.stopped.saturating_duration_since(r.started),
    );
    let outside: Vec<_> = r
        .failures
        .iter()
        .filter(|f| f.ended < stop_window.0 || f.began > stop_window.1)
        .collect();
    assert!(
        outside.is_empty() && r.failures.len() <= 2 && r.total > 100,
        "failures beyond connections in flight while the containers stopped ({stop_window:?}): {}{}",
        r.summary(),
        c.dump("web")
    );
    assert_recovered(
        h,
        web_vip(),
        &["a-web1", "a-web2", "a-web3", "a-static"],
        &before,
    );
    drop(stat);
}

/// f9. etcd restarts (killed, started again on its data, about 2 s down) while a client loop
/// runs: no client connection fails; the store comes back at the revision it had (history
/// kept) and fluxd's watch resumes from there without a relist; a change made after etcd's
/// return (a new static instance) is routed within 5 s.
#[test]
fn f9_etcd_restart_under_load() {
    let mut c = one_host();
    c.add_web_service();
    let h = c.host('a');
    h.run_web("a-web1");
    h.run_web("a-web2");
    assert!(c
        .wait_converged("web", &set(&["a-web1", "a-web2"]), Duration::from_secs(15))
        .is_some());
    let before = baseline(h, web_vip(), 10);
    let stat = Backend::start(&h.ns, "a-static", 9901);
    let load = h.load(web_vip(), 100_000, Duration::from_secs(60));
    let revision = c.etcd_revision();
    std::thread::sleep(Duration::from_secs(1));

    c.etcd[0].stop();
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    c.etcd[0].restart();
    eprintln!("etcd down for {:?}", down.elapsed());
    let after = c.etcd_revision();
    assert!(
        after >= revision,
        "etcd came back at revision {after} < {revision}"
    );
    let h = c.host('a');
    let t = Instant::now();
    h.fluxd.add_instance("web", "a-static", stat.addr);
    let seen = h.first_served_by(web_vip(), "a-static", Duration::from_secs(10));
    eprintln!(
        "instance added after etcd's return served {seen:?} later ({:?} after)",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_secs(1));
    let r = load.finish();
    eprintln!("clients: {}", r.summary());
    assert!(
        r.failures.is_empty() && r.total > 100,
        "clients across etcd's restart: {}{}",
        r.summary(),
        c.dump("web")
    );
    assert!(
        seen.is_some_and(|s| s < Duration::from_secs(5)),
        "a change after etcd's return not routed: {seen:?}{}",
        c.dump("web")
    );
    let log = h.fluxd.log();
    assert!(
        !log.contains("compacted; relisting"),
        "fluxd relisted after a restart that kept the history:\n{}",
        tail(&log, 40)
    );
    assert_eq!(
        c.instance_keys("web").len(),
        3,
        "{:?}",
        c.instance_keys("web")
    );
    assert_recovered(h, web_vip(), &["a-web1", "a-web2", "a-static"], &before);
}
