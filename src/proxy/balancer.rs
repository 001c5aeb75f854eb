//! Traffic control in the proxy's choice of instance: rule weights, drain, locality and
//! client-IP affinity (see `model::traffic`). Pure: it orders a route's backends from their
//! health as it stands, so the unit tests drive it with plain values.
//!
//! The order for one new connection (or `http` request):
//! 1. Candidates: backends neither drained (by a mark, or by their rule's weight 0) nor, with
//!    `host-only`, on another host. A service whose candidates are none refuses like a service
//!    with no instance: drain means no new traffic, never "unless nothing else is left".
//! 2. Active checks: those failing theirs are left out unless every candidate fails (panic
//!    mode, as in `route_table`).
//! 3. Tiers: with `prefer-host`, this host's candidates, then the others; else one tier.
//! 4. In a tier, the instances available now, grouped by rule: a rule is picked by weight among
//!    the rules with an available instance (weighted random, or weighted rendezvous of the
//!    client IP with affinity), then an instance of that rule by the balance policy (or
//!    rendezvous of the client IP with affinity); that rule's other instances follow, then the
//!    other rules' in the order the same draw gives them.
//! 5. Last, instances that failed and are not due for a retry yet, soonest due first, tier by
//!    tier: a connection is only refused once every candidate was tried.

use std::net::IpAddr;

/// One rule's share, as the route holds it. Static instances, which belong to no rule, form a
/// group of their own at the default weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// The rule's name, or empty for the static instances; what rendezvous hashing draws on,
    /// so every host ranks the groups alike.
    pub name: String,
    pub weight: u16,
}

/// What the balancer needs of one backend, as of now.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// Its instance name, hashed with the client IP for affinity.
    pub name: &'a str,
    /// Index into the route's groups.
    pub group: usize,
    pub local: bool,
    pub drained: bool,
    pub check_failing: bool,
    /// Not failed, or due for a retry.
    pub available: bool,
    pub retry_at_ms: u64,
    /// Active connections, for least-conn.
    pub active: u64,
}

/// How instances are picked within a rule when there is no affinity.
#[derive(Debug, Clone, Copy)]
pub enum Pick {
    /// Rotate by this counter value.
    Counter(usize),
    Random,
    LeastConn,
}

/// The traffic settings of one service.
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    /// Per group; a single group means no weighting.
    pub groups: Vec<Group>,
    pub locality: crate::model::Locality,
    pub affinity: crate::model::Affinity,
}

impl Traffic {
    /// A group's weight; a group the route does not list (a route built without traffic
    /// control) has the default.
    pub fn weight(&self, group: usize) -> u16 {
        self.groups
            .get(group)
            .map_or(crate::model::traffic::DEFAULT_WEIGHT, |g| g.weight)
    }

    /// Whether nothing differs from plain balancing over every backend: the route keeps its
    /// allocation-free path then.
    pub fn is_plain(&self) -> bool {
        self.groups.len() <= 1
            && self.locality.is_any()
            && self.affinity.is_none()
            && self.groups.iter().all(|g| g.weight > 0)
    }
}

/// The order to try `backends` in (indices), per the module's doc. `client` is the client's
/// address (affinity), `draw` a source of random numbers (weighted picks, `random`,
/// `least-conn`).
pub fn order(
    traffic: &Traffic,
    backends: &[Candidate],
    client: Option<IpAddr>,
    pick: Pick,
    draw: &mut dyn FnMut() -> u64,
) -> Vec<usize> {
    use crate::model::{Affinity, Locality};
    let weight = |c: &Candidate| traffic.weight(c.group);
    let candidates: Vec<usize> = (0..backends.len())
        .filter(|&i| {
            let c = &backends[i];
            !c.drained && weight(c) > 0 && (traffic.locality != Locality::HostOnly || c.local)
        })
        .collect();
    let panic = candidates.iter().all(|&i| backends[i].check_failing);
    let pool: Vec<usize> = candidates
        .into_iter()
        .filter(|&i| panic || !backends[i].check_failing)
        .collect();
    let tiers: Vec<Vec<usize>> = if traffic.locality == Locality::PreferHost {
        let (here, there) = pool.iter().partition(|&&i| backends[i].local);
        vec![here, there]
    } else {
        vec![pool]
    };
    let client = match traffic.affinity {
        Affinity::ClientIp => client,
        Affinity::None => None,
    };
    let mut order = Vec::new();
    for tier in &tiers {
        let avail: Vec<usize> = tier
            .iter()
            .copied()
            .filter(|&i| backends[i].available)
            .collect();
        order.extend(available_order(
            traffic, backends, &avail, client, pick, draw,
        ));
    }
    for tier in &tiers {
        let mut failed: Vec<usize> = tier
            .iter()
            .copied()
            .filter(|&i| !backends[i].available)
            .collect();
        failed.sort_by_key(|&i| backends[i].retry_at_ms);
        order.extend(failed);
    }
    order
}

/// Steps 4 of the module's doc: available instances, rule by rule.
fn available_order(
    traffic: &Traffic,
    backends: &[Candidate],
    avail: &[usize],
    client: Option<IpAddr>,
    pick: Pick,
    draw: &mut dyn FnMut() -> u64,
) -> Vec<usize> {
    // The groups present, in the order of a weighted draw without replacement.
    let mut groups: Vec<usize> = Vec::new();
    for &i in avail {
        if !groups.contains(&backends[i].group) {
            groups.push(backends[i].group);
        }
    }
    groups.sort_unstable();
    let weight = |g: usize| f64::from(traffic.weight(g));
    let groups: Vec<usize> = match client {
        Some(ip) => {
            // Weighted rendezvous: the highest -w / ln(u) wins, u uniform in (0,1) from the
            // hash; a group wins with probability proportional to its weight, over clients.
            let name = |g: usize| traffic.groups.get(g).map_or("", |g| g.name.as_str());
            let score = |g: usize| -weight(g) / unit(hash(ip, name(g))).ln();
            let mut scored: Vec<(f64, usize)> = groups.iter().map(|&g| (score(g), g)).collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0));
            scored.into_iter().map(|(_, g)| g).collect()
        }
        None => {
            let mut left = groups;
            let mut out = Vec::with_capacity(left.len());
            while !left.is_empty() {
                let total: f64 = left.iter().map(|&g| weight(g)).sum();
                let mut x = unit(draw()) * total;
                let mut at = left.len() - 1;
                for (k, &g) in left.iter().enumerate() {
                    if x < weight(g) {
                        at = k;
                        break;
                    }
                    x -= weight(g);
                }
                out.push(left.remove(at));
            }
            out
        }
    };
    let mut order = Vec::with_capacity(avail.len());
    for g in groups {
        let mut members: Vec<usize> = avail
            .iter()
            .copied()
            .filter(|&i| backends[i].group == g)
            .collect();
        match client {
            Some(ip) => {
                members.sort_by_key(|&i| std::cmp::Reverse(hash(ip, backends[i].name)));
            }
            None => {
                let n = members.len();
                let first = match pick {
                    Pick::Counter(c) => c % n,
                    Pick::Random => (draw() as usize) % n,
                    Pick::LeastConn => {
                        let a = (draw() as usize) % n;
                        let b = (draw() as usize) % n;
                        if backends[members[b]].active < backends[members[a]].active {
                            b
                        } else {
                            a
                        }
                    }
                };
                members.rotate_left(first);
            }
        }
        order.extend(members);
    }
    order
}

/// A hash of the client's address and a name that every fluxd computes alike (std's hasher is
/// seeded per process): FNV-1a, then MurmurHash3's finaliser to spread FNV's weak high bits.
pub fn hash(ip: IpAddr, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    match ip {
        IpAddr::V4(a) => a.octets().into_iter().for_each(&mut eat),
        IpAddr::V6(a) => a.octets().into_iter().for_each(&mut eat),
    }
    eat(0xff);
    name.bytes().for_each(&mut eat);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A u64 as a number in (0, 1), never 0 or 1 (its logarithm is used).
fn unit(x: u64) -> f64 {
    ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

#[cfg(test)]
#[path = "balancer_tests.rs"]
mod tests;
