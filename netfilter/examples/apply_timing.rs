//! Times `apply` at scale inside a network namespace the caller created (never the root one):
//!
//!     ip netns add nfbench-$$ && ip -n nfbench-$$ link set lo up \
//!       && ip -n nfbench-$$ route add 198.18.0.0/15 dev lo
//!     cargo run --release -p netfilter --example apply_timing -- nfbench-$$
//!     ip netns del nfbench-$$
//!
//! Prints the median of several runs of: apply of 10,000 services from scratch, apply of one
//! added service with 10,000 present (and the same change by `apply_change`, the controller's
//! path), and the median connect latency to a VIP (through the redirect, to a listener on the
//! proxy port) with 10 and with 10,000 services installed, alternated.

use std::fs::File;
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use netfilter::{render, CommandRunner, Desired, Netfilter, Redirect};

const PROXY_PORT: u16 = 15001;

fn desired(n: u32) -> Desired {
    Desired {
        redirects: (0..n)
            .map(|i| Redirect {
                service: format!("svc-{i:05}"),
                vip: SocketAddrV4::new([198, 18, (i / 250) as u8, (i % 250 + 1) as u8].into(), 80),
            })
            .collect(),
        proxy_port: PROXY_PORT,
        bridge_interfaces: vec!["docker0".into(), "br-+".into()],
        ..Desired::default()
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Median time of `rounds` connects to the VIP of the last of `n` services, from a thread
/// inside the namespace, to a listener on the proxy port.
fn connect_latency(ns: &str, n: u32, rounds: u32) -> Duration {
    let last = desired(n).redirects.last().expect("n > 0").vip;
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).expect("namespace exists");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let listener = TcpListener::bind(("0.0.0.0", PROXY_PORT)).expect("bind");
        let mut samples = Vec::new();
        for round in 0..rounds + 200 {
            let started = Instant::now();
            let stream = TcpStream::connect(last).expect("connect to VIP");
            let elapsed = started.elapsed();
            let (_accepted, _) = listener.accept().expect("accept");
            drop(stream);
            if round >= 200 {
                samples.push(elapsed); // the first 200 warm up
            }
        }
        median(samples)
    })
    .join()
    .expect("latency thread")
}

fn main() {
    let ns = std::env::args().nth(1).expect("usage: apply_timing NETNS");
    let nf = Netfilter::new(CommandRunner::in_netns(&ns));
    let full = render(&desired(10_000));
    let plus_one = render(&desired(10_001));
    let runs = 5;

    let (mut scratch, mut one, mut change) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        nf.remove().expect("remove");
        let t = Instant::now();
        nf.apply(&full).expect("apply from scratch");
        scratch.push(t.elapsed());
        let t = Instant::now();
        nf.apply(&plus_one).expect("apply one added");
        one.push(t.elapsed());
        let t = Instant::now();
        nf.apply_change(&plus_one, &full)
            .expect("apply_change one removed");
        nf.apply_change(&full, &plus_one)
            .expect("apply_change one added");
        change.push(t.elapsed() / 2);
    }
    println!(
        "apply 10,000 services from scratch:     median {:?} of {runs}",
        median(scratch)
    );
    println!(
        "apply 1 added service (10,000 present): median {:?} of {runs}",
        median(one)
    );
    println!(
        "apply_change 1 service (10,000 present): median {:?} of {runs}",
        median(change)
    );

    // Alternated, so both sizes see the same machine conditions.
    let (mut small, mut large) = (Vec::new(), Vec::new());
    let ten = render(&desired(10));
    for _ in 0..runs {
        nf.apply(&ten).expect("apply 10");
        small.push(connect_latency(&ns, 10, 2000));
        nf.apply(&full).expect("apply 10,000");
        large.push(connect_latency(&ns, 10_000, 2000));
    }
    let (at_10, at_10k) = (median(small), median(large));
    println!(
        "connect latency: {at_10:?} at 10 services, {at_10k:?} at 10,000 ({:+.1}%)",
        (at_10k.as_secs_f64() / at_10.as_secs_f64() - 1.0) * 100.0
    );
    nf.remove().expect("remove");
}
