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
    for d in old.instances.diff(&new.instances) {
        let (DiffItem::Add((s, _), _)
        | DiffItem::Remove((s, _), _)
        | DiffItem::Update {
            new: ((s, _), _), ..
        }) = d;
        names.insert(s.clone());
    }
    names
}
