//! loadgen: the backends and load generators of flux's benchmark suite (`scripts/bench`).
//!
//! `server` runs a backend; `bulk`, `cps` and `latency` drive load at an address and print one
//! JSON line of results on stdout; `hold` keeps idle connections open. For the control plane,
//! `seed` fills fluxd's embedded store, `ready` waits for fluxd to route what it holds and
//! `probe` waits for an address to answer. Every run is bounded in time (and in bytes or
//! requests), and a run that stalls is cut off and reported as an error rather than left hanging.

mod bulk;
mod cps;
mod hold;
mod latency;
mod probe;
mod ready;
mod seed;
mod server;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Backends and load generators for flux's benchmarks"
)]
struct Cli {
    /// Runtime worker threads (1: a single-threaded runtime).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a backend until killed.
    Server(server::Args),
    /// Throughput of long streams, in MB/s (10^6 bytes).
    Bulk(bulk::Args),
    /// Short connections per second: connect, write a request, read the reply, close.
    Cps(cps::Args),
    /// Request-reply latency on persistent connections, in microseconds.
    Latency(latency::Args),
    /// Open idle connections and hold them (memory and descriptors per connection).
    Hold(hold::Args),
    /// Wait until a request-reply through an address succeeds; print when.
    Probe(probe::Args),
    /// Wait until fluxd routes N services (rules installed, drift clean); print how long.
    Ready(ready::Args),
    /// Add services with static instances to fluxd's embedded store (fluxd stopped).
    Seed(seed::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Server(a) => server::run(a).await.map(|()| serde_json::Value::Null),
            Command::Bulk(a) => bulk::run(a).await,
            Command::Cps(a) => cps::run(a).await,
            Command::Latency(a) => latency::run(a).await,
            Command::Hold(a) => hold::run(a).await,
            Command::Probe(a) => probe::run(a).await,
            Command::Ready(a) => ready::run(a).await,
            Command::Seed(a) => seed::run(a).await,
        }
    });
    match result {
        Ok(v) => {
            if !v.is_null() {
                println!("{v}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(1)
        }
    }
}

/// A `--seconds` value as a duration (clap parses the number; this rejects what `Duration`
/// cannot hold).
fn seconds(s: f64) -> std::io::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("seconds: {e}")))
}

/// Percentiles of samples in nanoseconds, as microseconds: `p` in 0..=100, nearest rank.
fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    // The epsilon keeps 99.9% of 1000 at rank 999 despite rounding (0.999 * 1000 > 999).
    let rank = ((p / 100.0) * sorted_ns.len() as f64 - 1e-9).ceil() as usize;
    let i = rank.clamp(1, sorted_ns.len()) - 1;
    round2(sorted_ns[i] as f64 / 1000.0)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        assert_eq!(percentile_us(&v, 50.0), 500.0);
        assert_eq!(percentile_us(&v, 99.0), 990.0);
        assert_eq!(percentile_us(&v, 99.9), 999.0);
        assert_eq!(percentile_us(&v, 100.0), 1000.0);
        assert_eq!(percentile_us(&[], 50.0), 0.0);
    }
}
