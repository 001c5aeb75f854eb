//! The catalog's picture of the store (`State::from_kvs`) from arbitrary keys and values, as a
//! foreign or older writer may leave them. No panic; every key is either kept (service, rule,
//! instance, host, drain mark), skipped with a reason, or ignored (VIP claims, unknown keys); kept records
//! validate and agree with their key; a rebuild from the warm cache gives the same picture.
#![no_main]

use std::collections::BTreeSet;

use flux::catalog::keys;
use flux::catalog::{Decoded, State};
use flux::model::Validate;
use flux::store::KeyValue;
use libfuzzer_sys::fuzz_target;

const PREFIXES: [&str; 7] = [
    keys::SERVICES,
    keys::RULES,
    keys::INSTANCES,
    keys::HOSTS,
    keys::DRAINS,
    keys::VIPS,
    "",
];

/// Records are separated by 0x1e; in each, the first byte picks the key prefix and a 0x1f
/// separates the rest of the key from the value. Keys are unique, as in a store listing.
fn kvs(data: &[u8]) -> Vec<KeyValue> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, rec) in data.split(|b| *b == 0x1e).enumerate() {
        let Some((sel, rest)) = rec.split_first() else {
            continue;
        };
        let (key, value) = match rest.iter().position(|b| *b == 0x1f) {
            Some(p) => (&rest[..p], &rest[p + 1..]),
            None => (rest, &[][..]),
        };
        let key = format!(
            "{}{}",
            PREFIXES[*sel as usize % PREFIXES.len()],
            String::from_utf8_lossy(key)
        );
        if !seen.insert(key.clone()) {
            continue;
        }
        // Creation order from the selector byte's high bits, so the fuzzer can reorder.
        let create = i64::from(*sel >> 3) * 1000 + i as i64;
        out.push(KeyValue {
            key,
            value: value.to_vec(),
            create_revision: create,
            mod_revision: create + 1,
        });
    }
    out
}

fn picture(s: &State) -> String {
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
        s.services, s.rules, s.instances, s.hosts, s.drains, s.skipped
    )
}

fuzz_target!(|data: &[u8]| {
    let kvs = kvs(data);
    let mut cache = Decoded::default();
    let state = State::from_kvs(kvs.iter(), 7, &mut cache);
    assert_eq!(state.revision, 7);

    let known = [
        keys::SERVICES,
        keys::RULES,
        keys::INSTANCES,
        keys::HOSTS,
        keys::DRAINS,
    ];
    let ignored = kvs
        .iter()
        .filter(|kv| !known.iter().any(|p| kv.key.starts_with(p)))
        .count();
    let kept = state.services.len()
        + state.rules.len()
        + state.instances.len()
        + state.hosts.len()
        + state.drains.len();
    assert_eq!(
        kept + state.skipped.len() + ignored,
        kvs.len(),
        "every key is kept, skipped or ignored exactly once"
    );

    for (name, s) in &state.services {
        assert_eq!(name, &s.name);
        assert!(s.validate().is_ok());
        assert!(kvs.iter().any(|kv| kv.key == keys::service(name)));
    }
    for ((svc, name), r) in &state.rules {
        assert!(r.validate().is_ok());
        assert!(state.services.contains_key(svc));
        assert_eq!(state.rules_of(svc).filter(|r| &r.name == name).count(), 1);
    }
    for ((svc, _), i) in &state.instances {
        assert!(i.validate().is_ok());
        assert!(state.services.contains_key(svc));
    }
    for h in state.hosts.values() {
        assert!(h.validate().is_ok());
    }
    for ((svc, name), d) in &state.drains {
        assert!(d.validate().is_ok());
        assert!(state.services.contains_key(svc));
        assert!(kvs.iter().any(|kv| kv.key == keys::drain(svc, name)));
    }
    // Two services never share a VIP.
    let vips: BTreeSet<_> = state.services.values().map(|s| s.address).collect();
    assert_eq!(vips.len(), state.services.len());
    // Skipped entries name their key.
    for s in &state.skipped {
        assert!(kvs.iter().any(|kv| s.starts_with(&format!("{}: ", kv.key))));
    }

    // The warm cache must not change the outcome.
    let again = State::from_kvs(kvs.iter(), 7, &mut cache);
    assert_eq!(picture(&state), picture(&again));
});
