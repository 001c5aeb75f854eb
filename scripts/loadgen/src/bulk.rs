//! Bulk throughput: `streams` long connections that send to a sink (`up`) or read from a source
//! (`down`) until `bytes` in all have moved or `seconds` have passed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(clap::Args)]
pub struct Args {
    /// Address to connect to, IP:PORT.
    #[arg(long)]
    target: SocketAddr,
    /// Bytes to move in all, split evenly over the streams.
    #[arg(long)]
    bytes: u64,
    #[arg(long, default_value_t = 1)]
    streams: u64,
    #[arg(long, value_enum)]
    direction: Direction,
    /// Time limit; the run ends at whichever of bytes and seconds comes first.
    #[arg(long)]
    seconds: f64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Direction {
    /// Client to server (the server is a sink).
    Up,
    /// Server to client (the server is a source).
    Down,
}

const CHUNK: usize = 256 << 10;
/// Beyond the time limit, how long a stream may take to finish before it counts as stalled.
const GRACE: Duration = Duration::from_secs(10);

pub async fn run(a: Args) -> std::io::Result<Value> {
    let limit = crate::seconds(a.seconds)?;
    let streams = a.streams.max(1);
    let per_stream = a.bytes / streams;
    let mut conns = Vec::new();
    for _ in 0..streams {
        let c = TcpStream::connect(a.target).await?;
        c.set_nodelay(true)?;
        conns.push(c);
    }
    let start = Instant::now();
    let deadline = start + limit;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| {
            let fut = stream(c, a.direction, per_stream, deadline);
            tokio::spawn(tokio::time::timeout(limit + GRACE, fut))
        })
        .collect();
    let mut total = 0u64;
    for t in tasks {
        match t.await {
            Ok(Ok(r)) => total += r?,
            Ok(Err(_)) => {
                return Err(std::io::Error::other(
                    "a stream stalled past the time limit",
                ))
            }
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "mode": "bulk",
        "target": a.target.to_string(),
        "direction": match a.direction { Direction::Up => "up", Direction::Down => "down" },
        "streams": streams,
        "bytes": total,
        "seconds": crate::round2(secs),
        "mb_per_s": crate::round2(total as f64 / secs / 1e6),
    }))
}

async fn stream(
    mut c: TcpStream,
    dir: Direction,
    limit: u64,
    deadline: Instant,
) -> std::io::Result<u64> {
    let mut moved = 0u64;
    match dir {
        Direction::Up => {
            let buf = vec![0u8; CHUNK];
            while moved < limit && Instant::now() < deadline {
                let n = (limit - moved).min(CHUNK as u64) as usize;
                c.write_all(&buf[..n]).await?;
                moved += n as u64;
            }
            // Count only what the sink has taken: it closes once it has read everything.
            c.shutdown().await?;
            let mut rest = [0u8; 64];
            while c.read(&mut rest).await? > 0 {}
        }
        Direction::Down => {
            let mut buf = vec![0u8; CHUNK];
            while moved < limit && Instant::now() < deadline {
                let want = (limit - moved).min(CHUNK as u64) as usize;
                let n = c.read(&mut buf[..want]).await?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the source closed early",
                    ));
                }
                moved += n as u64;
            }
        }
    }
    Ok(moved)
}
