//! What fluxd's data plane does with each service's VIP, as `fluxd debug --json` reads it back
//! from the kernel, whichever steering path is in use: on nat the members of `flux-vips`
//! (proxied) and `flux-empty` (refused), and the services inside a VIP range whose rule is
//! installed (proxied); on bpf the entries of the program's services map, each
//! counted only once its local route is in and the program is attached (and, for `proxy`, the
//! socket map holds the listener). For tests that only need "the service is routed" or "it is
//! refused"; tests of one path's own kernel state read that state themselves.

use std::net::{Ipv4Addr, SocketAddrV4};

use serde_json::Value;

/// What happens to a new connection to a service's VIP:port on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Handed to fluxd's proxy.
    Proxy,
    /// Refused at once (a `tcp` service with no instance).
    Refuse,
}

/// One service's VIP as the data plane steers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Steered {
    pub service: String,
    pub vip: SocketAddrV4,
    pub action: Action,
}

/// `steering` of the debug view: `bpf` or `nat`.
pub fn path(debug: &Value) -> &str {
    debug["steering"].as_str().unwrap_or("nat")
}

/// Every VIP the data plane steers, with its service and action, from a debug view.
pub fn from_debug(debug: &Value) -> Vec<Steered> {
    match path(debug) {
        "bpf" => from_bpf(&debug["bpf"]),
        _ => {
            let mut out = members(&debug["vips"], Action::Proxy);
            out.extend(members(&debug["no_instance"], Action::Refuse));
            out.extend(in_ranges(debug, &out));
            out
        }
    }
}

/// On nat, the services whose VIP lies in a VIP range with its rule installed (they need no
/// set member), except those already listed (refused for want of an instance) and those the
/// VIP guard refuses.
fn in_ranges(debug: &Value, listed: &[Steered]) -> Vec<Steered> {
    let ranges: Vec<(Ipv4Addr, u8)> = debug["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["rule"].as_str())
        .filter(|r| r.contains("flux vip range") && r.contains("REDIRECT"))
        .filter_map(|r| {
            let mut words = r.split_whitespace();
            words.find(|w| *w == "-d")?;
            let (a, l) = words.next()?.split_once('/')?;
            Some((a.parse().ok()?, l.parse().ok()?))
        })
        .collect();
    let refused = |service: &str| {
        debug["refused"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["service"] == service)
    };
    debug["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let service = s["service"].as_str()?;
            let vip: SocketAddrV4 = s["address"].as_str()?.parse().ok()?;
            let covered = ranges.iter().any(|r| contains(*r, *vip.ip()));
            let listed = listed.iter().any(|l| l.service == service);
            (covered && !listed && !refused(service)).then(|| Steered {
                service: service.to_string(),
                vip,
                action: Action::Proxy,
            })
        })
        .collect()
}

/// The set members of the nat path (`198.18.0.10,tcp:80`), each annotated with its service.
fn members(list: &Value, action: Action) -> Vec<Steered> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let (ip, port) = m["element"].as_str()?.split_once(",tcp:")?;
            Some(Steered {
                service: m["service"].as_str()?.to_string(),
                vip: SocketAddrV4::new(ip.parse().ok()?, port.parse().ok()?),
                action,
            })
        })
        .collect()
}

/// The services map of the bpf path: an entry steers only with its route and an attached
/// program, and a `proxy` entry only with the listener in the socket map.
fn from_bpf(bpf: &Value) -> Vec<Steered> {
    if bpf["attached"] != true {
        return Vec::new();
    }
    let routes: Vec<(Ipv4Addr, u8)> = bpf["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let (a, l) = r.as_str()?.split_once('/')?;
            Some((a.parse().ok()?, l.parse().ok()?))
        })
        .collect();
    bpf["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let vip: SocketAddrV4 = e["vip"].as_str()?.parse().ok()?;
            let action = match e["action"].as_str()? {
                "proxy" if bpf["socket"] == true => Action::Proxy,
                "refuse" => Action::Refuse,
                _ => return None,
            };
            routes
                .iter()
                .any(|r| contains(*r, *vip.ip()))
                .then(|| Steered {
                    service: e["service"].as_str().unwrap_or_default().to_string(),
                    vip,
                    action,
                })
        })
        .collect()
}

fn contains((net, len): (Ipv4Addr, u8), ip: Ipv4Addr) -> bool {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}
