//! `fluxd debug`: prints the daemon's debug view for operators.

use std::fmt::Write;
use std::process::ExitCode;

use crate::api::client::{Client, ClientError, Endpoint, RemoteFlags};
use crate::api::debug::DebugView;
use crate::api::debug::{BpfView, MemberView};
use crate::cli::output::table;

/// A set's members, each with its service.
fn members(members: &[MemberView]) -> String {
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            vec![
                m.service.clone().unwrap_or_else(|| "-".into()),
                m.element.clone(),
            ]
        })
        .collect();
    table(&["SERVICE", "VIP"], &rows)
}

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

/// The bpf path: the program's attachment, its services map with each entry's service, the
/// local routes and the steered interfaces.
fn render_bpf(out: &mut String, b: &BpfView) {
    let _ = writeln!(
        out,
        "\nSTEERING PROGRAM (sk_lookup): link {} program {}, {}, {}, {}{}; pinned under {}",
        b.link_id,
        b.prog_id,
        if b.attached {
            "attached"
        } else {
            "NOT ATTACHED"
        },
        if b.pinned { "pinned" } else { "NOT PINNED" },
        if b.socket {
            "socket map holds the listener"
        } else {
            "NO LISTENER in the socket map"
        },
        if b.socket6 {
            ", IPv6 socket map holds the IPv6 listener"
        } else {
            ""
        },
        b.pins
    );
    let _ = writeln!(
        out,
        "\nSERVICES MAP ({} entries: proxy = to the listener, refuse = RST at once)",
        b.entries.len()
    );
    let rows: Vec<Vec<String>> = b
        .entries
        .iter()
        .map(|e| {
            vec![
                e.service.clone().unwrap_or_else(|| "-".into()),
                e.vip.clone(),
                e.action.clone(),
            ]
        })
        .collect();
    out.push_str(&table(&["SERVICE", "VIP", "ACTION"], &rows));
    let _ = writeln!(
        out,
        "\nLOCAL ROUTES (table local, proto {}): {}",
        steering::routes::PROTOCOL,
        if b.routes.is_empty() {
            "none".to_string()
        } else {
            b.routes.join(" ")
        }
    );
    let _ = writeln!(out, "STEERED INTERFACES: {}", b.ifaces.join(" "));
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
    if v.dataplane {
        let _ = writeln!(out, "steering {}", v.steering);
        if let Some(why) = &v.steering_fallback {
            let _ = writeln!(out, "  ({why})");
        }
    }
    if !v.dns.is_empty() {
        let _ = writeln!(out, "dns {} (udp and tcp)", v.dns.join(" "));
    }
    if let Some(b) = &v.bpf {
        render_bpf(&mut out, b);
    }
    for name in ["nat", "filter"] {
        // On the bpf path, nat rules are only shown if there are any (kernel-forwarded
        // services, or leftovers).
        if v.bpf.is_some() && !v.rules.iter().any(|r| r.table == name) {
            continue;
        }
        let rules = || v.rules.iter().filter(|r| r.table == name);
        // The instance column only when some rule sends to one (a kernel-forwarded service's
        // DNAT), so that hosts without any see the table they always did.
        let instances = rules().any(|r| r.instance.is_some());
        let rows: Vec<Vec<String>> = rules()
            .map(|r| {
                let dash = || "-".to_string();
                let mut row = vec![r.service.clone().unwrap_or_else(dash)];
                if instances {
                    row.push(r.instance.clone().unwrap_or_else(dash));
                }
                row.push(r.rule.clone());
                row
            })
            .collect();
        // nat always, even empty (that itself says something); filter only when flux has
        // rules there.
        if name == "nat" || !rows.is_empty() {
            let _ = writeln!(out, "\nINSTALLED RULES ({name})");
            let header: &[&str] = if instances {
                &["SERVICE", "INSTANCE", "RULE"]
            } else {
                &["SERVICE", "RULE"]
            };
            out.push_str(&table(header, &rows));
        }
    }
    if !v.forwarded.is_empty() {
        out.push_str(
            "\nKERNEL-FORWARDED (iptables DNAT, no proxy: no connect retry, no per-connection counts)\n",
        );
        let rows: Vec<Vec<String>> = v
            .forwarded
            .iter()
            .flat_map(|f| {
                f.instances.iter().map(|i| {
                    vec![
                        f.service.clone(),
                        f.vip.clone(),
                        i.instance.clone(),
                        i.address.clone(),
                        if i.in_rules {
                            "new connections".to_string()
                        } else {
                            "none new: fails its health check".to_string()
                        },
                    ]
                })
            })
            .collect();
        out.push_str(&table(
            &["SERVICE", "VIP", "INSTANCE", "ADDRESS", "GETS"],
            &rows,
        ));
    }
    if !v.vips.is_empty() {
        let _ = writeln!(
            out,
            "\nVIP SET {} ({} members)",
            netfilter::VIP_SET,
            v.vips.len()
        );
        out.push_str(&members(&v.vips));
    }
    if !v.no_instance.is_empty() {
        let _ = writeln!(
            out,
            "\nREJECTED (no instance): set {} ({} members), connections refused at once",
            netfilter::EMPTY_SET,
            v.no_instance.len()
        );
        out.push_str(&members(&v.no_instance));
    }
    if v.dataplane && !v.refuses_empty {
        out.push_str(
            "\nservices with no instance are not refused (no ipset): the proxy accepts and resets their connections\n",
        );
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
    if !v.ipv6_rules.is_empty() {
        out.push_str("\nIPV6 RULES (ip6tables nat: IPv6 VIPs to the proxy)\n");
        for r in &v.ipv6_rules {
            let _ = writeln!(out, "{r}");
        }
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
    let traffic: Vec<String> = v
        .services
        .iter()
        .filter_map(|s| Some(format!("{}: {}\n", s.service, s.traffic.as_ref()?)))
        .collect();
    if !traffic.is_empty() {
        out.push_str("\nTRAFFIC CONTROL (as this host's proxy applies it)\n");
        out.extend(traffic);
    }
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
    for s in v.services.iter().filter(|s| !s.settings.is_empty()) {
        let _ = writeln!(out, "{} {}: {}", s.service, s.address, s.settings);
    }
    if !v.skipped.is_empty() {
        out.push_str("\nSKIPPED STORE RECORDS\n");
        for s in &v.skipped {
            let _ = writeln!(out, "{s}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(refuses_empty: bool) -> DebugView {
        serde_json::from_value(serde_json::json!({
            "host": "h1",
            "dataplane": true,
            "listener": "0.0.0.0:7171",
            "rules": [
                {"table": "nat", "chain": "FLUX-SERVICES", "rule": "-A FLUX-SERVICES -p tcp -m set --match-set flux-empty dst,dst -m comment --comment \"flux no instance\" -j RETURN"},
                {"chain": "OUTPUT", "rule": "-A OUTPUT -m comment --comment \"flux hook\" -j FLUX-SERVICES"},
                {"table": "filter", "chain": "FLUX-REJECT", "rule": "-A FLUX-REJECT -p tcp -m set --match-set flux-empty dst,dst -m comment --comment \"flux no instance\" -j REJECT --reject-with tcp-reset"}
            ],
            "vips": [{"element": "198.18.0.10,tcp:80", "service": "web"}],
            "no_instance": [{"element": "198.18.0.11,tcp:80", "service": "idle"}],
            "refuses_empty": refuses_empty,
            "drift": {"clean": true, "differences": []},
            "repairs": 0,
            "services": [],
            "skipped": [],
            "revision": 7
        }))
        .expect("a valid view")
    }

    #[test]
    fn shows_the_filter_rules_and_the_refused_vips() {
        let text = render(&view(true));
        let nat = text.find("INSTALLED RULES (nat)").expect(&text);
        let filter = text.find("INSTALLED RULES (filter)").expect(&text);
        let refused = text
            .find("REJECTED (no instance): set flux-empty (1 members)")
            .expect(&text);
        assert!(nat < filter && filter < refused, "{text}");
        // A rule without a table came from a fluxd with nat rules only.
        assert!(text[nat..filter].contains("-j FLUX-SERVICES"), "{text}");
        assert!(text[filter..refused].contains("REJECT --reject-with tcp-reset"));
        assert!(text[refused..]
            .lines()
            .any(|l| l.starts_with("idle") && l.ends_with("198.18.0.11,tcp:80")));
        assert!(!text.contains("not refused"), "{text}");
    }

    #[test]
    fn shows_kernel_forwarded_services_and_the_instance_of_each_rule() {
        let plain = render(&view(true));
        assert!(!plain.contains("INSTANCE  RULE") && !plain.contains("KERNEL-FORWARDED"));
        let mut v = view(true);
        v.rules.push(
            serde_json::from_value(serde_json::json!({
                "table": "nat", "chain": "FLUX-FWD-C612000C-80", "service": "bulk", "instance": "b1",
                "rule": "-A FLUX-FWD-C612000C-80 -p tcp -m comment --comment \"flux:bulk/b1\" -j DNAT --to-destination 10.0.0.1:80"
            }))
            .unwrap(),
        );
        v.forwarded = serde_json::from_value(serde_json::json!([{
            "service": "bulk", "vip": "198.18.0.12:80", "instances": [
                {"instance": "b1", "address": "10.0.0.1:80", "in_rules": true},
                {"instance": "b2", "address": "10.0.0.2:80", "in_rules": false}
            ]
        }]))
        .unwrap();
        let text = render(&v);
        assert!(text.contains("SERVICE  INSTANCE  RULE"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("bulk     b1        -A FLUX-FWD-C612000C-80")),
            "{text}"
        );
        let fwd = text.find("KERNEL-FORWARDED").expect(&text);
        assert!(text[fwd..]
            .lines()
            .any(|l| l.starts_with("bulk") && l.ends_with("new connections")));
        assert!(text[fwd..]
            .lines()
            .any(|l| l.contains("b2") && l.ends_with("none new: fails its health check")));
        // The filter table, without instances, keeps its two columns.
        assert!(
            text.contains("\nINSTALLED RULES (filter)\nSERVICE  RULE"),
            "{text}"
        );
    }

    #[test]
    fn says_when_services_with_no_instance_are_not_refused() {
        let mut v = view(false);
        v.rules.retain(|r| r.table == "nat");
        v.no_instance.clear();
        let text = render(&v);
        assert!(!text.contains("INSTALLED RULES (filter)"), "{text}");
        assert!(
            text.contains("services with no instance are not refused (no ipset)"),
            "{text}"
        );
    }
}
