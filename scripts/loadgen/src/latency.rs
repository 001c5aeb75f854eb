//! Request-reply latency: `connections` persistent connections, each sending a 64-byte request
//! and waiting for the 64-byte reply before the next, `requests` in all (or until `seconds`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(clap::Args)]
pub struct Args {
    /// Address to connect to, IP:PORT (a reply64 or echo backend, directly or through a proxy).
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 1)]
    connections: u64,
    /// Measured requests in all, split evenly over the connections.
    #[arg(long)]
    requests: u64,
    /// Unmeasured requests per connection first.
    #[arg(long, default_value_t = 100)]
    warmup: u64,
    /// Time limit for the measured requests.
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
}

const GRACE: Duration = Duration::from_secs(5);

pub async fn run(a: Args) -> std::io::Result<Value> {
    let limit = crate::seconds(a.seconds)?;
    let conns = a.connections.max(1);
    let per_conn = a.requests.div_ceil(conns);
    let mut cs = Vec::new();
    for _ in 0..conns {
        let mut c = TcpStream::connect(a.target).await?;
        c.set_nodelay(true)?;
        for _ in 0..a.warmup {
            round_trip(&mut c).await?;
        }
        cs.push(c);
    }
    let start = Instant::now();
    let deadline = start + limit;
    let tasks: Vec<_> = cs
        .into_iter()
        .map(|c| {
            tokio::spawn(tokio::time::timeout(
                limit + GRACE,
                measure(c, per_conn, deadline),
            ))
        })
        .collect();
    let mut times = Vec::with_capacity(a.requests as usize);
    for t in tasks {
        match t.await {
            Ok(Ok(r)) => times.extend(r?),
            Ok(Err(_)) => {
                return Err(std::io::Error::other(
                    "a request stalled past the time limit",
                ))
            }
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    times.sort_unstable();
    let mean = times.iter().sum::<u64>() as f64 / times.len().max(1) as f64 / 1000.0;
    Ok(json!({
        "mode": "latency",
        "target": a.target.to_string(),
        "connections": conns,
        "requests": times.len(),
        "seconds": crate::round2(secs),
        "req_per_s": crate::round2(times.len() as f64 / secs),
        "mean_us": crate::round2(mean),
        "p50_us": crate::percentile_us(&times, 50.0),
        "p99_us": crate::percentile_us(&times, 99.0),
        "p999_us": crate::percentile_us(&times, 99.9),
        "max_us": crate::percentile_us(&times, 100.0),
    }))
}

async fn measure(mut c: TcpStream, n: u64, deadline: Instant) -> std::io::Result<Vec<u64>> {
    let mut times = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let t0 = Instant::now();
        if t0 >= deadline {
            break;
        }
        round_trip(&mut c).await?;
        times.push(t0.elapsed().as_nanos() as u64);
    }
    Ok(times)
}

async fn round_trip(c: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 64];
    c.write_all(&buf).await?;
    c.read_exact(&mut buf).await?;
    Ok(())
}
