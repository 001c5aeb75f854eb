//! Waits for fluxd to route a given number of services: polls its debug view (`GET /v1/debug`,
//! what `fluxd debug --json` prints) until it lists the services, the kernel holds what steers
//! them (on the bpf path one `proxy` entry of the services map per service; on the nat path
//! one VIP set member per service, or the one rule of a VIP range) and drift is clean. Prints
//! the time from `--since-us` (when the script started fluxd) to that answer.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flux::api::client::{Client, Endpoint};
use flux::api::debug::DebugView;
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct Args {
    /// fluxd's API, unix:///PATH.
    #[arg(long)]
    api: String,
    /// Services that must be routed.
    #[arg(long)]
    services: usize,
    /// fluxd runs with this --vip-range: its one rule stands for the per-VIP set members.
    #[arg(long)]
    range: Option<String>,
    /// Wall-clock start, in microseconds since the epoch (e.g. bash's EPOCHREALTIME).
    #[arg(long)]
    since_us: u64,
    /// Poll interval, in milliseconds.
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// Give up after this long.
    #[arg(long)]
    seconds: f64,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub async fn run(a: Args) -> std::io::Result<Value> {
    let limit = crate::seconds(a.seconds)?;
    let endpoint = Endpoint::parse(&a.api).map_err(std::io::Error::other)?;
    let client = Client::new(endpoint);
    let start = Instant::now();
    let ms = |t: u64| crate::round2(t.saturating_sub(a.since_us) as f64 / 1000.0);
    let (mut polls, mut first_answer) = (0u64, None);
    let mut last = String::from("no answer");
    while start.elapsed() < limit {
        polls += 1;
        if let Ok(view) = client.get::<DebugView>("/v1/debug").await {
            let at = now_us();
            first_answer.get_or_insert(at);
            // Per VIP: the services map's entries sending to the proxy (bpf), or the members of
            // flux's VIP set (nat) that name a service.
            let rules = match &view.bpf {
                Some(bpf) => bpf
                    .entries
                    .iter()
                    .filter(|e| e.action == "proxy" && e.service.is_some())
                    .count(),
                None => view.vips.iter().filter(|m| m.service.is_some()).count(),
            };
            let installed = match (&a.range, &view.bpf) {
                (Some(range), None) => view.rules.iter().any(|r| {
                    r.chain == netfilter::SERVICES_CHAIN && r.rule.contains(&format!("-d {range} "))
                }),
                _ => rules >= a.services,
            };
            let clean = view.drift.clean && view.drift.error.is_none();
            if view.services.len() >= a.services && installed && clean {
                return Ok(json!({
                    "mode": "ready",
                    "services": view.services.len(),
                    "service_rules": rules,
                    "first_answer_ms": ms(first_answer.unwrap_or(at)),
                    "ready_ms": ms(at),
                    "polls": polls,
                }));
            }
            last = format!(
                "{} services, {rules} service rules, drift {}",
                view.services.len(),
                if clean { "clean" } else { "not clean" }
            );
        }
        tokio::time::sleep(Duration::from_millis(a.interval_ms)).await;
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "fluxd not ready after {:?} ({polls} polls; last: {last})",
            limit
        ),
    ))
}
