//! Fills an embedded store with services while fluxd is stopped, through flux's own catalog code
//! (the same transactions `fluxctl service add` and `instance add` end in): service
//! `PREFIX-I` at VIP 198.18.(I / 250).(I % 250 + 1):80 with one static instance each.
//!
//! The API would do the same, but each of its `service add` answers re-reads the whole catalog,
//! so 10,000 services through fluxctl take minutes; here they take seconds.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use flux::catalog::Catalog;
use flux::model::{Balance, Instance, Protocol, Service, Validate};
use flux::store::embedded::EmbeddedStore;
use flux::store::Store;
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct Args {
    /// fluxd's --state-dir (fluxd must not be running on it).
    #[arg(long)]
    state_dir: PathBuf,
    /// Services to add.
    #[arg(long)]
    services: usize,
    /// Index of the first service (VIP and name follow from the index).
    #[arg(long, default_value_t = 0)]
    from: usize,
    #[arg(long, default_value = "svc")]
    prefix: String,
    /// Address of each service's static instance, IP:PORT.
    #[arg(long)]
    instance: SocketAddrV4,
}

/// The VIP of service number `i`; the script computes the same (`vip_of`).
pub fn vip(i: usize) -> std::io::Result<SocketAddrV4> {
    let (hi, lo) = (i / 250, i % 250 + 1);
    if hi > 255 {
        return Err(std::io::Error::other(format!(
            "service index {i} is beyond the VIP range"
        )));
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::new(198, 18, hi as u8, lo as u8),
        80,
    ))
}

pub async fn run(a: Args) -> std::io::Result<Value> {
    let start = Instant::now();
    let store = EmbeddedStore::open(&a.state_dir)
        .await
        .map_err(std::io::Error::other)?;
    let store: Arc<dyn Store> = Arc::new(store);
    let catalog = Catalog::new(store.clone());
    for i in a.from..a.from + a.services {
        let name = format!("{}-{i}", a.prefix);
        let service = Service {
            name: name.clone(),
            address: Some(vip(i)?.into()),
            protocol: Protocol::Tcp,
            instance_port: None,
            balance: Balance::RoundRobin,
            health: None,
            forward: Default::default(),
            locality: Default::default(),
            affinity: Default::default(),
            timeouts: Default::default(),
            proxy_protocol: None,
            instance_protocol: None,
        };
        let instance = Instance::new_static(&name, "b0", a.instance.into());
        service.validate().map_err(std::io::Error::other)?;
        instance.validate().map_err(std::io::Error::other)?;
        catalog
            .add_service(&service)
            .await
            .map_err(|e| std::io::Error::other(format!("{name}: {e}")))?;
        catalog
            .add_static_instance(&instance)
            .await
            .map_err(|e| std::io::Error::other(format!("{name}: {e}")))?;
    }
    store.close(false).await.map_err(std::io::Error::other)?;
    Ok(json!({
        "mode": "seed",
        "services": a.services,
        "seconds": crate::round2(start.elapsed().as_secs_f64()),
    }))
}
