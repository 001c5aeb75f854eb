//! The catalog as this host routes it ([`routing::with_local`]), kept level with the catalog
//! and the Docker agent's view by patching only the services that changed between two syncs.
//!
//! What changed is found by comparing the last catalog State with the new one: their maps are
//! persistent and share what did not change, so the comparison skips the shared parts and
//! costs what changed, not the size of the catalog. Nothing is taken from events, so a State
//! the controller never saw (the follower coalesces, the watch channel keeps the latest only)
//! cannot leave anything behind: the next comparison includes its changes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::routing::{keeps_instance, merge_local};
use crate::catalog::State;
use crate::docker::LocalInstances;
use crate::model::Instance;

/// What [`RoutedView::update`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// Everything was rebuilt (the first sync, a host record changed, the agent's first list).
    All,
    /// These services' records or instances may differ; nothing else does.
    Services(BTreeSet<String>),
}

pub struct RoutedView {
    /// This host's name, to tell its own container instances apart.
    host: String,
    /// The catalog and the agent's view the routed state was built from, to compare the next
    /// ones with; none before the first update.
    catalog: Option<Arc<State>>,
    local: Option<Arc<LocalInstances>>,
    /// The agent's instances, each wrapped once and shared while it does not change, so a
    /// service with a local container is not rebuilt at every sync.
    local_records: BTreeMap<String, Arc<Instance>>,
    /// The routed state.
    merged: State,
}

impl RoutedView {
    pub fn new(host: &str) -> RoutedView {
        RoutedView {
            host: host.to_string(),
            catalog: None,
            local: None,
            local_records: BTreeMap::new(),
            merged: State::default(),
        }
    }

    /// The routed state: shares its maps, copying it costs nothing.
    pub fn state(&self) -> &State {
        &self.merged
    }

    /// Moves the routed state to `catalog` and `local`.
    pub fn update(&mut self, catalog: Arc<State>, local: Option<Arc<LocalInstances>>) -> Changed {
        // Other hosts' records decide which of their instances are routable, and the agent's
        // first list replaces this host's records: either starts over.
        let comparable = self.catalog.as_ref().filter(|old| {
            self.local.is_some() == local.is_some()
                && old.hosts.diff(&catalog.hosts).next().is_none()
        });
        let changed = match comparable.cloned() {
            Some(old) => {
                let mut names = catalog_changes(&old, &catalog);
                let old_local = self.local.clone();
                names.extend(self.wrap_local_changes(old_local.as_deref(), local.as_deref()));
                Some(names)
            }
            None => None,
        };
        let changed = match changed {
            Some(names) => {
                for name in &names {
                    self.patch_service(&catalog, name);
                }
                let instances = std::mem::take(&mut self.merged.instances);
                self.merged = State {
                    instances,
                    ..(*catalog).clone()
                };
                Changed::Services(names)
            }
            None => {
                self.local_records = local
                    .as_deref()
                    .map(|l| {
                        l.iter()
                            .map(|(k, i)| (k.clone(), Arc::new(i.clone())))
                            .collect()
                    })
                    .unwrap_or_default();
                let records: Option<Vec<Arc<Instance>>> = local
                    .is_some()
                    .then(|| self.local_records.values().cloned().collect());
                self.merged = merge_local(&catalog, &self.host, records.as_deref());
                Changed::All
            }
        };
        self.catalog = Some(catalog);
        self.local = local;
        changed
    }

    /// Makes the routed instances of `service` those of `catalog` and the agent.
    fn patch_service(&mut self, catalog: &State, service: &str) {
        let stale: Vec<(String, String)> = self
            .merged
            .instances
            .range((service.to_string(), String::new())..)
            .take_while(|((s, _), _)| s == service)
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            self.merged.instances.remove(&key);
        }
        if !catalog.services.contains_key(service) {
            return;
        }
        let local = self.local.is_some();
        for i in catalog.instance_records_of(service) {
            if keeps_instance(catalog, &self.host, local, i) {
                self.merged
                    .instances
                    .insert((i.service.clone(), i.name.clone()), i.clone());
            }
        }
        for i in self.local_records.values().filter(|i| i.service == service) {
            self.merged
                .instances
                .insert((i.service.clone(), i.name.clone()), i.clone());
        }
    }

    /// Brings the wrapped local instances level with `new`, returning the services of those
    /// that changed.
    fn wrap_local_changes(
        &mut self,
        old: Option<&LocalInstances>,
        new: Option<&LocalInstances>,
    ) -> BTreeSet<String> {
        let mut services = BTreeSet::new();
        let (Some(old), Some(new)) = (old, new) else {
            return services;
        };
        if std::ptr::eq(old, new) {
            return services;
        }
        for (key, i) in old {
            if new.get(key) != Some(i) {
                services.insert(i.service.clone());
                self.local_records.remove(key);
            }
        }
        for (key, i) in new {
            if old.get(key) != Some(i) {
                services.insert(i.service.clone());
                self.local_records.insert(key.clone(), Arc::new(i.clone()));
            }
        }
        services
    }
}

/// The services whose record or instances differ between two catalog states: in time
/// proportional to the difference, since the maps share what did not change.
pub fn catalog_changes(old: &State, new: &State) -> BTreeSet<String> {
    use imbl::ordmap::DiffItem;
    let mut names = BTreeSet::new();
    for d in old.services.diff(&new.services) {
        let (DiffItem::Add(k, _) | DiffItem::Remove(k, _) | DiffItem::Update { new: (k, _), .. }) =
            d;
        names.insert(k.clone());
    }
    // Instances, and the rule weights and drain marks that decide how a route shares its
    // connections, are all keyed by (service, name).
    services_differing(&old.instances, &new.instances, &mut names);
    services_differing(&old.rules, &new.rules, &mut names);
    services_differing(&old.drains, &new.drains, &mut names);
    names
}

/// Adds to `names` the service of each key that differs between two maps keyed by
/// (service, name).
fn services_differing<V: PartialEq + Clone>(
    old: &imbl::OrdMap<(String, String), V>,
    new: &imbl::OrdMap<(String, String), V>,
    names: &mut BTreeSet<String>,
) {
    use imbl::ordmap::DiffItem;
    for d in old.diff(new) {
        let (DiffItem::Add((s, _), _)
        | DiffItem::Remove((s, _), _)
        | DiffItem::Update {
            new: ((s, _), _), ..
        }) = d;
        names.insert(s.clone());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::catalog::placement::Placement;
    use crate::controller::guard::Verdict;
    use crate::controller::routing::{
        desired_rules, route_table, update_routes, with_local, Built,
    };
    use crate::metrics::Metrics;
    use crate::model::{ContainerInfo, Origin};
    use crate::proxy::route_table::RouteTable;
    use crate::store::{KeyValue, Listing};

    const HOST: &str = "host-a";

    /// A catalog fed the way the follower feeds it, one store event at a time.
    struct Catalog {
        placement: Placement,
        revision: i64,
    }

    impl Catalog {
        fn new() -> Catalog {
            Catalog {
                placement: Placement::new(Listing::default()),
                revision: 0,
            }
        }

        fn put(&mut self, key: String, value: String) {
            self.revision += 1;
            self.placement.put(KeyValue {
                key,
                value: value.into_bytes(),
                create_revision: self.revision,
                mod_revision: self.revision,
            });
        }

        /// Service `name` at `vip` with one static instance `b0` at `backend`.
        fn service(&mut self, name: &str, vip: &str, backend: &str) {
            self.put(
                format!("services/{name}"),
                format!(r#"{{"name":"{name}","address":"{vip}"}}"#),
            );
            self.put(
                format!("instances/{name}/b0"),
                format!(
                    r#"{{"service":"{name}","name":"b0","origin":"static","address":"{backend}"}}"#
                ),
            );
        }

        fn state(&self) -> Arc<State> {
            Arc::new(self.placement.state())
        }
    }

    fn vip(i: usize) -> String {
        format!("198.18.{}.{}:80", i / 250, i % 250 + 1)
    }

    /// Runs nothing and keeps every command, to see what an apply would send.
    #[derive(Default, Clone)]
    struct Recorder(Arc<Mutex<Vec<(String, String)>>>);

    impl netfilter::Runner for Recorder {
        fn run(
            &self,
            program: &str,
            args: &[&str],
            stdin: Option<&str>,
        ) -> Result<String, netfilter::Error> {
            let command = format!("{program} {}", args.join(" "));
            let input = stdin.unwrap_or_default().to_string();
            self.0.lock().unwrap().push((command, input));
            Ok(String::new())
        }
    }

    fn rules(state: &State, table: &RouteTable) -> netfilter::Ruleset {
        let verdict = Verdict::default();
        netfilter::render(&desired_rules(state, table, 7171, &[], &verdict, true))
    }

    #[test]
    fn one_new_service_rebuilds_its_route_only_and_sends_its_member_only() {
        let mut catalog = Catalog::new();
        for i in 0..300 {
            catalog.service(&format!("svc-{i}"), &vip(i), "127.0.0.1:9001");
        }
        let (metrics, mut built) = (Metrics::new(), Built::default());
        let mut view = RoutedView::new(HOST);
        assert_eq!(view.update(catalog.state(), None), Changed::All);
        let before = route_table(view.state(), &mut built, &metrics);
        let applied = rules(view.state(), &before);

        catalog.service("new-1", "198.18.200.1:80", "127.0.0.1:9001");
        let changed = view.update(catalog.state(), None);
        assert_eq!(changed, Changed::Services(["new-1".to_string()].into()));
        let Changed::Services(names) = changed else {
            unreachable!()
        };
        let mut after = before.clone();
        update_routes(view.state(), &names, &mut built, &metrics, &mut after);

        // Every other route is the very one of the last table; the new one is there.
        assert_eq!(after.by_name.len(), 301);
        for i in 0..300 {
            let name = format!("svc-{i}");
            assert!(
                Arc::ptr_eq(&before.by_name[&name], &after.by_name[&name]),
                "{name}"
            );
        }
        assert_eq!(
            after.services[&"198.18.200.1:80".parse().unwrap()].name,
            "new-1"
        );
        // The same table as from scratch.
        let fresh = route_table(view.state(), &mut Built::default(), &Metrics::new());
        let names_of = |t: &RouteTable| {
            let mut v: Vec<(String, String)> = t
                .services
                .iter()
                .map(|(vip, r)| (vip.to_string(), r.name.clone()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(names_of(&after), names_of(&fresh));

        // What reaches the kernel: the one new member, nothing else.
        let recorder = Recorder::default();
        let nf = netfilter::Netfilter::new(recorder.clone());
        nf.apply_change(&applied, &rules(view.state(), &after))
            .expect("a recorder runs anything");
        let sent = recorder.0.lock().unwrap().clone();
        assert_eq!(
            sent,
            [(
                "ipset restore -exist".to_string(),
                "add flux-vips 198.18.200.1,tcp:80 comment \"flux:new-1\"\n".to_string()
            )]
        );
    }

    fn container(service: &str, id: &str, host: &str, address: &str) -> Instance {
        Instance {
            service: service.into(),
            name: id.into(),
            origin: Origin::Container,
            host: Some(host.into()),
            rule: Some("v1".into()),
            container: Some(ContainerInfo {
                id: id.into(),
                name: format!("{service}-{id}"),
                image: "registry.example/shop".into(),
                tag: "v1".into(),
                labels: Default::default(),
                address_note: None,
            }),
            address: Some(address.parse().unwrap()),
        }
    }

    fn local(instances: &[Instance]) -> Arc<LocalInstances> {
        Arc::new(
            instances
                .iter()
                .map(|i| {
                    (
                        crate::catalog::keys::instance(&i.service, &i.name),
                        i.clone(),
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn local_containers_keep_their_records_and_routes_while_unchanged() {
        let mut catalog = Catalog::new();
        catalog.service("web", "198.18.0.1:80", "192.0.2.1:80");
        catalog.service("api", "198.18.0.2:80", "192.0.2.2:80");
        let (metrics, mut built) = (Metrics::new(), Built::default());
        let mut view = RoutedView::new(HOST);
        let c1 = container("web", "c1", HOST, "192.0.2.10:8080");
        view.update(catalog.state(), Some(local(std::slice::from_ref(&c1))));
        let mut table = route_table(view.state(), &mut built, &metrics);
        let web = table.by_name["web"].clone();

        // Another service changes, and the agent publishes the same containers anew.
        catalog.service("api", "198.18.0.2:80", "192.0.2.3:80");
        let changed = view.update(catalog.state(), Some(local(std::slice::from_ref(&c1))));
        assert_eq!(changed, Changed::Services(["api".to_string()].into()));
        let Changed::Services(names) = changed else {
            unreachable!()
        };
        update_routes(view.state(), &names, &mut built, &metrics, &mut table);
        assert!(
            Arc::ptr_eq(&web, &table.by_name["web"]),
            "web was not rebuilt"
        );

        // A container that changes is routed as the agent has it, and only its service moves.
        let c1b = container("web", "c1", HOST, "192.0.2.11:8080");
        let c2 = container("api", "c2", HOST, "192.0.2.12:8080");
        let locals = local(&[c1b, c2]);
        let changed = view.update(catalog.state(), Some(locals.clone()));
        assert_eq!(
            changed,
            Changed::Services(["api".to_string(), "web".to_string()].into())
        );
        let fresh = with_local(&catalog.state(), HOST, Some(&locals));
        assert_eq!(view.state().instances, fresh.instances);
        assert_eq!(view.state().services, fresh.services);
    }

    /// Rule weights and drain marks change how a route shares its connections: a change to
    /// either rebuilds that service's route, and only that one.
    #[test]
    fn a_weight_or_a_drain_mark_rebuilds_its_service_only() {
        let mut catalog = Catalog::new();
        catalog.service("web", "198.18.0.1:80", "192.0.2.1:80");
        catalog.service("api", "198.18.0.2:80", "192.0.2.2:80");
        let (metrics, mut built) = (Metrics::new(), Built::default());
        let mut view = RoutedView::new(HOST);
        view.update(catalog.state(), None);
        let mut table = route_table(view.state(), &mut built, &metrics);
        let api = table.by_name["api"].clone();
        for (key, value, summary) in [
            (
                "rules/web/v1",
                r#"{"service":"web","name":"v1","selector":{"tag":"1"},"weight":0}"#,
                "weights (static)=100 v1=0",
            ),
            (
                "drains/web/b0",
                r#"{"service":"web","instance":"b0"}"#,
                "weights (static)=100 v1=0; drained b0",
            ),
        ] {
            catalog.put(key.to_string(), value.to_string());
            let changed = view.update(catalog.state(), None);
            assert_eq!(changed, Changed::Services(["web".to_string()].into()));
            let Changed::Services(names) = changed else {
                unreachable!()
            };
            update_routes(view.state(), &names, &mut built, &metrics, &mut table);
            assert_eq!(
                table.by_name["web"].traffic_summary().as_deref(),
                Some(summary)
            );
            assert!(Arc::ptr_eq(&api, &table.by_name["api"]), "api rebuilt");
        }
    }

    #[test]
    fn a_host_change_or_the_agents_first_list_starts_over() {
        let mut catalog = Catalog::new();
        catalog.service("web", "198.18.0.1:80", "192.0.2.1:80");
        let mut view = RoutedView::new(HOST);
        view.update(catalog.state(), None);
        catalog.put(
            "hosts/host-b".into(),
            r#"{"name":"host-b","ip":"192.0.2.9","version":"t","started_at":0}"#.into(),
        );
        assert_eq!(view.update(catalog.state(), None), Changed::All);
        assert_eq!(view.update(catalog.state(), Some(local(&[]))), Changed::All);
        assert_eq!(
            view.update(catalog.state(), Some(local(&[]))),
            Changed::Services(Default::default())
        );
    }
}
