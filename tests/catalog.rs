//! The catalog over a real store (the embedded one, in a temporary directory; etcd as well for
//! traffic control): each write is one transaction that keeps the catalog consistent (a VIP
//! claimed by one service, nothing left behind by a removal, nothing written by a refusal), and
//! the follower's `State` follows the writes.
//!
//! Here rather than beside `catalog/mod.rs` and `catalog/follow.rs`: opening and closing the
//! embedded store leaves a few MiB of free heap in the allocator, which the library's
//! `daemon::memory` unit test, reading the process's free heap, would count as its own.

mod support;

use std::sync::Arc;
use std::time::Duration;

use flux::catalog::follow::Follower;
use flux::catalog::{keys, Catalog, CatalogError, State};
use flux::model::{self, Host, Instance, Origin, Rule, Selector, Service};
use flux::store::embedded::EmbeddedStore;
use flux::store::{Listing, Store};
use tokio::sync::watch;

/// How long a write may take to reach the follower's State before the test fails.
const WAIT: Duration = Duration::from_secs(10);

/// An embedded store in a fresh temporary directory, which lives as long as the store.
struct TempStore {
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

async fn temp_store() -> TempStore {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = EmbeddedStore::open(dir.path())
        .await
        .expect("the embedded store opens");
    TempStore {
        store: Arc::new(store),
        _dir: dir,
    }
}

fn service(name: &str, vip: &str) -> Service {
    Service {
        name: name.into(),
        address: Some(vip.parse().expect("test VIPs are valid")),
        protocol: Default::default(),
        instance_port: None,
        balance: Default::default(),
        health: None,
        forward: Default::default(),
        locality: Default::default(),
        affinity: Default::default(),
        timeouts: Default::default(),
        proxy_protocol: None,
        instance_protocol: None,
    }
}

fn rule(service: &str, name: &str, image: &str) -> Rule {
    Rule {
        service: service.into(),
        name: name.into(),
        selector: Selector {
            image: Some(image.into()),
            ..Selector::default()
        },
        instance_port: None,
        weight: None,
    }
}

fn static_instance(service: &str, name: &str, address: &str) -> Instance {
    Instance::new_static(
        service,
        name,
        address.parse().expect("test addresses are valid"),
    )
}

/// A container instance as host-a's agent writes it.
fn container(service: &str, id: &str) -> Instance {
    Instance {
        origin: Origin::Container,
        host: Some("host-a".into()),
        rule: Some("v1".into()),
        ..static_instance(service, id, "192.0.2.50:32768")
    }
}

async fn listing(store: &Arc<dyn Store>) -> Listing {
    store.list("").await.expect("the store lists")
}

fn key_names(listing: &Listing) -> Vec<&str> {
    listing.kvs.iter().map(|kv| kv.key.as_str()).collect()
}

/// The error's kind and text, e.g. `Conflict: name: ...`.
fn refusal(e: CatalogError) -> String {
    let kind = match e {
        CatalogError::Invalid(_) => "Invalid",
        CatalogError::NotFound(_) => "NotFound",
        CatalogError::Conflict(_) => "Conflict",
        CatalogError::Store(_) => "Store",
    };
    format!("{kind}: {e}")
}

#[tokio::test]
async fn adding_a_service_claims_its_vip_in_the_same_transaction() {
    let t = temp_store().await;
    let catalog = Catalog::new(t.store.clone());
    let web = service("web", "198.18.0.10:80");
    catalog.add_service(&web).await.expect("added");
    let l = listing(&t.store).await;
    assert_eq!(key_names(&l), ["services/web", "vips/198.18.0.10:80"]);
    assert_eq!(l.kvs[1].value, b"web", "the claim names its owner");
    assert_eq!(l.kvs[0].mod_revision, l.kvs[1].mod_revision);
    assert_eq!(l.kvs[0].mod_revision, l.revision, "one transaction");
    let state = catalog.load().await.expect("loads");
    assert_eq!(*state.services["web"], web);
}

#[tokio::test]
async fn a_second_service_on_the_same_vip_or_with_the_same_name_is_refused_and_writes_nothing() {
    let t = temp_store().await;
    let catalog = Catalog::new(t.store.clone());
    catalog
        .add_service(&service("web", "198.18.0.10:80"))
        .await
        .expect("added");
    let before = listing(&t.store).await;
    let same_vip = service("api", "198.18.0.10:80");
    assert_eq!(
        refusal(catalog.add_service(&same_vip).await.unwrap_err()),
        r#"Conflict: address: already used by service web (got "198.18.0.10:80")"#
    );
    let same_name = service("web", "198.18.0.11:80");
    assert_eq!(
        refusal(catalog.add_service(&same_name).await.unwrap_err()),
        r#"Conflict: name: a service with this name already exists (got "web")"#
    );
    assert_eq!(listing(&t.store).await, before);
}

#[tokio::test]
async fn removing_a_service_removes_its_rules_instances_and_vip_claim() {
    let t = temp_store().await;
    let catalog = Catalog::new(t.store.clone());
    // web-2 shares web's key prefixes but none of its records.
    for (name, vip) in [("web", "198.18.0.10:80"), ("web-2", "198.18.0.11:80")] {
        catalog
            .add_service(&service(name, vip))
            .await
            .expect("added");
        catalog
            .put_rule(&rule(name, "v1", "nginx"))
            .await
            .expect("put");
        let vm = static_instance(name, "vm-1", "192.0.2.7:80");
        catalog.add_static_instance(&vm).await.expect("added");
    }
    let c1 = container("web", "c1");
    let key = keys::instance(&c1.service, &c1.name);
    t.store.put(&key, model::encode(&c1)).await.expect("put");

    catalog.remove_service("web").await.expect("removed");
    assert_eq!(
        key_names(&listing(&t.store).await),
        [
            "instances/web-2/vm-1",
            "rules/web-2/v1",
            "services/web-2",
            "vips/198.18.0.11:80",
        ]
    );
    // The VIP is free again.
    let api = service("api", "198.18.0.10:80");
    catalog.add_service(&api).await.expect("added");
}

#[tokio::test]
async fn writes_about_a_missing_service_are_not_found_and_write_nothing() {
    let t = temp_store().await;
    let catalog = Catalog::new(t.store.clone());
    let before = listing(&t.store).await;
    let gone = r#"NotFound: service: no service of this name (got "gone")"#;
    let vm = static_instance("gone", "vm-1", "192.0.2.7:80");
    let results = [
        catalog.remove_service("gone").await,
        catalog.put_rule(&rule("gone", "v1", "nginx")).await,
        catalog.remove_rule("gone", "v1").await,
        catalog.add_static_instance(&vm).await,
        catalog.remove_static_instance("gone", "vm-1").await,
    ];
    for result in results {
        assert_eq!(refusal(result.unwrap_err()), gone);
    }
    assert_eq!(listing(&t.store).await, before);
}

#[tokio::test]
async fn rules_and_static_instances_come_and_go_by_name() {
    let t = temp_store().await;
    let catalog = Catalog::new(t.store.clone());
    catalog
        .add_service(&service("web", "198.18.0.10:80"))
        .await
        .expect("added");
    // A rule is replaced by one of the same name.
    catalog
        .put_rule(&rule("web", "v1", "nginx"))
        .await
        .expect("put");
    catalog
        .put_rule(&rule("web", "v1", "httpd"))
        .await
        .expect("put");
    let state = catalog.load().await.expect("loads");
    let images: Vec<_> = state.rules_of("web").map(|r| &r.selector.image).collect();
    assert_eq!(images, [&Some("httpd".to_string())]);
    // A static instance is not: the second of the same name is refused.
    let vm = static_instance("web", "vm-1", "192.0.2.7:80");
    catalog.add_static_instance(&vm).await.expect("added");
    let again = static_instance("web", "vm-1", "192.0.2.8:80");
    assert_eq!(
        refusal(catalog.add_static_instance(&again).await.unwrap_err()),
        r#"Conflict: name: the service already has an instance of this name (got "vm-1")"#
    );
    let state = catalog.load().await.expect("loads");
    assert_eq!(state.instances_of("web").collect::<Vec<_>>(), [&vm]);
    // Both go once.
    catalog.remove_rule("web", "v1").await.expect("removed");
    catalog
        .remove_static_instance("web", "vm-1")
        .await
        .expect("removed");
    assert_eq!(
        refusal(catalog.remove_rule("web", "v1").await.unwrap_err()),
        r#"NotFound: rule: service web has no such rule (got "v1")"#
    );
    assert_eq!(
        refusal(
            catalog
                .remove_static_instance("web", "vm-1")
                .await
                .unwrap_err()
        ),
        r#"NotFound: name: service web has no such instance (got "vm-1")"#
    );
    assert_eq!(
        key_names(&listing(&t.store).await),
        ["services/web", "vips/198.18.0.10:80"]
    );
}

#[tokio::test]
async fn a_container_instance_is_not_removed_by_hand() {
    let t = temp_store().await;
    let catalog = Catalog::new(t.store.clone());
    catalog
        .add_service(&service("web", "198.18.0.10:80"))
        .await
        .expect("added");
    let c1 = container("web", "c1");
    let key = keys::instance(&c1.service, &c1.name);
    t.store.put(&key, model::encode(&c1)).await.expect("put");
    let before = listing(&t.store).await;
    assert_eq!(
        refusal(
            catalog
                .remove_static_instance("web", "c1")
                .await
                .unwrap_err()
        ),
        r#"Invalid: name: is a container instance: stop the container or deselect its rule (got "c1")"#
    );
    assert_eq!(listing(&t.store).await, before);
}

#[tokio::test]
async fn a_host_is_registered_on_the_session_and_leaves_with_it() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let open = || async {
        let store = EmbeddedStore::open(dir.path()).await.expect("opens");
        Arc::new(store) as Arc<dyn Store>
    };
    let host = Host {
        name: "host-a".into(),
        ip: "192.0.2.1".parse().expect("valid"),
        network_mode: Default::default(),
        version: "test".into(),
        commit: None,
        started_at: 1,
        http: None,
    };
    let store = open().await;
    let catalog = Catalog::new(store.clone());
    // Without a session there is nothing to bind the record to.
    let refused = catalog.register_host(&host).await;
    assert!(
        matches!(refused, Err(CatalogError::Store(_))),
        "{refused:?}"
    );
    store
        .start_session(Duration::from_secs(10))
        .await
        .expect("a session");
    catalog.register_host(&host).await.expect("registered");
    let state = catalog.load().await.expect("loads");
    let hosts: Vec<&Host> = state.hosts.values().map(|h| &**h).collect();
    assert_eq!(hosts, [&host]);
    // A clean stop takes the host's record with it.
    store.close(true).await.expect("closed");
    drop((catalog, store));
    assert_eq!(key_names(&listing(&open().await).await), Vec::<&str>::new());
}

// ---------------------------------------------------------------------------------------------
// The follower

/// The first State from `states` (the current one included) for which `what` holds.
async fn state_where(
    states: &mut watch::Receiver<Arc<State>>,
    what: impl Fn(&State) -> bool,
) -> Arc<State> {
    let state = tokio::time::timeout(WAIT, states.wait_for(|s| what(s)))
        .await
        .expect("the follower publishes it in time")
        .expect("the follower is alive");
    state.clone()
}

fn instance_names(state: &State) -> Vec<String> {
    state
        .instances
        .keys()
        .map(|(s, n)| format!("{s}/{n}"))
        .collect()
}

#[tokio::test]
async fn the_first_state_is_the_store_as_listed() {
    let t = temp_store().await;
    let catalog = Catalog::new(t.store.clone());
    let web = service("web", "198.18.0.10:80");
    catalog.add_service(&web).await.expect("added");
    let (_follower, states) = Follower::start(t.store.clone()).await.expect("starts");
    let state = states.borrow().clone();
    assert_eq!(state.services.keys().collect::<Vec<_>>(), ["web"]);
    assert_eq!(
        state.revision,
        t.store.list("").await.expect("lists").revision
    );
}

#[tokio::test]
async fn the_state_follows_every_write() {
    let t = temp_store().await;
    let catalog = Catalog::new(t.store.clone());
    let (follower, mut states) = Follower::start(t.store.clone()).await.expect("starts");
    let (stop, stopped) = watch::channel(false);
    let run = tokio::spawn(follower.run(stopped));

    catalog
        .add_service(&service("web", "198.18.0.10:80"))
        .await
        .expect("added");
    let vm = static_instance("web", "vm-1", "192.0.2.7:80");
    catalog.add_static_instance(&vm).await.expect("added");
    let state = state_where(&mut states, |s| !s.instances.is_empty()).await;
    assert_eq!(state.services.keys().collect::<Vec<_>>(), ["web"]);
    assert_eq!(instance_names(&state), ["web/vm-1"]);
    let revision = t.store.list("").await.expect("lists").revision;
    assert_eq!(state.revision, revision);

    catalog.remove_service("web").await.expect("removed");
    let state = state_where(&mut states, |s| s.revision > revision).await;
    assert!(state.services.is_empty(), "{state:?}");
    assert_eq!(instance_names(&state), Vec::<String>::new());

    stop.send_replace(true);
    tokio::time::timeout(WAIT, run)
        .await
        .expect("a stopped follower returns")
        .expect("the follower did not panic");
}

#[tokio::test]
async fn unchanged_records_are_shared_between_published_states() {
    let t = temp_store().await;
    let catalog = Catalog::new(t.store.clone());
    catalog
        .add_service(&service("web", "198.18.0.10:80"))
        .await
        .expect("added");
    let (follower, mut states) = Follower::start(t.store.clone()).await.expect("starts");
    let first = states.borrow().clone();
    let (_stop, stopped) = watch::channel(false);
    tokio::spawn(follower.run(stopped));

    catalog
        .add_service(&service("api", "198.18.0.11:80"))
        .await
        .expect("added");
    let next = state_where(&mut states, |s| s.services.contains_key("api")).await;
    assert!(Arc::ptr_eq(&first.services["web"], &next.services["web"]));
}

/// Rule weights, locality, affinity and drain marks through one store: written by the catalog,
/// read back as written; marks leave with their static instance and their service, and a
/// `drain` clears the marks of instances that are gone.
async fn traffic_round_trip(store: Arc<dyn Store>) {
    let catalog = Catalog::new(store.clone());
    let web = Service {
        locality: model::Locality::PreferHost,
        affinity: model::Affinity::ClientIp,
        ..service("web", "198.18.0.10:80")
    };
    catalog.add_service(&web).await.expect("added");
    let canary = Rule {
        weight: Some(10),
        ..rule("web", "v1", "app")
    };
    catalog.put_rule(&canary).await.expect("rule");
    catalog
        .add_static_instance(&static_instance("web", "s1", "192.0.2.1:80"))
        .await
        .expect("instance");
    let gone = container("web", "0123456789ab");
    store
        .txn(flux::store::Txn {
            when: vec![],
            then: vec![flux::store::Op::Put {
                key: keys::instance("web", &gone.name),
                value: model::encode(&gone),
                bound: false,
            }],
        })
        .await
        .expect("container record");
    catalog.drain("web", "s1").await.expect("drain static");
    catalog
        .drain("web", &gone.name)
        .await
        .expect("drain container");
    let state = catalog.load().await.expect("loads");
    assert_eq!(*state.services["web"], web);
    assert_eq!(state.rules[&("web".into(), "v1".into())].weight, Some(10));
    assert!(state.is_drained("web", "s1") && state.is_drained("web", &gone.name));
    assert!(state.skipped.is_empty(), "{:?}", state.skipped);
    for (name, field) in [("nope", "instance"), ("s1", "service")] {
        let svc = if field == "service" { "nope" } else { "web" };
        let e = catalog.drain(svc, name).await.unwrap_err();
        assert!(
            matches!(e, CatalogError::NotFound(ref i) if i.field == field),
            "{e}"
        );
    }

    // The container goes (its agent deletes the record): its mark stays, ignored, until the
    // next drain in the service clears it.
    assert!(store
        .delete(&keys::instance("web", &gone.name))
        .await
        .expect("deleted"));
    catalog.undrain("web", "s1").await.expect("undrain");
    catalog
        .undrain("web", "s1")
        .await
        .expect("undrain again is fine");
    catalog.drain("web", "s1").await.expect("drain again");
    let state = catalog.load().await.expect("loads");
    assert_eq!(
        state.drains.keys().cloned().collect::<Vec<_>>(),
        [("web".to_string(), "s1".to_string())]
    );
    catalog
        .remove_static_instance("web", "s1")
        .await
        .expect("removed");
    assert!(catalog.load().await.expect("loads").drains.is_empty());
    catalog
        .add_static_instance(&static_instance("web", "s2", "192.0.2.2:80"))
        .await
        .expect("instance");
    catalog.drain("web", "s2").await.expect("drain");
    catalog.remove_service("web").await.expect("removed");
    let l = listing(&store).await;
    assert!(key_names(&l).is_empty(), "{:?}", key_names(&l));

    // The kernel picks at random: weight 0 (drain) or the default only.
    let bulk = Service {
        forward: model::Forwarding::Kernel,
        ..service("bulk", "198.18.0.12:80")
    };
    catalog.add_service(&bulk).await.expect("added");
    for (w, ok) in [
        (Some(0), true),
        (Some(100), true),
        (None, true),
        (Some(50), false),
    ] {
        let r = Rule {
            weight: w,
            ..rule("bulk", "v1", "app")
        };
        match catalog.put_rule(&r).await {
            Ok(()) => assert!(ok, "{w:?} accepted"),
            Err(e) => assert!(
                !ok && matches!(e, CatalogError::Invalid(ref i) if i.field == "weight"),
                "{w:?}: {e}"
            ),
        }
    }
}

#[tokio::test]
async fn traffic_control_round_trips_through_the_embedded_store() {
    let t = temp_store().await;
    traffic_round_trip(t.store.clone()).await;
}

#[tokio::test]
async fn traffic_control_round_trips_through_etcd() {
    let etcd = tokio::task::spawn_blocking(support::etcd::Etcd::start)
        .await
        .expect("starting etcd");
    let store = flux::store::etcd::EtcdStore::connect(
        std::slice::from_ref(&etcd.endpoint),
        "/flux-traffic/",
    )
    .await
    .expect("etcd store");
    traffic_round_trip(Arc::new(store)).await;
}
