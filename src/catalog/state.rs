//! The typed picture of everything in the store, built from a listing ([`State::from_kvs`], the
//! reference) or kept level with the store event by event ([`super::placement`]). Records that
//! do not validate, or contradict their key, are skipped with a reason instead of poisoning the
//! rest: the store may hold what an older or foreign writer put there.
//!
//! The maps are persistent (`imbl::OrdMap`): a copy of a State costs nothing, a changed copy
//! shares every part that did not change, and two States are compared in time proportional to
//! their difference.

use std::collections::{BTreeMap, HashMap, HashSet};

use imbl::OrdMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;

use super::keys;
use crate::model::{self, Drain, Host, Instance, Rule, Service, Validate};
use crate::store::{KeyValue, Listing, Revision};

#[derive(Debug, Clone, Default, Serialize)]
pub struct State {
    pub services: OrdMap<String, Arc<Service>>,
    /// Keyed by (service, rule name).
    #[serde(skip)]
    pub rules: OrdMap<(String, String), Arc<Rule>>,
    /// Keyed by (service, instance name).
    #[serde(skip)]
    pub instances: OrdMap<(String, String), Arc<Instance>>,
    pub hosts: OrdMap<String, Arc<Host>>,
    /// Drain marks, keyed by (service, instance name). A mark may outlive its instance (a
    /// container that stopped): it is ignored meanwhile, and back in force if the instance
    /// comes back under the same name (the same container restarted).
    #[serde(skip)]
    pub drains: OrdMap<(String, String), Arc<Drain>>,
    /// Store revision this picture was taken at.
    pub revision: Revision,
    /// Records skipped, as `key: reason`, for `fluxd debug` and the logs.
    pub skipped: Vec<String>,
}

/// One store record, decoded and checked against its own key, before it is placed in a State.
#[derive(Debug, Clone)]
pub(super) enum Record {
    Service(Arc<Service>),
    Rule(Arc<Rule>),
    Instance(Arc<Instance>),
    Host(Arc<Host>),
    Drain(Arc<Drain>),
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
        vips: &mut BTreeMap<SocketAddr, String>,
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
            Record::Drain(d) => {
                if !self.services.contains_key(&d.service) {
                    return Err(format!("service {} does not exist", d.service));
                }
                self.drains
                    .insert((d.service.clone(), d.instance.clone()), d);
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

    /// Whether `instance` of `service` carries a drain mark.
    pub fn is_drained(&self, service: &str, instance: &str) -> bool {
        self.drains
            .contains_key(&(service.to_string(), instance.to_string()))
    }

    /// The drain marks of a service, by instance name.
    pub fn drains_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Arc<Drain>> + 'a {
        self.drains
            .range((service.to_string(), String::new())..)
            .take_while(move |((s, _), _)| s == service)
            .map(|(_, d)| d)
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
pub(super) fn decode_record(kv: &KeyValue) -> Result<Record, String> {
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
    } else if let Some(rest) = key.strip_prefix(keys::DRAINS) {
        let d: Drain = decode(kv)?;
        expect(
            &format!("{}/{}", d.service, d.instance),
            rest,
            "service/instance",
        )?;
        Ok(Record::Drain(Arc::new(d)))
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

    // What follows checks each way a record is placed or skipped, with the exact report.

    /// A record written at `create` and last modified at `modified`.
    fn kv_at(key: &str, value: &str, create: i64, modified: i64) -> KeyValue {
        KeyValue {
            mod_revision: modified,
            ..kv(key, value, create)
        }
    }

    fn service_json(name: &str, vip: &str) -> String {
        format!(r#"{{"name":"{name}","address":"{vip}"}}"#)
    }

    fn rule_json(service: &str, name: &str) -> String {
        format!(r#"{{"service":"{service}","name":"{name}","selector":{{"image":"nginx"}}}}"#)
    }

    fn instance_json(service: &str, name: &str, address: &str) -> String {
        format!(
            r#"{{"service":"{service}","name":"{name}","origin":"static","address":"{address}"}}"#
        )
    }

    fn host_json(name: &str) -> String {
        format!(r#"{{"name":"{name}","ip":"192.0.2.1","version":"test","started_at":0}}"#)
    }

    fn from_kvs(kvs: &[KeyValue]) -> State {
        State::from_kvs(kvs.iter(), 100, &mut Decoded::default())
    }

    fn names<T: Clone>(map: &OrdMap<String, T>) -> Vec<&str> {
        map.keys().map(String::as_str).collect()
    }

    fn pairs<T: Clone>(map: &OrdMap<(String, String), T>) -> Vec<String> {
        map.keys().map(|(s, n)| format!("{s}/{n}")).collect()
    }

    #[test]
    fn a_skipped_record_is_reported_with_its_key_and_reason() {
        let s = from_kvs(&[
            kv("services/web", &service_json("web", "10.0.0.1:80"), 1),
            kv("services/lo", &service_json("lo", "127.0.0.1:80"), 2),
            kv("services/junk", "not json", 3),
            kv(
                "services/extra",
                r#"{"name":"extra","address":"10.0.0.3:80","colour":"red"}"#,
                4,
            ),
            kv(
                "rules/web/empty",
                r#"{"service":"web","name":"empty","selector":{}}"#,
                5,
            ),
            kv(
                "instances/web/nowhere",
                r#"{"service":"web","name":"nowhere","origin":"static"}"#,
                6,
            ),
        ]);
        assert_eq!(names(&s.services), ["web"]);
        assert_eq!(
            s.skipped,
            [
                r#"services/lo: address: must not be a loopback address (got "127.0.0.1:80")"#,
                "services/junk: body: expected ident",
                "services/extra: colour: unknown field `colour`, expected one of `name`, `address`, `protocol`, `instance_port`, `balance`, `health`, `forward`, `locality`, `affinity`, `timeouts`, `proxy_protocol`, `instance_protocol`",
                "rules/web/empty: selector: give at least one of image, tag, labels, env",
                "instances/web/nowhere: address: a static instance needs one",
            ]
        );
        assert_eq!((s.rules.len(), s.instances.len()), (0, 0));
    }

    #[test]
    fn a_record_that_contradicts_its_key_is_skipped() {
        let s = from_kvs(&[
            kv("services/web", &service_json("api", "10.0.0.1:80"), 1),
            kv("services/api", &service_json("api", "10.0.0.2:80"), 2),
            kv("rules/api/a", &rule_json("api", "b"), 3),
            kv("rules/api/c", &rule_json("web", "c"), 4),
            kv(
                "instances/api/i1",
                &instance_json("api", "i2", "192.0.2.1:80"),
                5,
            ),
            kv("hosts/h1", &host_json("h2"), 6),
        ]);
        assert_eq!(names(&s.services), ["api"]);
        assert_eq!(s.services["api"].address_text(), "10.0.0.2:80");
        assert_eq!((s.rules.len(), s.instances.len(), s.hosts.len()), (0, 0, 0));
        assert_eq!(
            s.skipped,
            [
                r#"services/web: name "api" does not match its key"#,
                r#"rules/api/a: service/name "api/b" does not match its key"#,
                r#"rules/api/c: service/name "web/c" does not match its key"#,
                r#"instances/api/i1: service/name "api/i2" does not match its key"#,
                r#"hosts/h1: name "h2" does not match its key"#,
            ]
        );
    }

    #[test]
    fn rules_and_instances_of_a_missing_service_are_skipped() {
        let s = from_kvs(&[
            kv("services/web", &service_json("web", "10.0.0.1:80"), 1),
            // Loses the VIP to web, and takes its records down with it.
            kv("services/copy", &service_json("copy", "10.0.0.1:80"), 2),
            kv("rules/gone/v1", &rule_json("gone", "v1"), 3),
            kv(
                "instances/gone/i1",
                &instance_json("gone", "i1", "192.0.2.1:80"),
                4,
            ),
            kv("rules/copy/v1", &rule_json("copy", "v1"), 5),
            kv(
                "instances/copy/i1",
                &instance_json("copy", "i1", "192.0.2.2:80"),
                6,
            ),
            kv("rules/web/v1", &rule_json("web", "v1"), 7),
        ]);
        assert_eq!(names(&s.services), ["web"]);
        assert_eq!(pairs(&s.rules), ["web/v1"]);
        assert_eq!(pairs(&s.instances), Vec::<String>::new());
        assert_eq!(
            s.skipped,
            [
                "services/copy: address 10.0.0.1:80 is already used by service web",
                "rules/gone/v1: service gone does not exist",
                "instances/gone/i1: service gone does not exist",
                "rules/copy/v1: service copy does not exist",
                "instances/copy/i1: service copy does not exist",
            ]
        );
    }

    #[test]
    fn a_vip_clash_goes_to_the_older_service_whatever_the_key_order() {
        // alpha sorts first by key but was created later; zeta was rewritten since, which does
        // not make it younger.
        let zeta = kv_at("services/zeta", &service_json("zeta", "10.0.0.1:80"), 3, 9);
        let alpha = kv("services/alpha", &service_json("alpha", "10.0.0.1:80"), 7);
        for kvs in [[zeta.clone(), alpha.clone()], [alpha, zeta]] {
            let s = from_kvs(&kvs);
            assert_eq!(names(&s.services), ["zeta"]);
            assert_eq!(
                s.skipped,
                ["services/alpha: address 10.0.0.1:80 is already used by service zeta"]
            );
        }
    }

    #[test]
    fn records_are_placed_whatever_their_order_and_revisions() {
        // A foreign writer may have written the rule and instance before their service.
        let s = from_kvs(&[
            kv(
                "instances/web/i1",
                &instance_json("web", "i1", "192.0.2.1:80"),
                1,
            ),
            kv("rules/web/v1", &rule_json("web", "v1"), 2),
            kv("hosts/h1", &host_json("h1"), 3),
            kv("services/web", &service_json("web", "10.0.0.1:80"), 4),
        ]);
        assert_eq!(s.skipped, Vec::<String>::new());
        assert_eq!(names(&s.services), ["web"]);
        assert_eq!(pairs(&s.rules), ["web/v1"]);
        assert_eq!(pairs(&s.instances), ["web/i1"]);
        assert_eq!(names(&s.hosts), ["h1"]);
        assert_eq!(s.revision, 100);
    }

    #[test]
    fn vip_claims_and_keys_of_unknown_kinds_are_ignored() {
        let s = from_kvs(&[
            kv("services/web", &service_json("web", "10.0.0.1:80"), 1),
            // The claim holds the owner's bare name, not JSON.
            kv("vips/10.0.0.1:80", "web", 1),
            kv("vips/10.0.0.9:80", "gone", 2),
            kv("config/something", "\u{0}binary", 3),
            kv("servicesx", "not json", 4),
        ]);
        assert_eq!(names(&s.services), ["web"]);
        assert_eq!(s.skipped, Vec::<String>::new());
        assert_eq!((s.rules.len(), s.instances.len(), s.hosts.len()), (0, 0, 0));
    }

    #[test]
    fn unchanged_records_are_shared_between_states() {
        let mut kvs = [
            kv("services/web", &service_json("web", "10.0.0.1:80"), 1),
            kv("rules/web/v1", &rule_json("web", "v1"), 2),
            kv(
                "instances/web/i1",
                &instance_json("web", "i1", "192.0.2.1:80"),
                3,
            ),
            kv(
                "instances/web/i2",
                &instance_json("web", "i2", "192.0.2.2:80"),
                4,
            ),
            kv("hosts/h1", &host_json("h1"), 5),
        ];
        let mut cache = Decoded::default();
        let before = State::from_kvs(kvs.iter(), 5, &mut cache);
        // i2 is written again at revision 6.
        kvs[3] = kv_at(
            "instances/web/i2",
            &instance_json("web", "i2", "192.0.2.9:80"),
            4,
            6,
        );
        let after = State::from_kvs(kvs.iter(), 6, &mut cache);
        let key = |s: &str, n: &str| (s.to_string(), n.to_string());
        assert!(Arc::ptr_eq(&before.services["web"], &after.services["web"]));
        assert!(Arc::ptr_eq(
            &before.rules[&key("web", "v1")],
            &after.rules[&key("web", "v1")]
        ));
        assert!(Arc::ptr_eq(&before.hosts["h1"], &after.hosts["h1"]));
        let i1 = key("web", "i1");
        assert!(Arc::ptr_eq(&before.instances[&i1], &after.instances[&i1]));
        let i2 = key("web", "i2");
        assert!(!Arc::ptr_eq(&before.instances[&i2], &after.instances[&i2]));
        assert_eq!(
            after.instances[&i2]
                .address
                .map(|a| a.to_string())
                .as_deref(),
            Some("192.0.2.9:80")
        );
    }

    #[test]
    fn instances_of_a_service_do_not_include_prefix_siblings() {
        let s = from_kvs(&[
            kv("services/web", &service_json("web", "10.0.0.1:80"), 1),
            kv("services/web-2", &service_json("web-2", "10.0.0.2:80"), 2),
            kv("services/we", &service_json("we", "10.0.0.3:80"), 3),
            kv(
                "instances/web/a",
                &instance_json("web", "a", "192.0.2.1:80"),
                4,
            ),
            kv(
                "instances/web/b",
                &instance_json("web", "b", "192.0.2.2:80"),
                5,
            ),
            kv(
                "instances/web-2/c",
                &instance_json("web-2", "c", "192.0.2.3:80"),
                6,
            ),
        ]);
        let of =
            |service| -> Vec<&str> { s.instances_of(service).map(|i| i.name.as_str()).collect() };
        let records_of = |service| -> Vec<&str> {
            s.instance_records_of(service)
                .map(|i| i.name.as_str())
                .collect()
        };
        assert_eq!(of("web"), ["a", "b"]);
        assert_eq!(of("web-2"), ["c"]);
        assert_eq!(of("we"), Vec::<&str>::new());
        assert_eq!(records_of("web"), ["a", "b"]);
        assert_eq!(records_of("web-2"), ["c"]);
        assert_eq!(records_of("we"), Vec::<&str>::new());
        // The records are the State's own, shared.
        let a = ("web".to_string(), "a".to_string());
        assert!(Arc::ptr_eq(
            s.instance_records_of("web")
                .next()
                .expect("web has instances"),
            &s.instances[&a]
        ));
        let rules: Vec<&str> = s.rules_of("we").map(|r| r.name.as_str()).collect();
        assert_eq!(rules, Vec::<&str>::new());
    }
}
