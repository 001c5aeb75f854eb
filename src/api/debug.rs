//! `fluxd debug`'s view: what is installed in the kernel (each rule, and each member of the VIP
//! set and of the set of refused VIPs, annotated with its service), whether it matches what flux
//! wants (drift), the listener, and each instance's health as this host sees it.

use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::controller::guard::{RefusedRange, RefusedVip};
use crate::controller::Status;
use crate::proxy::health::HealthView;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DebugView {
    pub host: String,
    pub dataplane: bool,
    /// Where redirected connections arrive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
    /// flux's rules in the nat and filter tables.
    pub rules: Vec<RuleView>,
    /// Members of flux's VIP set, each with the service it serves.
    #[serde(default)]
    pub vips: Vec<MemberView>,
    /// Members of the set of refused VIPs (`flux-empty`): services with no instance, whose
    /// connections are refused at once.
    #[serde(default)]
    pub no_instance: Vec<MemberView>,
    /// Whether services with no instance are refused (needs ipset); when not, the proxy
    /// accepts their connections and resets them.
    #[serde(default)]
    pub refuses_empty: bool,
    /// Services forwarded by the kernel (`--forward kernel`), as last applied: where their new
    /// connections go. Absent from fluxds that know no such thing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwarded: Vec<ForwardView>,
    pub drift: DriftView,
    /// Drift repairs since fluxd started.
    pub repairs: u64,
    pub services: Vec<ServiceHealth>,
    /// Store records skipped because they do not validate.
    pub skipped: Vec<String>,
    /// Services whose VIP this host does not redirect (the VIP guard), with the reason.
    #[serde(default)]
    pub refused: Vec<RefusedVip>,
    /// VIP ranges that got no rule on this host (the VIP guard), with the reason.
    #[serde(default)]
    pub refused_ranges: Vec<RefusedRange>,
    /// Store revision the data plane was built from.
    pub revision: i64,
    /// How VIP connections reach the proxy: `bpf` (sk_lookup program, local routes) or `nat`
    /// (the rules above). Absent from a fluxd older than the bpf path, which was nat.
    #[serde(default = "nat")]
    pub steering: String,
    /// Why `nat` although `--steering auto` tried bpf.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steering_fallback: Option<String>,
    /// The bpf path as the kernel holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpf: Option<BpfView>,
    /// The DNS responder's listening addresses (`--dns-listen`), UDP and TCP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    /// flux's IPv6 nat rules as the kernel holds them (`ip6tables-save -t nat`: the services
    /// chain's rules, then the hooks); absent when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipv6_rules: Vec<String>,
}

/// The steering program, its maps and flux's local routes, read back from the kernel.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BpfView {
    /// Where the link and maps are pinned (`bpftool map dump pinned DIR/services`).
    pub pins: String,
    /// The kernel's ids (`bpftool link show id N`, `bpftool prog show id N`).
    pub link_id: u32,
    pub prog_id: u32,
    /// Attached to this network namespace.
    pub attached: bool,
    /// Pinned, so that it outlives fluxd.
    pub pinned: bool,
    /// The socket map holds fluxd's listener.
    pub socket: bool,
    /// The services maps (IPv4, then IPv6), each entry with its service.
    pub entries: Vec<EntryView>,
    /// flux's local routes (`ip [-6] route show table local proto 171`): VIP ranges, /32s
    /// and /128s.
    pub routes: Vec<String>,
    /// The interfaces whose connections are steered (lo and the bridges).
    pub ifaces: Vec<String>,
    /// The IPv6 socket map holds fluxd's IPv6 listener (absent from older fluxds' output).
    #[serde(default)]
    pub socket6: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryView {
    /// `198.18.0.10:80`.
    pub vip: String,
    /// `proxy`, or `refuse` (a service with no instance).
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleView {
    /// `nat` or `filter`.
    #[serde(default = "nat")]
    pub table: String,
    pub chain: String,
    pub rule: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The instance a kernel-forwarded service's `DNAT` rule sends to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// A kernel-forwarded service in the rules last applied.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardView {
    pub service: String,
    /// `VIP:PORT`.
    pub vip: String,
    pub instances: Vec<ForwardedInstance>,
}

/// One instance of a kernel-forwarded service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardedInstance {
    pub instance: String,
    pub address: String,
    /// False while its active check fails: no new connection is forwarded to it (its
    /// established ones go on).
    pub in_rules: bool,
}

/// The table of rules from a fluxd that did not say (it had rules in nat only).
fn nat() -> String {
    "nat".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberView {
    /// The set element, `198.18.0.10,tcp:80`.
    pub element: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DriftView {
    pub clean: bool,
    /// One line per difference; empty when clean.
    pub differences: Vec<String>,
    /// Set when the installed rules could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceHealth {
    pub service: String,
    pub address: String,
    pub instances: Vec<BackendHealth>,
    /// Its traffic control as the proxy applies it (weights, drained instances, locality,
    /// affinity); absent when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<String>,
    /// The service's own settings the proxy applies (`proxy-protocol v2; timeouts: connect
    /// 300ms`); absent when it has none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub settings: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendHealth {
    pub instance: String,
    pub address: String,
    #[serde(flatten)]
    pub health: HealthView,
}

impl DebugView {
    /// This host's view; `dataplane` is absent with `--no-dataplane`.
    pub async fn gather(host_name: &str, dataplane: Option<Arc<Status>>) -> DebugView {
        let mut view = DebugView {
            host: host_name.to_string(),
            dataplane: dataplane.is_some(),
            listener: None,
            rules: vec![],
            vips: vec![],
            no_instance: vec![],
            refuses_empty: false,
            forwarded: vec![],
            drift: DriftView::default(),
            repairs: 0,
            services: vec![],
            skipped: vec![],
            refused: vec![],
            refused_ranges: vec![],
            revision: 0,
            steering: nat(),
            steering_fallback: None,
            bpf: None,
            dns: vec![],
            ipv6_rules: vec![],
        };
        let Some(status) = dataplane else {
            view.drift.clean = true;
            return view;
        };
        view.repairs = status.repairs.load(std::sync::atomic::Ordering::Relaxed);
        let state = status.state.load();
        view.skipped = state.skipped.clone();
        view.revision = state.revision;
        let guard = status.guard.load();
        view.refused = guard.refused.values().cloned().collect();
        view.refused_ranges = guard.refused_ranges.clone();
        let routes = status.routes.load();
        for (vip, route) in routes.services.iter() {
            view.services.push(ServiceHealth {
                service: route.name.clone(),
                address: vip.to_string(),
                instances: route
                    .backends
                    .iter()
                    .map(|b| BackendHealth {
                        instance: b.instance.clone(),
                        address: b.addr.to_string(),
                        health: b.view(),
                    })
                    .collect(),
                traffic: route.traffic_summary(),
                settings: crate::proxy::udp::debug_settings(route, &status.metrics)
                    .unwrap_or_else(|| route_settings(route)),
            });
        }
        view.services.sort_by(|a, b| a.service.cmp(&b.service));
        if let Some(rules) = &status.rules {
            view.listener = Some(format!("0.0.0.0:{}", rules.proxy_port));
            view.refuses_empty = rules.reject_empty;
            view.steering_fallback = rules.steering_fallback.clone();
            view.ipv6_rules = ipv6_rules(&status).await;
            if rules.steering.is_some() {
                view.steering = "bpf".into();
                let forwarding = matches!(status.applied.lock().as_deref(), Ok(Some(_)));
                let view = gather_bpf(view, status.clone()).await;
                if !forwarding {
                    return view;
                }
                // Kernel-forwarded services keep nat rules on the bpf path: both parts count.
                let bpf = view.drift.clone();
                let mut view = gather_nat(view, status).await;
                view.drift.clean &= bpf.clean;
                view.drift.differences.splice(0..0, bpf.differences);
                view.drift.error = bpf.error.or(view.drift.error);
                return view;
            }
        }
        gather_nat(view, status).await
    }
}

/// flux's IPv6 nat rules read back from the kernel (on either steering path).
async fn ipv6_rules(status: &Arc<Status>) -> Vec<String> {
    let status = status.clone();
    let read = tokio::task::spawn_blocking(move || {
        let rules = status.rules.as_ref()?;
        let installed = rules.reader.installed6().ok()??;
        Some(installed.chain.into_iter().chain(installed.hooks).collect())
    })
    .await;
    read.ok().flatten().unwrap_or_default()
}

/// What a route carries beyond its backends, as `fluxd debug` annotates the service.
fn route_settings(route: &crate::proxy::route_table::ServiceRoute) -> String {
    let mut parts = Vec::new();
    if let Some((v, vip)) = route.proxy_protocol {
        parts.push(format!("proxy-protocol {v} (destination {vip})"));
    }
    if !route.timeouts.is_empty() {
        parts.push(format!("timeouts: {}", route.timeouts.describe()));
    }
    parts.join("; ")
}

/// The nat path's part of the view (also the bpf path's, when services are forwarded by the
/// kernel): the installed rules and sets, annotated, and drift against the ruleset last
/// applied.
async fn gather_nat(mut view: DebugView, status: Arc<Status>) -> DebugView {
    {
        if let Ok(Some(applied)) = status.applied.lock().as_deref().map(Option::as_ref) {
            view.forwarded = applied.forwards().iter().map(forward_view).collect();
        }
        // Reading the kernel's rules runs iptables-save and ipset: off the async threads. One
        // read serves both the listing and the drift (reading 10,000 set members costs tens of
        // ms).
        let kernel = tokio::task::spawn_blocking(move || {
            let rules = status.rules.as_ref()?;
            let installed = rules.netfilter.installed();
            let applied = status.applied.lock().ok().and_then(|a| a.clone());
            let drift = match (&installed, &applied) {
                (Ok(installed), Some(applied)) => {
                    Some(netfilter::Drift::between(applied, installed))
                }
                _ => None,
            };
            Some((installed, drift))
        })
        .await
        .ok()
        .flatten();
        match kernel {
            Some((Ok(installed), drift)) => {
                view.rules = netfilter::annotate(&installed)
                    .into_iter()
                    .map(|a| RuleView {
                        table: a.table.to_string(),
                        chain: a.chain,
                        rule: a.rule,
                        service: a.service,
                        instance: a.instance,
                    })
                    .collect();
                let members = |annotated: Vec<netfilter::AnnotatedMember>| {
                    annotated
                        .into_iter()
                        .map(|m| MemberView {
                            element: m.element,
                            service: m.service,
                        })
                        .collect()
                };
                view.vips = members(netfilter::annotate_set(&installed));
                view.no_instance = members(netfilter::annotate_empty_set(&installed));
                match drift {
                    Some(d) => {
                        view.drift.clean = d.is_clean();
                        view.drift.differences = drift_lines(&d);
                    }
                    None => view.drift.error = Some("no ruleset applied yet".into()),
                }
            }
            Some((Err(e), _)) => view.drift.error = Some(e.to_string()),
            None => view.drift.error = Some("rules are not managed".into()),
        }
        view
    }
}

/// The bpf path's part of the view: what the kernel holds, each map entry with its service
/// (from the routing table: a VIP:port belongs to one service), and drift against the
/// steering last applied.
async fn gather_bpf(mut view: DebugView, status: Arc<Status>) -> DebugView {
    let kernel = tokio::task::spawn_blocking(move || {
        let s = status.rules.as_ref()?.steering.clone()?;
        let installed = s.installed();
        let applied = status.steered.lock().ok().and_then(|a| a.clone());
        let names: std::collections::HashMap<_, _> = status
            .routes
            .load()
            .services
            .iter()
            .map(|(vip, r)| (*vip, r.name.clone()))
            .collect();
        Some((s, installed, applied, names))
    })
    .await
    .ok()
    .flatten();
    let Some((s, installed, applied, names)) = kernel else {
        view.drift.error = Some("rules are not managed".into());
        return view;
    };
    let installed = match installed {
        Ok(i) => i,
        Err(e) => {
            view.drift.error = Some(e.to_string());
            return view;
        }
    };
    let all = steering::interfaces::all_names().unwrap_or_default();
    view.bpf = Some(BpfView {
        pins: s.pin_dir().display().to_string(),
        link_id: installed.link.link_id,
        prog_id: installed.link.prog_id,
        attached: installed.link.attached,
        pinned: installed.link.pinned,
        socket: installed.socket,
        socket6: installed.socket6,
        entries: installed
            .services
            .iter()
            .map(|(vip, action)| EntryView {
                vip: vip.to_string(),
                action: action.map_or("unknown".to_string(), |a| a.to_string()),
                service: names.get(vip).cloned(),
            })
            .collect(),
        routes: installed
            .routes
            .iter()
            .map(|(a, l)| format!("{a}/{l}"))
            .collect(),
        ifaces: installed
            .ifaces
            .iter()
            .map(|i| match all.get(i) {
                Some(name) => format!("{name} ({i})"),
                None => format!("{i} (gone)"),
            })
            .collect(),
    });
    match applied {
        Some(applied) => {
            let d = steering::Drift::between(&applied, &installed);
            view.drift.clean = d.is_clean();
            view.drift.differences = d.lines;
        }
        None => view.drift.error = Some("no steering applied yet".into()),
    }
    view
}

fn forward_view(f: &netfilter::Forward) -> ForwardView {
    ForwardView {
        service: f.service.clone(),
        vip: f.vip.to_string(),
        instances: f
            .destinations
            .iter()
            .map(|d| ForwardedInstance {
                instance: d.instance.clone(),
                address: d.addr.to_string(),
                in_rules: !d.standby,
            })
            .collect(),
    }
}

/// One line per difference, so an operator sees which rule is missing or foreign.
fn drift_lines(d: &netfilter::Drift) -> Vec<String> {
    let mut out = Vec::new();
    if d.canary_missing {
        out.push(format!(
            "chain {} is missing (nat table wiped?)",
            netfilter::CANARY_CHAIN
        ));
    }
    if d.services_chain_missing {
        out.push(format!("chain {} is missing", netfilter::SERVICES_CHAIN));
    }
    out.extend(
        d.missing_chains
            .iter()
            .map(|c| format!("chain {c} is missing")),
    );
    out.extend(
        d.extra_chains
            .iter()
            .map(|c| format!("chain {c} is left over")),
    );
    out.extend(d.missing_rules.iter().map(|r| format!("missing: {r}")));
    out.extend(d.extra_rules.iter().map(|r| format!("extra:   {r}")));
    if d.misordered {
        out.push("rules are out of order".into());
    }
    out.extend(d.missing_hooks.iter().map(|r| format!("missing hook: {r}")));
    out.extend(d.extra_hooks.iter().map(|r| format!("extra hook:   {r}")));
    if d.reject_chain_missing {
        out.push(format!(
            "chain {} (filter) is missing",
            netfilter::REJECT_CHAIN
        ));
    }
    out.extend(
        d.missing_reject_rules
            .iter()
            .map(|r| format!("missing: {r}")),
    );
    out.extend(d.extra_reject_rules.iter().map(|r| format!("extra:   {r}")));
    if d.set_missing {
        out.push(format!("set {} is missing", netfilter::VIP_SET));
    }
    if d.set_incompatible {
        out.push(format!(
            "set {} has the wrong type (not hash:ip,port with comments)",
            netfilter::VIP_SET
        ));
    }
    if d.empty_set_missing {
        out.push(format!("set {} is missing", netfilter::EMPTY_SET));
    }
    if d.empty_set_incompatible {
        out.push(format!(
            "set {} has the wrong type (not hash:ip,port with comments)",
            netfilter::EMPTY_SET
        ));
    }
    out.extend(
        d.missing_members
            .iter()
            .map(|m| format!("missing member: {m}")),
    );
    out.extend(
        d.extra_members
            .iter()
            .map(|m| format!("extra member:   {m}")),
    );
    out
}
