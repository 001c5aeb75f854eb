//! Idle connections: opens `connections` connections to a target (an idle backend, directly or
//! through a proxy), sends nothing, and holds them for `seconds`. Prints one JSON line as soon as
//! all are open (the script measures the proxy's memory and descriptors then) and a last one
//! after the hold, with how many were still open, before closing them all.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::net::TcpStream;

#[derive(clap::Args)]
pub struct Args {
    /// Address to connect to, IP:PORT.
    #[arg(long)]
    target: SocketAddr,
    /// Connections to open and hold.
    #[arg(long)]
    connections: usize,
    /// How long to hold them once all are open.
    #[arg(long)]
    seconds: f64,
    /// Connects in flight at once, so that a proxy's accept backlog never overflows.
    #[arg(long, default_value_t = 64)]
    parallel: usize,
}

/// A connect that takes longer than this counts as an error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(a: Args) -> std::io::Result<Value> {
    let hold = crate::seconds(a.seconds)?;
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..a.parallel.clamp(1, a.connections.max(1)))
        .map(|_| {
            let next = next.clone();
            let (target, n) = (a.target, a.connections);
            tokio::spawn(async move {
                let mut conns = Vec::new();
                let mut errors = 0u64;
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
                        Ok(Ok(c)) => conns.push(c),
                        _ => errors += 1,
                    }
                }
                (conns, errors)
            })
        })
        .collect();
    let mut conns = Vec::with_capacity(a.connections);
    let mut errors = 0u64;
    for w in workers {
        let (c, e) = w.await.map_err(std::io::Error::other)?;
        conns.extend(c);
        errors += e;
    }
    let open_s = start.elapsed().as_secs_f64();
    // The script waits for this line before it samples the proxy.
    println!(
        "{}",
        json!({
            "mode": "hold",
            "event": "open",
            "connections": conns.len(),
            "errors": errors,
            "open_seconds": crate::round2(open_s),
        })
    );
    std::io::stdout().flush()?;
    tokio::time::sleep(hold).await;
    // A connection the proxy or the backend closed reads as end-of-file (or an error) now.
    let mut buf = [0u8; 1];
    let alive = conns
        .iter()
        .filter(|c| matches!(c.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock))
        .count();
    Ok(json!({
        "mode": "hold",
        "event": "done",
        "target": a.target.to_string(),
        "connections": conns.len(),
        "errors": errors,
        "alive_at_end": alive,
        "open_seconds": crate::round2(open_s),
        "seconds": crate::round2(start.elapsed().as_secs_f64()),
    }))
}
