use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::model::{Affinity, Locality};

/// A seeded xorshift, so a failing run can be replayed.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

fn group(name: &str, weight: u16) -> Group {
    Group {
        name: name.into(),
        weight,
    }
}

/// Instances named `{group}-{k}`, live and remote unless changed.
fn candidates<'a>(names: &'a [String], groups: &[usize]) -> Vec<Candidate<'a>> {
    names
        .iter()
        .zip(groups)
        .map(|(n, &g)| Candidate {
            name: n,
            group: g,
            local: false,
            drained: false,
            check_failing: false,
            available: true,
            retry_at_ms: 0,
            active: 0,
        })
        .collect()
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("i{i}")).collect()
}

fn traffic(groups: Vec<Group>) -> Traffic {
    Traffic {
        groups,
        ..Traffic::default()
    }
}

fn firsts(t: &Traffic, c: &[Candidate], picks: usize) -> HashMap<usize, usize> {
    let mut draw = rng(7);
    let mut counts = HashMap::new();
    for k in 0..picks {
        let o = order(t, c, None, Pick::Counter(k), &mut draw);
        *counts.entry(o[0]).or_insert(0) += 1;
    }
    counts
}

#[test]
fn rules_share_by_weight_whatever_their_instance_count() {
    // v1: three instances at 90; v2: one instance at 10.
    let n = names(4);
    let c = candidates(&n, &[0, 0, 0, 1]);
    let t = traffic(vec![group("v1", 90), group("v2", 10)]);
    let counts = firsts(&t, &c, 20_000);
    let v2 = counts.get(&3).copied().unwrap_or(0) as f64 / 20_000.0;
    assert!((0.08..0.12).contains(&v2), "v2 share {v2}");
    // Round robin within v1: its three instances alike.
    for i in 0..3 {
        let share = counts[&i] as f64 / 20_000.0;
        assert!((0.27..0.33).contains(&share), "i{i}: {share}");
    }
}

#[test]
fn every_candidate_stays_a_fallback_own_rule_first() {
    let n = names(4);
    let c = candidates(&n, &[0, 0, 1, 1]);
    let t = traffic(vec![group("v1", 50), group("v2", 50)]);
    let mut draw = rng(3);
    for k in 0..100 {
        let o = order(&t, &c, None, Pick::Counter(k), &mut draw);
        assert_eq!(o.len(), 4);
        // The first pick's rule mate comes second.
        assert_eq!(c[o[0]].group, c[o[1]].group, "{o:?}");
    }
}

#[test]
fn weight_zero_and_drain_marks_take_no_new_connection_ever() {
    let n = names(4);
    let mut c = candidates(&n, &[0, 0, 1, 1]);
    c[1].drained = true;
    let t = traffic(vec![group("v1", 100), group("v2", 0)]);
    let mut draw = rng(5);
    for k in 0..200 {
        assert_eq!(order(&t, &c, None, Pick::Counter(k), &mut draw), [0]);
    }
    // The last one failing: still only it, then nothing (a drained-only service refuses).
    c[0].available = false;
    assert_eq!(order(&t, &c, None, Pick::Counter(0), &mut draw), [0]);
    c[0].drained = true;
    assert!(order(&t, &c, None, Pick::Counter(0), &mut draw).is_empty());
}

#[test]
fn a_rule_with_no_live_instance_gives_its_share_to_the_others() {
    let n = names(3);
    let mut c = candidates(&n, &[0, 1, 1]);
    c[0].available = false;
    let t = traffic(vec![group("v1", 90), group("v2", 10)]);
    let counts = firsts(&t, &c, 1000);
    assert_eq!(counts.get(&0), None);
    assert_eq!(counts[&1] + counts[&2], 1000);
    let o = order(&t, &c, None, Pick::Counter(0), &mut rng(1));
    assert_eq!(o.last(), Some(&0), "failed instances come last: {o:?}");
}

#[test]
fn prefer_host_uses_others_only_when_none_is_live_here() {
    let n = names(4);
    let mut c = candidates(&n, &[0; 4]);
    c[2].local = true;
    c[3].local = true;
    let t = Traffic {
        groups: vec![group("", 100)],
        locality: Locality::PreferHost,
        ..Traffic::default()
    };
    let mut draw = rng(9);
    for k in 0..10 {
        let o = order(&t, &c, None, Pick::Counter(k), &mut draw);
        assert!(c[o[0]].local && c[o[1]].local, "{o:?}");
        assert_eq!(o.len(), 4, "the others remain for retries");
    }
    c[2].available = false;
    c[3].available = false;
    let o = order(&t, &c, None, Pick::Counter(0), &mut draw);
    assert!(!c[o[0]].local && !c[o[1]].local, "{o:?}");
    assert_eq!(&o[2..], [2, 3], "failed local ones last");
}

#[test]
fn host_only_never_leaves_the_host() {
    let n = names(3);
    let mut c = candidates(&n, &[0; 3]);
    c[1].local = true;
    let t = Traffic {
        groups: vec![group("", 100)],
        locality: Locality::HostOnly,
        ..Traffic::default()
    };
    assert_eq!(order(&t, &c, None, Pick::Random, &mut rng(2)), [1]);
    c[1].local = false;
    assert!(order(&t, &c, None, Pick::Random, &mut rng(2)).is_empty());
}

fn client(i: u32) -> Option<IpAddr> {
    Some(IpAddr::V4(Ipv4Addr::from(0xc612_0000 + i)))
}

#[test]
fn affinity_is_stable_and_agrees_between_independent_tables() {
    let t = Traffic {
        groups: vec![group("v1", 100)],
        affinity: Affinity::ClientIp,
        ..Traffic::default()
    };
    // Two hosts: the same instances listed in another order, other draws and counters.
    let n = names(5);
    let a = candidates(&n, &[0; 5]);
    let mut b = a.clone();
    b.reverse();
    let mut spread = HashMap::new();
    for ip in 0..500 {
        let oa = order(&t, &a, client(ip), Pick::Counter(ip as usize), &mut rng(1));
        let ob = order(&t, &b, client(ip), Pick::Random, &mut rng(99));
        assert_eq!(a[oa[0]].name, b[ob[0]].name, "client {ip}");
        let again = order(&t, &a, client(ip), Pick::Counter(7), &mut rng(5));
        assert_eq!(oa, again, "client {ip}");
        *spread.entry(a[oa[0]].name).or_insert(0) += 1;
    }
    // Clients spread over every instance, none with much more than its fifth.
    assert_eq!(spread.len(), 5, "{spread:?}");
    assert!(
        spread.values().all(|&k| (60..=140).contains(&k)),
        "{spread:?}"
    );
}

#[test]
fn affinity_fails_over_to_the_next_highest_and_back() {
    let t = Traffic {
        groups: vec![group("v1", 100)],
        affinity: Affinity::ClientIp,
        ..Traffic::default()
    };
    let n = names(4);
    let mut c = candidates(&n, &[0; 4]);
    let full = order(&t, &c, client(42), Pick::Random, &mut rng(1));
    c[full[0]].available = false;
    let failed_over = order(&t, &c, client(42), Pick::Random, &mut rng(1));
    assert_eq!(failed_over[0], full[1], "next-highest");
    assert_eq!(failed_over.last(), Some(&full[0]));
    // Others' clients did not move: only those of the failed instance do.
    let mut c2 = candidates(&n, &[0; 4]);
    for ip in 0..200 {
        let before = order(&t, &c2, client(ip), Pick::Random, &mut rng(1))[0];
        c2[full[0]].available = false;
        let after = order(&t, &c2, client(ip), Pick::Random, &mut rng(1))[0];
        c2[full[0]].available = true;
        if before != full[0] {
            assert_eq!(before, after, "client {ip}");
        }
    }
    c[full[0]].available = true;
    assert_eq!(order(&t, &c, client(42), Pick::Random, &mut rng(1)), full);
}

#[test]
fn affinity_with_weights_shares_clients_by_weight() {
    let t = Traffic {
        groups: vec![group("v1", 90), group("v2", 10)],
        affinity: Affinity::ClientIp,
        ..Traffic::default()
    };
    let n = names(4);
    let c = candidates(&n, &[0, 0, 1, 1]);
    let v2 = (0..5000)
        .filter(|&ip| c[order(&t, &c, client(ip), Pick::Random, &mut rng(1))[0]].group == 1)
        .count() as f64
        / 5000.0;
    assert!((0.08..0.12).contains(&v2), "v2 share of clients {v2}");
}

#[test]
fn a_plain_service_is_recognised() {
    assert!(traffic(vec![group("", 100)]).is_plain());
    assert!(traffic(vec![]).is_plain());
    assert!(!traffic(vec![group("", 0)]).is_plain());
    assert!(!traffic(vec![group("a", 100), group("b", 100)]).is_plain());
}

#[test]
fn the_hash_is_fixed() {
    // Every fluxd, whatever its build or process, must compute the same value.
    let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    assert_eq!(hash(ip, "web-1"), hash(ip, "web-1"));
    assert_ne!(hash(ip, "web-1"), hash(ip, "web-2"));
    // FNV-1a and the finaliser computed by hand (Python) for this input: a change to the
    // function would make hosts of two versions disagree on every client's instance.
    assert_eq!(hash(ip, "web-1"), 8_428_150_719_737_281_325);
}
