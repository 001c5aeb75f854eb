//! Issue 9, soak: 5,000 proxied connections held idle while short connections churn through
//! another VIP, for `FLUX_SOAK_SECONDS` (default 60); afterwards fluxd's descriptors, threads
//! and memory must be back where they were. The figures are printed (`--nocapture`);
//! RELIABILITY.md keeps a run. Everything runs inside a namespace the test creates, and every
//! loop ends by a deadline.

mod support;

use std::io::Read;
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::backend::Backend;
use support::fluxd::{wait_until, Fluxd};
use support::netns::Netns;

const HOLD: usize = 5_000;
const IDLE_VIP: &str = "198.18.0.20:80";
const WEB_VIP: &str = "198.18.0.10:80";
const HOLDER: &str = "127.0.0.1:9100";

fn soak_seconds() -> u64 {
    std::env::var("FLUX_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
}

/// fluxd's footprint as the kernel sees it.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rss_kib: u64,
    fds: usize,
    threads: u64,
}

fn sample(fluxd: &Fluxd) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{}/status", fluxd.pid())).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Sample {
        rss_kib: field("VmRSS:"),
        fds: fluxd.fd_count(),
        threads: field("Threads:"),
    }
}

/// A backend that accepts and holds connections without a word until the peer closes, on a
/// single-threaded runtime inside the namespace; it stops on `stop` or at `deadline`.
fn start_holder(
    ns: &Netns,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> std::thread::JoinHandle<()> {
    let addr: SocketAddr = HOLDER.parse().unwrap();
    let listener = ns.run(move || std::net::TcpListener::bind(addr).expect("bind holder"));
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    accepted = l.accept() => {
                        let Ok((mut s, _)) = accepted else { continue };
                        tokio::spawn(async move {
                            let mut buf = [0u8; 64];
                            use tokio::io::AsyncReadExt;
                            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                        });
                    }
                    _ = tick.tick() => {
                        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                            return;
                        }
                    }
                }
            }
        });
    })
}

/// Opens `n` connections to `vip` (64 connects in flight at most), holds them for `hold`,
/// then counts how many are still open and closes them all. Returns (opened, alive at end).
fn hold_connections(ns: &Netns, vip: SocketAddrV4, n: usize, hold: Duration) -> (usize, usize) {
    ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut conns = Vec::with_capacity(n);
            let mut pending = futures::stream::FuturesUnordered::new();
            use futures::StreamExt;
            let mut started = 0;
            while conns.len() + pending.len() < n || !pending.is_empty() {
                while started < n && pending.len() < 64 {
                    started += 1;
                    pending.push(tokio::time::timeout(
                        Duration::from_secs(5),
                        tokio::net::TcpStream::connect(vip),
                    ));
                }
                match pending.next().await {
                    Some(Ok(Ok(s))) => conns.push(s),
                    Some(_) => {}
                    None => break,
                }
            }
            let opened = conns.len();
            tokio::time::sleep(hold).await;
            let mut alive = 0;
            for s in &conns {
                let mut buf = [0u8; 1];
                // Still open and silent: nothing to read yet.
                if matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                {
                    alive += 1;
                }
            }
            (opened, alive)
        })
    })
}

/// Short connections to `vip` from 4 threads until `deadline`: connect, read the backend's
/// name line, close. Returns (answered, failed).
fn churn(ns: &Netns, vip: SocketAddrV4, deadline: Instant) -> (usize, usize) {
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (ok, failed) = (ok.clone(), failed.clone());
            ns.spawn(move || {
                while Instant::now() < deadline {
                    let one = || -> std::io::Result<()> {
                        let mut s =
                            TcpStream::connect_timeout(&vip.into(), Duration::from_secs(5))?;
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        let mut buf = [0u8; 16];
                        if s.read(&mut buf)? == 0 {
                            return Err(std::io::ErrorKind::UnexpectedEof.into());
                        }
                        Ok(())
                    };
                    match one() {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

#[test]
fn held_connections_and_churn_leave_nothing_behind() {
    let secs = soak_seconds();
    let ns = Netns::new("soak");
    let fluxd = Fluxd::dataplane(&ns.name, &["--max-connections", "12000"]);
    let deadline = Instant::now() + Duration::from_secs(secs + 120);
    let stop = Arc::new(AtomicBool::new(false));
    let holder = start_holder(&ns, stop.clone(), deadline);
    let web = Backend::start(&ns, "b0", 9000);
    fluxd.ok(&["service", "add", "idle", "--address", IDLE_VIP]);
    fluxd.add_instance("idle", "h0", HOLDER);
    fluxd.ok(&["service", "add", "web", "--address", WEB_VIP]);
    fluxd.add_instance("web", "b0", web.addr);
    fluxd.wait_routed("idle");
    fluxd.wait_routed("web");
    let (idle_vip, web_vip): (SocketAddrV4, SocketAddrV4) =
        (IDLE_VIP.parse().unwrap(), WEB_VIP.parse().unwrap());

    // Warm-up, so that the baseline includes what any first use allocates once.
    let (opened, _) = hold_connections(&ns, idle_vip, 500, Duration::from_millis(500));
    assert_eq!(opened, 500, "warm-up: {}", fluxd.log());
    churn(&ns, web_vip, Instant::now() + Duration::from_secs(1));
    std::thread::sleep(Duration::from_secs(3));
    let base = sample(&fluxd);

    let churn_until = Instant::now() + Duration::from_secs(secs);
    let (during, (opened, alive), (answered, failed)) = std::thread::scope(|scope| {
        let churner = scope.spawn(|| churn(&ns, web_vip, churn_until));
        let holding =
            scope.spawn(|| hold_connections(&ns, idle_vip, HOLD, Duration::from_secs(secs)));
        std::thread::sleep(Duration::from_secs(secs / 2));
        let during = sample(&fluxd);
        (during, holding.join().unwrap(), churner.join().unwrap())
    });

    // Every connection is closed now; fluxd lets go of both its sockets for each.
    let released = wait_until(Duration::from_secs(20), || sample(&fluxd).fds <= base.fds);
    std::thread::sleep(Duration::from_secs(3));
    let after = sample(&fluxd);
    eprintln!(
        "soak {secs} s: {opened} held ({alive} alive at the end), {answered} short connections \
         answered, {failed} failed\n  fluxd before: {base:?}\n  during: {during:?}\n  after: {after:?}"
    );
    assert_eq!(opened, HOLD, "{}", fluxd.log());
    assert_eq!(alive, HOLD, "held connections were cut");
    assert!(
        answered > 0 && failed == 0,
        "{answered} answered, {failed} failed"
    );
    assert!(
        during.fds >= base.fds + 2 * HOLD,
        "two descriptors per held connection: {during:?}"
    );
    assert!(
        released.is_some(),
        "descriptors not released: {after:?} vs {base:?}"
    );
    assert!(after.fds <= base.fds, "{after:?} vs {base:?}");
    // tokio's blocking pool (rule applies, drift checks) may hold one more idle thread.
    assert!(after.threads <= base.threads + 1, "{after:?} vs {base:?}");
    assert!(
        after.rss_kib <= base.rss_kib + 4 * 1024,
        "memory not returned: {after:?} vs {base:?}"
    );
    drop(web);
    stop.store(true, Ordering::Relaxed);
    let _ = holder.join();
}
