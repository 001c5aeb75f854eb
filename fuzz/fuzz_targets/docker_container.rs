//! A container as `docker inspect` describes it (JSON, from whoever ran the container): image
//! reference, labels, env, ports, networks. No panic in `Container::from_inspect`, image
//! parsing, matching or label publishing; published labels are valid selector pairs; a
//! selector made of the container's own image, tag and labels matches it.
#![no_main]

use bollard::models::ContainerInspectResponse;
use flux::docker::address::{self, AddressContext};
use flux::docker::agent::publishable_labels;
use flux::docker::container::Container;
use flux::docker::image::{canonical_repository, is_image_id, ImageRef};
use flux::docker::matching::matches;
use flux::model::{validate, NetworkMode, Selector, MAX_ADDRESS_NOTE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Anything that is not JSON: an image reference on its own.
    let Ok(inspect) = serde_json::from_slice::<ContainerInspectResponse>(data) else {
        if let Ok(s) = std::str::from_utf8(data) {
            let r = ImageRef::parse(s);
            assert!(r.repository.contains('/'));
            assert_eq!(canonical_repository(&r.repository), r.repository);
            let _ = is_image_id(s);
        }
        return;
    };
    let resolved = inspect
        .config
        .as_ref()
        .and_then(|c| c.image.as_deref())
        .filter(|i| is_image_id(i))
        .map(|_| "resolved/image:v1");
    let Some(c) = Container::from_inspect(&inspect, resolved) else {
        return;
    };
    assert_eq!(
        canonical_repository(&c.image.repository),
        c.image.repository
    );
    let _ = c.short_id();
    // Whatever Docker reported, the chosen address and note make a record readers accept.
    for port in c.published.keys().chain([&80u16]) {
        for mode in [NetworkMode::Local, NetworkMode::Global] {
            for only_host in [true, false] {
                let ctx = AddressContext {
                    mode,
                    host_ip: "192.0.2.1".parse().unwrap(),
                    only_host,
                };
                // IPv4 and IPv6 VIPs alike (global mode may take the GlobalIPv6Address).
                let a = address::choose_for(&c, &ctx, *port, only_host);
                if let Some(addr) = a.address {
                    assert!(validate::backend("address", &addr).is_ok(), "{addr}");
                } else {
                    assert!(a.note.is_some(), "no address and no note for {port}");
                }
                if let Some(n) = &a.note {
                    assert!(
                        n.len() <= MAX_ADDRESS_NOTE && !n.chars().any(char::is_control),
                        "{n:?}"
                    );
                }
            }
        }
    }

    let published = publishable_labels(&c.labels);
    assert!(validate::pairs("labels", &published).is_ok());
    for (k, v) in &published {
        assert_eq!(c.labels.get(k), Some(v));
    }

    // The container's own identity always selects it.
    let own = Selector {
        image: Some(c.image.repository.clone()),
        tag: Some(c.image.tag.clone()),
        labels: published.clone(),
        env: c.env.clone(),
    };
    assert!(
        matches(&own, &c),
        "own selector {own:?} does not match {c:?}"
    );
    assert!(!matches(&Selector::default(), &c));
});
