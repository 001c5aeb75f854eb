//! `fluxd debug`: prints the daemon's debug view for operators.

use std::fmt::Write;
use std::process::ExitCode;

use crate::api::client::{Client, ClientError, Endpoint, RemoteFlags};
use crate::api::debug::DebugView;
use crate::cli::output::table;

pub async fn main(api: &str, remote: &RemoteFlags, json: bool) -> ExitCode {
    let client = match Endpoint::parse(api)
        .map_err(|e| e.to_string())
        .and_then(|endpoint| {
            let auth = remote.auth()?;
            Client::with_auth(endpoint, &auth).map_err(|e| e.to_string())
        }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fluxd debug: {e}");
            return ExitCode::from(2);
        }
    };
    let view: DebugView = match client.get("/v1/debug").await {
        Ok(v) => v,
        Err(e) => {
            eprintln!("fluxd debug: {e}");
            return match e {
                ClientError::Rejected { .. } => ExitCode::from(2),
                _ => ExitCode::from(1),
            };
        }
    };
    if json {
        match serde_json::to_string_pretty(&view) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("fluxd debug: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        print!("{}", render(&view));
    }
    ExitCode::SUCCESS
}

fn render(v: &DebugView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "host {}  data plane {}  listener {}  store revision {}",
        v.host,
        if v.dataplane { "on" } else { "off" },
        v.listener.as_deref().unwrap_or("-"),
        v.revision
    );
    out.push_str("\nINSTALLED RULES (nat)\n");
    let rows: Vec<Vec<String>> = v
        .rules
        .iter()
        .map(|r| {
            vec![
                r.service.clone().unwrap_or_else(|| "-".into()),
                r.rule.clone(),
            ]
        })
        .collect();
    out.push_str(&table(&["SERVICE", "RULE"], &rows));
    if !v.vips.is_empty() {
        let _ = writeln!(
            out,
            "\nVIP SET {} ({} members)",
            netfilter::VIP_SET,
            v.vips.len()
        );
        let rows: Vec<Vec<String>> = v
            .vips
            .iter()
            .map(|m| {
                vec![
                    m.service.clone().unwrap_or_else(|| "-".into()),
                    m.element.clone(),
                ]
            })
            .collect();
        out.push_str(&table(&["SERVICE", "VIP"], &rows));
    }
    if !v.refused.is_empty() {
        out.push_str("\nREFUSED VIPS (VIP guard: not routed on this host)\n");
        let rows: Vec<Vec<String>> = v
            .refused
            .iter()
            .map(|r| vec![r.service.clone(), r.vip.to_string(), r.reason.clone()])
            .collect();
        out.push_str(&table(&["SERVICE", "VIP", "REASON"], &rows));
    }
    if !v.refused_ranges.is_empty() {
        out.push_str("\nREFUSED VIP RANGES (VIP guard: no rule on this host)\n");
        let rows: Vec<Vec<String>> = v
            .refused_ranges
            .iter()
            .map(|r| vec![r.range.to_string(), r.reason.clone()])
            .collect();
        out.push_str(&table(&["RANGE", "REASON"], &rows));
    }
    out.push_str("\nDRIFT\n");
    match (&v.drift.error, v.drift.clean) {
        (Some(e), _) => {
            let _ = writeln!(out, "unknown: {e}");
        }
        (None, true) => out.push_str("none: installed rules match the desired ones\n"),
        (None, false) => {
            for d in &v.drift.differences {
                let _ = writeln!(out, "{d}");
            }
        }
    }
    let _ = writeln!(out, "repairs since start: {}", v.repairs);
    out.push_str("\nINSTANCES (health as this host sees it)\n");
    let mut rows = Vec::new();
    for s in &v.services {
        for i in &s.instances {
            let h = &i.health;
            rows.push(vec![
                s.service.clone(),
                i.instance.clone(),
                i.address.clone(),
                if h.check_failing() {
                    "failing"
                } else if h.live {
                    "live"
                } else {
                    "failed"
                }
                .to_string(),
                h.failures.to_string(),
                h.retry_in_ms
                    .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into()),
                h.active.to_string(),
                h.connections.to_string(),
                h.check
                    .as_ref()
                    .map(|c| c.summary())
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
    }
    let mut header = vec![
        "SERVICE", "INSTANCE", "ADDRESS", "STATE", "FAILURES", "RETRY-IN", "ACTIVE", "TOTAL",
    ];
    // The active checks' column only when some service has one, so that hosts without
    // checks see the table they always did.
    if rows.iter().any(|r| r[8] != "-") {
        header.push("CHECK");
    } else {
        rows.iter_mut().for_each(|r| {
            r.pop();
        });
    }
    out.push_str(&table(&header, &rows));
    if !v.skipped.is_empty() {
        out.push_str("\nSKIPPED STORE RECORDS\n");
        for s in &v.skipped {
            let _ = writeln!(out, "{s}");
        }
    }
    out
}
