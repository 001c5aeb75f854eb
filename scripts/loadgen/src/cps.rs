//! Short connections: `concurrency` workers each loop connect, write 64 bytes, read 64 bytes,
//! close, until `seconds` have passed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(clap::Args)]
pub struct Args {
    /// Address to connect to, IP:PORT (a reply64 backend, directly or through a proxy).
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    #[arg(long)]
    seconds: f64,
}

/// One connection that takes longer than this counts as an error (a hang, not a slow answer).
const CONN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Tally {
    ok: u64,
    /// Connect-to-reply time of each successful connection, in nanoseconds.
    times: Vec<u64>,
    errors: BTreeMap<String, u64>,
}

pub async fn run(a: Args) -> std::io::Result<Value> {
    let limit = crate::seconds(a.seconds)?;
    let start = Instant::now();
    let deadline = start + limit;
    let workers: Vec<_> = (0..a.concurrency.max(1))
        .map(|_| tokio::spawn(worker(a.target, deadline)))
        .collect();
    let mut all = Tally::default();
    for w in workers {
        let t = w.await.map_err(std::io::Error::other)?;
        all.ok += t.ok;
        all.times.extend(t.times);
        for (k, n) in t.errors {
            *all.errors.entry(k).or_default() += n;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    all.times.sort_unstable();
    let errors: u64 = all.errors.values().sum();
    Ok(json!({
        "mode": "cps",
        "target": a.target.to_string(),
        "concurrency": a.concurrency,
        "connections": all.ok,
        "seconds": crate::round2(secs),
        "conn_per_s": crate::round2(all.ok as f64 / secs),
        "errors": errors,
        "error_kinds": all.errors,
        "p50_us": crate::percentile_us(&all.times, 50.0),
        "p99_us": crate::percentile_us(&all.times, 99.0),
    }))
}

async fn worker(target: SocketAddr, deadline: Instant) -> Tally {
    let mut t = Tally::default();
    while Instant::now() < deadline {
        let t0 = Instant::now();
        match tokio::time::timeout(CONN_TIMEOUT, one(target)).await {
            Ok(Ok(())) => {
                t.ok += 1;
                t.times.push(t0.elapsed().as_nanos() as u64);
            }
            Ok(Err(e)) => *t.errors.entry(e.kind().to_string()).or_default() += 1,
            Err(_) => *t.errors.entry("timed out".into()).or_default() += 1,
        }
    }
    t
}

async fn one(target: SocketAddr) -> std::io::Result<()> {
    let mut c = TcpStream::connect(target).await?;
    c.set_nodelay(true)?;
    let mut buf = [0u8; 64];
    c.write_all(&buf).await?;
    c.read_exact(&mut buf).await?;
    Ok(())
}
