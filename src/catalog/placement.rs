//! The follower's State, patched one store event at a time: a change costs what it touches (a
//! few map updates, and the records that depend on it), not a rebuild of the whole catalog.
//!
//! Placement follows the same rules as [`State::from_kvs`], which stays the reference (the unit
//! tests compare the two after every event): a record that does not decode or contradicts its
//! key is skipped; of services claiming the same VIP the oldest (lowest create revision, then
//! name) is placed and the others are skipped; rules and instances are placed only while their
//! service is. So a change to a service may move other records: the rivals for its old and new
//! VIP, and its own rules and instances when it appears or disappears. Those are placed again;
//! nothing else is looked at.
//!
//! The State's maps are persistent (`imbl`): publishing a State is a pointer copy, unchanged
//! parts stay shared between States, and a consumer can diff two States in time proportional
//! to what changed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;

use super::keys;
use super::state::{decode_record, Record};
use super::State;
use crate::store::{KeyValue, Listing, Revision};

/// A record as last seen, decoded (or why it does not decode).
#[derive(Debug, Clone)]
struct Held {
    create_revision: Revision,
    mod_revision: Revision,
    record: Result<Record, String>,
}

/// Where a skipped record's line goes in [`State::skipped`]: services first, then everything
/// else, each by creation, as a listing is read.
type SkipOrder = (u8, Revision, String);

#[derive(Debug, Default)]
pub struct Placement {
    /// Every record that can be placed (services, rules, instances, hosts), by key. VIP claims
    /// and unknown keys carry nothing the picture needs and are not kept.
    records: BTreeMap<String, Held>,
    /// Per VIP, the services that decode and claim it, as (create revision, name), sorted: the
    /// first one owns it. Almost always one: a vector, not a set (a set's node is 20 times the
    /// size).
    claims: HashMap<SocketAddr, Vec<(Revision, String)>>,
    /// The records skipped, with their line.
    skipped: BTreeMap<SkipOrder, String>,
    /// The picture so far; `skipped` is filled in when it is published.
    state: State,
}

impl Placement {
    /// The placement of a whole listing.
    pub fn new(listing: Listing) -> Placement {
        let mut p = Placement::default();
        p.reset(listing);
        p
    }

    /// The State as it stands: the maps are shared, not copied.
    pub fn state(&self) -> State {
        State {
            skipped: self.skipped.values().cloned().collect(),
            ..self.state.clone()
        }
    }

    pub fn revision(&self) -> Revision {
        self.state.revision
    }

    /// A key written at `kv.mod_revision`. A record already held at that revision is not
    /// decoded again (revisions identify values).
    pub fn put(&mut self, kv: KeyValue) {
        self.state.revision = self.state.revision.max(kv.mod_revision);
        if self
            .records
            .get(&kv.key)
            .is_some_and(|h| h.mod_revision == kv.mod_revision)
        {
            return;
        }
        let record = decode_record(&kv);
        if matches!(record, Ok(Record::Ignored)) {
            return;
        }
        let held = Held {
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            record,
        };
        self.replace(kv.key, Some(held));
    }

    /// A key deleted at `revision`.
    pub fn delete(&mut self, key: &str, revision: Revision) {
        self.state.revision = self.state.revision.max(revision);
        if self.records.contains_key(key) {
            self.replace(key.to_string(), None);
        }
    }

    /// The store's full contents, after a watch that could not resume (compaction, a lagging
    /// watcher): every key that changed is put, every key that is gone is deleted, so what
    /// did not change stays shared with earlier States.
    pub fn reset(&mut self, listing: Listing) {
        let present: HashSet<&str> = listing.kvs.iter().map(|kv| kv.key.as_str()).collect();
        let gone: Vec<String> = self
            .records
            .keys()
            .filter(|k| !present.contains(k.as_str()))
            .cloned()
            .collect();
        for key in gone {
            self.replace(key, None);
        }
        // Services first: their rules and instances are then placed once, not skipped and
        // placed again when their service arrives.
        let (services, others): (Vec<KeyValue>, Vec<KeyValue>) = listing
            .kvs
            .into_iter()
            .partition(|kv| kv.key.starts_with(keys::SERVICES));
        for kv in services.into_iter().chain(others) {
            self.put(kv);
        }
        self.state.revision = listing.revision;
    }

    /// Puts `new` (or nothing) under `key` and places again whatever that moves.
    fn replace(&mut self, key: String, new: Option<Held>) {
        let service = key.strip_prefix(keys::SERVICES).map(str::to_string);
        let was_placed = service
            .as_ref()
            .is_some_and(|name| self.state.services.contains_key(name));
        if let Some(old) = self.records.get(&key).cloned() {
            self.withdraw(&key, &old);
        }
        let old = match &new {
            Some(held) => self.records.insert(key.clone(), held.clone()),
            None => self.records.remove(&key),
        };
        let Some(name) = service else {
            self.settle(&key);
            return;
        };
        // The VIPs this service claimed and claims now: their owners may change.
        let mut rivals = BTreeSet::new();
        for (held, claim) in [(&old, false), (&new, true)] {
            let Some((vip, created)) = held.as_ref().and_then(claimed_vip) else {
                continue;
            };
            let claimants = self.claims.entry(vip).or_default();
            let claimant = (created, name.clone());
            match (claimants.binary_search(&claimant), claim) {
                (Err(at), true) => claimants.insert(at, claimant),
                (Ok(at), false) => {
                    claimants.remove(at);
                }
                _ => {}
            }
            rivals.extend(claimants.iter().map(|(_, n)| n.clone()));
            if claimants.is_empty() {
                self.claims.remove(&vip);
            }
        }
        rivals.remove(&name);
        self.settle_service(&name, was_placed);
        for rival in rivals {
            let placed = self.state.services.contains_key(&rival);
            self.settle_service(&rival, placed);
        }
    }

    /// Places a service again (`was_placed`: whether it was before this change), and its
    /// rules and instances when it appeared or disappeared.
    fn settle_service(&mut self, name: &str, was_placed: bool) {
        let key = keys::service(name);
        if let Some(held) = self.records.get(&key).cloned() {
            self.withdraw(&key, &held);
        }
        self.settle(&key);
        if was_placed == self.state.services.contains_key(name) {
            return;
        }
        let dependents: Vec<String> = [
            keys::rules_of(name),
            keys::instances_of(name),
            keys::drains_of(name),
        ]
        .iter()
        .flat_map(|prefix| {
            self.records
                .range::<String, _>(prefix.clone()..)
                .take_while(move |(k, _)| k.starts_with(prefix.as_str()))
                .map(|(k, _)| k.clone())
        })
        .collect();
        for key in dependents {
            if let Some(held) = self.records.get(&key).cloned() {
                self.withdraw(&key, &held);
            }
            self.settle(&key);
        }
    }

    /// Takes the record's placement (or skip line) out of the picture.
    fn withdraw(&mut self, key: &str, held: &Held) {
        self.skipped
            .remove(&(rank(key), held.create_revision, key.to_string()));
        // Only an entry that is there is removed: removing from a shared map copies its path
        // even when there is nothing to remove.
        match &held.record {
            Ok(Record::Service(s)) => {
                if self.state.services.contains_key(&s.name) {
                    self.state.services.remove(&s.name);
                }
            }
            Ok(Record::Rule(r)) => {
                let k = (r.service.clone(), r.name.clone());
                if self.state.rules.contains_key(&k) {
                    self.state.rules.remove(&k);
                }
            }
            Ok(Record::Instance(i)) => {
                let k = (i.service.clone(), i.name.clone());
                if self.state.instances.contains_key(&k) {
                    self.state.instances.remove(&k);
                }
            }
            Ok(Record::Host(h)) => {
                if self.state.hosts.contains_key(&h.name) {
                    self.state.hosts.remove(&h.name);
                }
            }
            Ok(Record::Drain(d)) => {
                let k = (d.service.clone(), d.instance.clone());
                if self.state.drains.contains_key(&k) {
                    self.state.drains.remove(&k);
                }
            }
            Ok(Record::Ignored) | Err(_) => {}
        }
    }

    /// Places the record held under `key`, or skips it with its reason.
    fn settle(&mut self, key: &str) {
        let Some(held) = self.records.get(key) else {
            return;
        };
        let placed = match &held.record {
            Err(why) => Err(why.clone()),
            Ok(record) => self.judge(record).map(|()| record.clone()),
        };
        let order = (rank(key), held.create_revision, key.to_string());
        match placed {
            Err(why) => {
                self.skipped.insert(order, format!("{key}: {why}"));
            }
            Ok(Record::Service(s)) => {
                self.state.services.insert(s.name.clone(), s);
            }
            Ok(Record::Rule(r)) => {
                self.state
                    .rules
                    .insert((r.service.clone(), r.name.clone()), r);
            }
            Ok(Record::Instance(i)) => {
                self.state
                    .instances
                    .insert((i.service.clone(), i.name.clone()), i);
            }
            Ok(Record::Host(h)) => {
                self.state.hosts.insert(h.name.clone(), h);
            }
            Ok(Record::Drain(d)) => {
                self.state
                    .drains
                    .insert((d.service.clone(), d.instance.clone()), d);
            }
            Ok(Record::Ignored) => {}
        }
    }

    /// Whether a record that decodes can be placed now, with the same reasons as
    /// [`State::from_kvs`].
    fn judge(&self, record: &Record) -> Result<(), String> {
        match record {
            Record::Service(s) => {
                let Some(vip) = s.address else {
                    return Ok(());
                };
                match self.claims.get(&vip).and_then(|c| c.first()) {
                    Some((_, owner)) if *owner != s.name => {
                        Err(format!("address {vip} is already used by service {owner}"))
                    }
                    _ => Ok(()),
                }
            }
            Record::Rule(r) => self.needs_service(&r.service),
            Record::Instance(i) => self.needs_service(&i.service),
            Record::Drain(d) => self.needs_service(&d.service),
            Record::Host(_) | Record::Ignored => Ok(()),
        }
    }

    fn needs_service(&self, service: &str) -> Result<(), String> {
        if self.state.services.contains_key(service) {
            Ok(())
        } else {
            Err(format!("service {service} does not exist"))
        }
    }
}

/// The VIP a held service record claims, with its creation: none for a record that does not
/// decode or a service without a VIP.
fn claimed_vip(held: &Held) -> Option<(SocketAddr, Revision)> {
    match &held.record {
        Ok(Record::Service(s)) => Some((s.address?, held.create_revision)),
        _ => None,
    }
}

/// Services are placed before the records that refer to them, and their skip lines come first.
fn rank(key: &str) -> u8 {
    if key.starts_with(keys::SERVICES) {
        0
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::catalog::Decoded;

    /// A store in miniature: keys with their create and mod revisions, as etcd keeps them.
    #[derive(Default)]
    struct Store {
        kvs: BTreeMap<String, KeyValue>,
        revision: Revision,
    }

    impl Store {
        fn put(&mut self, key: &str, value: &str) -> KeyValue {
            self.revision += 1;
            let create_revision = self
                .kvs
                .get(key)
                .map_or(self.revision, |kv| kv.create_revision);
            let kv = KeyValue {
                key: key.into(),
                value: value.as_bytes().to_vec(),
                create_revision,
                mod_revision: self.revision,
            };
            self.kvs.insert(key.into(), kv.clone());
            kv
        }

        fn delete(&mut self, key: &str) -> Option<Revision> {
            self.kvs.remove(key)?;
            self.revision += 1;
            Some(self.revision)
        }

        fn listing(&self) -> Listing {
            Listing {
                kvs: self.kvs.values().cloned().collect(),
                revision: self.revision,
            }
        }

        /// The reference: the State a fresh listing gives.
        fn fresh(&self) -> State {
            State::from_kvs(self.kvs.values(), self.revision, &mut Decoded::default())
        }
    }

    fn assert_same(patched: &State, fresh: &State, step: &str) {
        assert_eq!(patched.services, fresh.services, "services after {step}");
        assert_eq!(patched.rules, fresh.rules, "rules after {step}");
        assert_eq!(patched.instances, fresh.instances, "instances after {step}");
        assert_eq!(patched.hosts, fresh.hosts, "hosts after {step}");
        assert_eq!(patched.drains, fresh.drains, "drains after {step}");
        assert_eq!(patched.skipped, fresh.skipped, "skipped after {step}");
        assert_eq!(patched.revision, fresh.revision, "revision after {step}");
    }

    /// A random write among few names and VIPs, so that VIP clashes, records of missing
    /// services, records that do not decode or contradict their key, and services coming back
    /// all happen often.
    fn random_write(rng: &mut StdRng) -> (String, Option<String>) {
        let service = format!("s{}", rng.gen_range(0..5));
        let vip = format!("10.0.0.{}:80", rng.gen_range(1..4));
        let name = format!("n{}", rng.gen_range(0..2));
        let (key, value) = match rng.gen_range(0..11) {
            0..=2 => (
                format!("services/{service}"),
                match rng.gen_range(0..8) {
                    0 => "not json".to_string(),
                    1 => format!(r#"{{"name":"other","address":"{vip}"}}"#),
                    2 => format!(r#"{{"name":"{service}","address":"127.0.0.1:80"}}"#),
                    3 => format!(r#"{{"name":"{service}","address":"none","instance_port":80}}"#),
                    _ => format!(r#"{{"name":"{service}","address":"{vip}"}}"#),
                },
            ),
            3 | 4 => (
                format!("instances/{service}/{name}"),
                match rng.gen_range(0..6) {
                    0 => format!(
                        r#"{{"service":"{service}","name":"x","origin":"static","address":"192.0.2.1:80"}}"#
                    ),
                    n => format!(
                        r#"{{"service":"{service}","name":"{name}","origin":"static","address":"192.0.2.{n}:80"}}"#
                    ),
                },
            ),
            5 | 6 => (
                format!("rules/{service}/{name}"),
                match rng.gen_range(0..5) {
                    0 => r#"{"service":"s0","name":"n0","selector":{}}"#.to_string(),
                    n => format!(
                        r#"{{"service":"{service}","name":"{name}","selector":{{"tag":"v{n}"}}}}"#
                    ),
                },
            ),
            7 => (
                format!("hosts/h{}", rng.gen_range(0..2)),
                format!(
                    r#"{{"name":"h0","ip":"192.0.2.{}","version":"t","started_at":0}}"#,
                    rng.gen_range(1..3)
                ),
            ),
            8 => (
                format!("drains/{service}/{name}"),
                match rng.gen_range(0..4) {
                    0 => format!(r#"{{"service":"{service}","instance":"other"}}"#),
                    _ => format!(r#"{{"service":"{service}","instance":"{name}"}}"#),
                },
            ),
            _ => (format!("vips/{vip}"), service.clone()),
        };
        // A quarter of the writes are deletes.
        let value = (rng.gen_range(0..4) != 0).then_some(value);
        (key, value)
    }

    #[test]
    fn every_event_leaves_the_state_a_fresh_listing_gives() {
        for seed in 0..25 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut store = Store::default();
            let mut placement = Placement::new(store.listing());
            for step in 0..300 {
                let (key, value) = random_write(&mut rng);
                match value {
                    Some(v) => placement.put(store.put(&key, &v)),
                    None => {
                        if let Some(rev) = store.delete(&key) {
                            placement.delete(&key, rev);
                        }
                    }
                }
                // Now and then the watch is lost and the store listed again (compaction).
                if rng.gen_range(0..50) == 0 {
                    placement.reset(store.listing());
                }
                let what = format!("seed {seed} step {step} ({key})");
                assert_same(&placement.state(), &store.fresh(), &what);
            }
        }
    }

    #[test]
    fn a_reset_after_missed_events_catches_up() {
        let mut store = Store::default();
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..100 {
            if let (key, Some(v)) = random_write(&mut rng) {
                store.put(&key, &v);
            }
        }
        let mut placement = Placement::new(store.listing());
        // Events the follower never sees (its watch was compacted away): deletes and writes.
        let keys: Vec<String> = store.kvs.keys().cloned().collect();
        for key in keys.iter().step_by(3) {
            store.delete(key);
        }
        for _ in 0..50 {
            if let (key, Some(v)) = random_write(&mut rng) {
                store.put(&key, &v);
            }
        }
        placement.reset(store.listing());
        assert_same(&placement.state(), &store.fresh(), "a reset");
    }

    #[test]
    fn one_event_changes_only_its_part_of_the_state() {
        let mut store = Store::default();
        for i in 0..500 {
            store.put(
                &format!("services/s{i}"),
                &format!(
                    r#"{{"name":"s{i}","address":"10.0.{}.{}:80"}}"#,
                    i / 250,
                    i % 250 + 1
                ),
            );
            store.put(
                &format!("instances/s{i}/b0"),
                &format!(
                    r#"{{"service":"s{i}","name":"b0","origin":"static","address":"192.0.2.1:80"}}"#
                ),
            );
        }
        let mut placement = Placement::new(store.listing());
        let before = placement.state();
        placement.put(store.put(
            "instances/s7/b1",
            r#"{"service":"s7","name":"b1","origin":"static","address":"192.0.2.2:80"}"#,
        ));
        let after = placement.state();
        // The untouched maps are the same maps; the touched one differs by its one entry.
        assert!(before.services.ptr_eq(&after.services));
        assert!(before.hosts.ptr_eq(&after.hosts));
        let diff: Vec<_> = before.instances.diff(&after.instances).collect();
        assert_eq!(diff.len(), 1, "{diff:?}");
        // Removing a service takes its instances out with it, and nothing else.
        let rev = store.delete("services/s9").expect("s9 exists");
        placement.delete("services/s9", rev);
        let gone = placement.state();
        assert_eq!(after.services.diff(&gone.services).count(), 1);
        assert_eq!(after.instances.diff(&gone.instances).count(), 1);
        assert_eq!(gone.skipped, ["instances/s9/b0: service s9 does not exist"]);
        assert_same(&gone, &store.fresh(), "the delete");
    }
}
