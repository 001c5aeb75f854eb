//! The catalog: typed reads and writes of services, rules, instances and hosts over any store.
//! Every write is one store transaction whose conditions keep the catalog consistent (a VIP is
//! claimed by one service; a rule or instance needs its service), so concurrent writers on
//! different hosts cannot leave it half-written.

mod drain;
mod edit;
pub mod follow;
pub mod keys;
pub mod placement;
mod state;

use std::sync::Arc;

pub use state::{Decoded, State};

use crate::model::{self, Host, Instance, InvalidInput, Origin, Rule, Service};
use crate::store::{Cond, Op, Store, StoreError, Txn};

/// Why a catalog write was refused. The API maps each kind to its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{0}")]
    Invalid(InvalidInput),
    #[error("{0}")]
    NotFound(InvalidInput),
    #[error("{0}")]
    Conflict(InvalidInput),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<InvalidInput> for CatalogError {
    fn from(e: InvalidInput) -> Self {
        CatalogError::Invalid(e)
    }
}

pub type Result<T> = std::result::Result<T, CatalogError>;

#[derive(Clone)]
pub struct Catalog {
    store: Arc<dyn Store>,
}

impl Catalog {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Catalog { store }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Everything in the store as one consistent picture.
    pub async fn load(&self) -> Result<State> {
        Ok(State::from_listing(&self.store.list("").await?))
    }

    /// Creates a service and claims its VIP:port in one transaction.
    pub async fn add_service(&self, service: &Service) -> Result<()> {
        let skey = keys::service(&service.name);
        // The claim that makes the VIP unique, in the same transaction; none without a VIP.
        let vkey = service.address.as_ref().map(keys::vip);
        let mut txn = Txn {
            when: vec![Cond::Absent(skey.clone())],
            then: vec![put(&skey, model::encode(service))],
        };
        if let Some(vkey) = &vkey {
            txn.when.push(Cond::Absent(vkey.clone()));
            txn.then.push(put(vkey, service.name.as_bytes().to_vec()));
        }
        if self.store.txn(txn).await?.succeeded {
            return Ok(());
        }
        if self.store.get(&skey).await?.is_some() {
            return Err(CatalogError::Conflict(
                InvalidInput::new("name", "a service with this name already exists")
                    .value(&service.name),
            ));
        }
        let owner = match &vkey {
            Some(vkey) => self
                .store
                .get(vkey)
                .await?
                .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
                .unwrap_or_default(),
            None => String::new(),
        };
        Err(CatalogError::Conflict(
            InvalidInput::new("address", format!("already used by service {owner}"))
                .value(service.address_text()),
        ))
    }

    /// Removes a service with its VIP claim, rules and instances, all at once.
    pub async fn remove_service(&self, name: &str) -> Result<()> {
        let skey = keys::service(name);
        let kv = self
            .store
            .get(&skey)
            .await?
            .ok_or_else(|| no_service(name))?;
        let mut then = vec![
            Op::Delete(skey.clone()),
            Op::DeletePrefix(keys::rules_of(name)),
            Op::DeletePrefix(keys::instances_of(name)),
            Op::DeletePrefix(keys::drains_of(name)),
        ];
        // A record that no longer parses still gets removed; only its claim can't be found.
        if let Some(vip) = model::decode::<Service>(&kv.value)
            .ok()
            .and_then(|s| s.address)
        {
            then.push(Op::Delete(keys::vip(&vip)));
        }
        let txn = Txn {
            when: vec![Cond::ModRevision(skey, kv.mod_revision)],
            then,
        };
        if self.store.txn(txn).await?.succeeded {
            Ok(())
        } else {
            Err(CatalogError::Conflict(
                InvalidInput::new("name", "the service changed while removing it; retry")
                    .value(name),
            ))
        }
    }

    /// Creates or replaces a rule; its service must exist at that moment. A kernel-forwarded
    /// service's rules take weight 0 or the default only (see `kernel_weight`).
    pub async fn put_rule(&self, rule: &Rule) -> Result<()> {
        let skey = keys::service(&rule.service);
        let Some(service) = self.store.get(&skey).await? else {
            return Err(no_service(&rule.service));
        };
        if let Ok(s) = model::decode::<Service>(&service.value) {
            kernel_weight(&s, rule)?;
        }
        let txn = Txn {
            when: vec![Cond::Exists(skey)],
            then: vec![put(
                &keys::rule(&rule.service, &rule.name),
                model::encode(rule),
            )],
        };
        if self.store.txn(txn).await?.succeeded {
            Ok(())
        } else {
            Err(no_service(&rule.service))
        }
    }

    pub async fn remove_rule(&self, service: &str, rule: &str) -> Result<()> {
        if self.store.delete(&keys::rule(service, rule)).await? {
            return Ok(());
        }
        if self.store.get(&keys::service(service)).await?.is_none() {
            return Err(no_service(service));
        }
        Err(CatalogError::NotFound(
            InvalidInput::new("rule", format!("service {service} has no such rule")).value(rule),
        ))
    }

    /// Adds a static instance; refuses to replace an existing one of the same name.
    pub async fn add_static_instance(&self, instance: &Instance) -> Result<()> {
        let ikey = keys::instance(&instance.service, &instance.name);
        let txn = Txn {
            when: vec![
                Cond::Exists(keys::service(&instance.service)),
                Cond::Absent(ikey.clone()),
            ],
            then: vec![put(&ikey, model::encode(instance))],
        };
        if self.store.txn(txn).await?.succeeded {
            return Ok(());
        }
        if self
            .store
            .get(&keys::service(&instance.service))
            .await?
            .is_none()
        {
            return Err(no_service(&instance.service));
        }
        Err(CatalogError::Conflict(
            InvalidInput::new("name", "the service already has an instance of this name")
                .value(&instance.name),
        ))
    }

    /// Removes a static instance. Container instances belong to their host's agent.
    pub async fn remove_static_instance(&self, service: &str, name: &str) -> Result<()> {
        let ikey = keys::instance(service, name);
        let Some(kv) = self.store.get(&ikey).await? else {
            if self.store.get(&keys::service(service)).await?.is_none() {
                return Err(no_service(service));
            }
            return Err(CatalogError::NotFound(
                InvalidInput::new("name", format!("service {service} has no such instance"))
                    .value(name),
            ));
        };
        if let Ok(i) = model::decode::<Instance>(&kv.value) {
            if i.origin == Origin::Container {
                return Err(CatalogError::Invalid(
                    InvalidInput::new(
                        "name",
                        "is a container instance: stop the container or deselect its rule",
                    )
                    .value(name),
                ));
            }
        }
        let txn = Txn {
            when: vec![Cond::ModRevision(ikey.clone(), kv.mod_revision)],
            then: vec![Op::Delete(ikey), Op::Delete(keys::drain(service, name))],
        };
        if self.store.txn(txn).await?.succeeded {
            Ok(())
        } else {
            Err(CatalogError::Conflict(
                InvalidInput::new("name", "the instance changed while removing it; retry")
                    .value(name),
            ))
        }
    }

    /// Publishes this host, bound to its session so that it vanishes when the host dies.
    /// When the host's fluxd last proved alive to the store (see `Store::last_renewed`).
    pub async fn host_last_seen(&self, name: &str) -> Result<Option<std::time::SystemTime>> {
        Ok(self.store.last_renewed(&keys::host(name)).await?)
    }

    pub async fn register_host(&self, host: &Host) -> Result<()> {
        let txn = Txn {
            when: vec![],
            then: vec![Op::Put {
                key: keys::host(&host.name),
                value: model::encode(host),
                bound: true,
            }],
        };
        self.store.txn(txn).await?;
        Ok(())
    }
}

fn put(key: &str, value: Vec<u8>) -> Op {
    Op::Put {
        key: key.to_string(),
        value,
        bound: false,
    }
}

/// The kernel forwards a service's connections to its live instances at random: it can leave
/// a drained rule out (weight 0) but not share by other weights.
fn kernel_weight(service: &Service, rule: &Rule) -> Result<()> {
    let w = rule.weight_or_default();
    if service.forward == model::Forwarding::Kernel && w != 0 && w != model::traffic::DEFAULT_WEIGHT
    {
        return Err(CatalogError::Invalid(
            InvalidInput::new(
                "weight",
                "a kernel-forwarded service takes weights 0 (drain) or 100 only; weights need --forward proxy",
            )
            .value(w.to_string()),
        ));
    }
    Ok(())
}

fn no_service(name: &str) -> CatalogError {
    CatalogError::NotFound(InvalidInput::new("service", "no service of this name").value(name))
}
