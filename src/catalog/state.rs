//! The typed picture of everything in the store, rebuilt from a listing. Records that do not
//! validate, or contradict their key, are skipped with a reason instead of poisoning the rest:
//! the store may hold what an older or foreign writer put there.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddrV4;
use std::sync::Arc;

use serde::Serialize;

use super::keys;
use crate::model::{self, Host, Instance, Rule, Service, Validate};
use crate::store::{KeyValue, Listing, Revision};

#[derive(Debug, Clone, Default, Serialize)]
pub struct State {
    pub services: BTreeMap<String, Arc<Service>>,
    /// Keyed by (service, rule name).
    #[serde(skip)]
    pub rules: BTreeMap<(String, String), Arc<Rule>>,
    /// Keyed by (service, instance name).
    #[serde(skip)]
    pub instances: BTreeMap<(String, String), Arc<Instance>>,
    pub hosts: BTreeMap<String, Arc<Host>>,
    /// Store revision this picture was taken at.
    pub revision: Revision,
    /// Records skipped, as `key: reason`, for `fluxd debug` and the logs.
    pub skipped: Vec<String>,
}

/// One store record, decoded and checked against its own key, before it is placed in a State.
#[derive(Debug, Clone)]
enum Record {
    Service(Arc<Service>),
    Rule(Arc<Rule>),
    Instance(Arc<Instance>),
    Host(Arc<Host>),
    /// VIP claims and unknown keys carry nothing the picture needs.
    Ignored,
}

/// Records decoded for earlier States, by key, with the revision they were decoded at. Decoding
/// is most of the cost of a rebuild (10,000 services: about 13 ms of 20), and a change touches
/// a few records, so the follower keeps one of these and re-decodes only what changed.
#[derive(Debug, Default)]
pub struct Decoded {
    records: HashMap<String, (Revision, Result<Record, String>)>,
}

impl State {
    pub fn from_listing(listing: &Listing) -> State {
        Self::from_kvs(
            listing.kvs.iter(),
            listing.revision,
            &mut Decoded::default(),
        )
    }

    /// Builds the picture from every key, decoding only records `cache` has not seen at their
    /// current revision; keys no longer present leave the cache.
    pub fn from_kvs<'a>(
        kvs: impl Iterator<Item = &'a KeyValue>,
        revision: Revision,
        cache: &mut Decoded,
    ) -> State {
        let mut state = State {
            revision,
            ..State::default()
        };
        // Services first, in creation order, so that a VIP clash written by a foreign writer is
        // resolved in favour of the older service on every host alike.
        let mut kvs: Vec<&KeyValue> = kvs.collect();
        kvs.sort_by_key(|kv| (rank(&kv.key), kv.create_revision));
        let mut vips = BTreeMap::new();
        for kv in &kvs {
            let record = match cache.records.get(&kv.key) {
                Some((rev, record)) if *rev == kv.mod_revision => record.clone(),
                _ => {
                    let record = decode_record(kv);
                    cache
                        .records
                        .insert(kv.key.clone(), (kv.mod_revision, record.clone()));
                    record
                }
            };
            if let Err(why) = record.and_then(|r| state.place(r, &mut vips)) {
                state.skipped.push(format!("{}: {why}", kv.key));
            }
        }
        // Deleted keys leave the cache now and then rather than at every rebuild.
        if cache.records.len() > 2 * kvs.len() + 64 {
            let present: HashSet<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
            cache.records.retain(|k, _| present.contains(k.as_str()));
        }
        state
    }

    fn place(
        &mut self,
        record: Record,
        vips: &mut BTreeMap<SocketAddrV4, String>,
    ) -> Result<(), String> {
        match record {
            Record::Service(s) => {
                if let Some(vip) = s.address {
                    if let Some(owner) = vips.get(&vip) {
                        return Err(format!("address {vip} is already used by service {owner}"));
                    }
                    vips.insert(vip, s.name.clone());
                }
                self.services.insert(s.name.clone(), s);
            }
            Record::Rule(r) => {
                if !self.services.contains_key(&r.service) {
                    return Err(format!("service {} does not exist", r.service));
                }
                self.rules.insert((r.service.clone(), r.name.clone()), r);
            }
            Record::Instance(i) => {
                if !self.services.contains_key(&i.service) {
                    return Err(format!("service {} does not exist", i.service));
                }
                self.instances
                    .insert((i.service.clone(), i.name.clone()), i);
            }
            Record::Host(h) => {
                self.hosts.insert(h.name.clone(), h);
            }
            Record::Ignored => {}
        }
        Ok(())
    }

    pub fn rules_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules
            .range((service.to_string(), String::new())..)
            .take_while(move |((s, _), _)| s == service)
            .map(|(_, r)| &**r)
    }

    /// The shared instance records of a service: a record that did not change keeps its
    /// allocation from one State to the next, so consumers can tell "unchanged" by pointer.
    pub fn instance_records_of<'a>(
        &'a self,
        service: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Instance>> + 'a {
        self.instances
            .range((service.to_string(), String::new())..)
            .take_while(move |((s, _), _)| s == service)
            .map(|(_, i)| i)
    }

    pub fn instances_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Instance> + 'a {
        self.instances
            .range((service.to_string(), String::new())..)
            .take_while(move |((s, _), _)| s == service)
            .map(|(_, i)| &**i)
    }
}

/// Services must be known before the rules and instances that refer to them.
fn rank(key: &str) -> u8 {
    if key.starts_with(keys::SERVICES) {
        0
    } else {
        1
    }
}

/// Decodes a record by what its key says it is, and checks it agrees with its key.
fn decode_record(kv: &KeyValue) -> Result<Record, String> {
    let key = kv.key.as_str();
    if let Some(name) = key.strip_prefix(keys::SERVICES) {
        let s: Service = decode(kv)?;
        expect(&s.name, name, "name")?;
        Ok(Record::Service(Arc::new(s)))
    } else if let Some(rest) = key.strip_prefix(keys::RULES) {
        let r: Rule = decode(kv)?;
        expect(&format!("{}/{}", r.service, r.name), rest, "service/name")?;
        Ok(Record::Rule(Arc::new(r)))
    } else if let Some(rest) = key.strip_prefix(keys::INSTANCES) {
        let i: Instance = decode(kv)?;
        expect(&format!("{}/{}", i.service, i.name), rest, "service/name")?;
        Ok(Record::Instance(Arc::new(i)))
    } else if let Some(name) = key.strip_prefix(keys::HOSTS) {
        let h: Host = decode(kv)?;
        expect(&h.name, name, "name")?;
        Ok(Record::Host(Arc::new(h)))
    } else {
        Ok(Record::Ignored)
    }
}

fn decode<T: serde::de::DeserializeOwned + Validate>(kv: &KeyValue) -> Result<T, String> {
    model::decode(&kv.value).map_err(|e| e.to_string())
}

fn expect(found: &str, key_part: &str, field: &str) -> Result<(), String> {
    if found == key_part {
        Ok(())
    } else {
        Err(format!("{field} \"{found}\" does not match its key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, rev: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            create_revision: rev,
            mod_revision: rev,
        }
    }

    #[test]
    fn skips_bad_records_and_keeps_the_rest() {
        let kvs = [
            kv(
                "services/web",
                r#"{"name":"web","address":"10.0.0.1:80"}"#,
                1,
            ),
            kv(
                "services/dup",
                r#"{"name":"dup","address":"10.0.0.1:80"}"#,
                2,
            ),
            kv(
                "services/bad",
                r#"{"name":"bad","address":"127.0.0.1:80"}"#,
                3,
            ),
            kv(
                "services/liar",
                r#"{"name":"other","address":"10.0.0.2:80"}"#,
                4,
            ),
            kv("services/junk", "\u{0}\u{1}not json", 5),
            kv(
                "rules/web/v1",
                r#"{"service":"web","name":"v1","selector":{"image":"nginx"}}"#,
                6,
            ),
            kv(
                "rules/gone/v1",
                r#"{"service":"gone","name":"v1","selector":{"image":"x"}}"#,
                7,
            ),
        ];
        let s = State::from_kvs(kvs.iter(), 7, &mut Decoded::default());
        assert_eq!(s.services.keys().collect::<Vec<_>>(), ["web"]);
        assert_eq!(s.rules.len(), 1);
        assert_eq!(s.skipped.len(), 5, "{:?}", s.skipped);
        assert!(s
            .skipped
            .iter()
            .any(|m| m.contains("already used by service web")));
    }

    #[test]
    fn cached_records_are_redecoded_only_when_their_revision_moves() {
        let web = |addr: &str, rev| {
            kv(
                "services/web",
                &format!(r#"{{"name":"web","address":"{addr}"}}"#),
                rev,
            )
        };
        let api = kv(
            "services/api",
            r#"{"name":"api","address":"10.0.0.2:80"}"#,
            2,
        );
        let mut cache = Decoded::default();
        let s = State::from_kvs([web("10.0.0.1:80", 1), api.clone()].iter(), 2, &mut cache);
        assert_eq!(s.services["web"].address_text(), "10.0.0.1:80");
        // Same revision, different bytes: the cached decode stands (revisions identify values).
        let s = State::from_kvs([web("10.0.0.9:80", 1), api.clone()].iter(), 2, &mut cache);
        assert_eq!(s.services["web"].address_text(), "10.0.0.1:80");
        // A new revision is decoded again.
        let s = State::from_kvs([web("10.0.0.3:80", 3)].iter(), 3, &mut cache);
        assert_eq!(s.services["web"].address_text(), "10.0.0.3:80");
        // Keys that are gone leave the cache once they outnumber the present ones.
        let many: Vec<KeyValue> = (0..200)
            .map(|i| kv(&format!("hosts/h{i}"), "{}", 10 + i))
            .collect();
        State::from_kvs(many.iter(), 300, &mut cache);
        assert!(cache.records.len() >= 200);
        State::from_kvs([web("10.0.0.3:80", 3)].iter(), 301, &mut cache);
        assert_eq!(cache.records.len(), 1);
        // A cached bad record is still reported on every rebuild.
        let bad = kv("services/bad", "not json", 4);
        for _ in 0..2 {
            let s = State::from_kvs([bad.clone()].iter(), 4, &mut cache);
            assert_eq!(s.skipped.len(), 1, "{:?}", s.skipped);
        }
    }

    #[test]
    fn rules_of_does_not_leak_into_prefix_siblings() {
        let kvs = [
            kv(
                "services/web",
                r#"{"name":"web","address":"10.0.0.1:80"}"#,
                1,
            ),
            kv(
                "services/web-2",
                r#"{"name":"web-2","address":"10.0.0.2:80"}"#,
                2,
            ),
            kv(
                "rules/web/a",
                r#"{"service":"web","name":"a","selector":{"image":"x"}}"#,
                3,
            ),
            kv(
                "rules/web-2/b",
                r#"{"service":"web-2","name":"b","selector":{"image":"x"}}"#,
                4,
            ),
        ];
        let s = State::from_kvs(kvs.iter(), 4, &mut Decoded::default());
        assert_eq!(s.rules_of("web").count(), 1);
        assert_eq!(s.rules_of("web-2").count(), 1);
    }
}
