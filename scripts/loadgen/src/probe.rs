//! Waits for an address to start answering: starts a request-reply attempt (connect, write 64
//! bytes, read 64) every `interval_ms`, each on a new connection with its own timeout, until one
//! succeeds. Prints the wall-clock time of that first reply, so that the script can measure how
//! long after a change (e.g. a service added) traffic is routed.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

#[derive(clap::Args)]
pub struct Args {
    /// Address to probe, IP:PORT (a reply64 backend behind it).
    #[arg(long)]
    target: SocketAddr,
    /// Give up after this long.
    #[arg(long)]
    seconds: f64,
    /// A new attempt this often, in milliseconds.
    #[arg(long, default_value_t = 1.0)]
    interval_ms: f64,
    /// Each attempt's time limit, in milliseconds (a connect to an address nothing redirects
    /// yet is never answered; it must not hold up the attempts after it).
    #[arg(long, default_value_t = 200.0)]
    attempt_timeout_ms: f64,
}

/// Attempts in flight at most; beyond this, the probe waits for one to end.
const MAX_IN_FLIGHT: usize = 512;

pub async fn run(a: Args) -> std::io::Result<Value> {
    let limit = crate::seconds(a.seconds)?;
    let interval = crate::seconds(a.interval_ms / 1000.0)?;
    let attempt_limit = crate::seconds(a.attempt_timeout_ms / 1000.0)?;
    let start = Instant::now();
    let deadline = start + limit;
    let (tx, mut rx) = mpsc::channel::<Result<SystemTime, ()>>(MAX_IN_FLIGHT);
    let mut in_flight = 0usize;
    let (mut attempts, mut failed) = (0u64, 0u64);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = rx.recv(), if in_flight > 0 => {
                in_flight -= 1;
                match r {
                    Some(Ok(at)) => {
                        let at_us = at.duration_since(UNIX_EPOCH).map_err(std::io::Error::other)?.as_micros();
                        return Ok(json!({
                            "mode": "probe",
                            "target": a.target.to_string(),
                            "ok_at_us": at_us as u64,
                            "attempts": attempts,
                            "failed_attempts": failed,
                            "seconds": crate::round2(start.elapsed().as_secs_f64()),
                        }));
                    }
                    _ => failed += 1,
                }
            }
            _ = tick.tick(), if in_flight < MAX_IN_FLIGHT => {
                if Instant::now() >= deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("{} never answered ({attempts} attempts)", a.target),
                    ));
                }
                attempts += 1;
                in_flight += 1;
                let (tx, target) = (tx.clone(), a.target);
                tokio::spawn(async move {
                    let r = match tokio::time::timeout(attempt_limit, one(target)).await {
                        Ok(Ok(())) => Ok(SystemTime::now()),
                        _ => Err(()),
                    };
                    let _ = tx.send(r).await;
                });
            }
        }
    }
}

async fn one(target: SocketAddr) -> std::io::Result<()> {
    let mut c = TcpStream::connect(target).await?;
    c.set_nodelay(true)?;
    let mut buf = [0u8; 64];
    c.write_all(&buf).await?;
    c.read_exact(&mut buf).await?;
    Ok(())
}
