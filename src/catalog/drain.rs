//! Drain marks: `fluxctl instance drain` / `undrain`. A mark is a record of its own under
//! `drains/SERVICE/INSTANCE` (see `model::Drain`), so that it survives a host's agent
//! rewriting its container instances' records.
//!
//! Marks never pile up unseen: removing a service removes its marks, removing a static
//! instance removes its mark, and each `drain` also removes the marks of the service whose
//! instance is gone (a drained container that stopped for good). Until then such a mark is
//! ignored, and it applies again if the instance comes back under its name (a container
//! restarted keeps its id).

use super::{keys, no_service, put, Catalog, CatalogError, Result};
use crate::model::{self, Drain, InvalidInput};
use crate::store::{Cond, Op, Txn};

impl Catalog {
    /// Marks an existing instance drained; the service and the instance must exist now.
    pub async fn drain(&self, service: &str, instance: &str) -> Result<()> {
        let ikey = keys::instance(service, instance);
        if self.store.get(&ikey).await?.is_none() {
            return Err(self.no_instance(service, instance).await);
        }
        let mark = Drain {
            service: service.to_string(),
            instance: instance.to_string(),
        };
        let mut then = vec![put(&keys::drain(service, instance), model::encode(&mark))];
        // Marks of instances that are gone, found in the same listing's order; at most one
        // service's worth.
        let marks = self.store.list(&keys::drains_of(service)).await?;
        let present = self.store.list(&keys::instances_of(service)).await?;
        for kv in &marks.kvs {
            let name = &kv.key[keys::drains_of(service).len()..];
            let gone = name != instance
                && !present
                    .kvs
                    .iter()
                    .any(|i| i.key == keys::instance(service, name));
            if gone {
                then.push(Op::Delete(kv.key.clone()));
            }
        }
        let txn = Txn {
            when: vec![Cond::Exists(keys::service(service)), Cond::Exists(ikey)],
            then,
        };
        if self.store.txn(txn).await?.succeeded {
            Ok(())
        } else {
            Err(self.no_instance(service, instance).await)
        }
    }

    /// Removes an instance's drain mark. Idempotent for an instance that exists; a mark left
    /// by an instance that is gone is removed too.
    pub async fn undrain(&self, service: &str, instance: &str) -> Result<()> {
        if self.store.delete(&keys::drain(service, instance)).await? {
            return Ok(());
        }
        if self
            .store
            .get(&keys::instance(service, instance))
            .await?
            .is_some()
        {
            return Ok(());
        }
        Err(self.no_instance(service, instance).await)
    }

    /// The error for an instance that is not there: its service is missing, or it is.
    async fn no_instance(&self, service: &str, instance: &str) -> CatalogError {
        match self.store.get(&keys::service(service)).await {
            Ok(None) => no_service(service),
            Err(e) => e.into(),
            Ok(Some(_)) => CatalogError::NotFound(
                InvalidInput::new(
                    "instance",
                    format!("service {service} has no such instance"),
                )
                .value(instance),
            ),
        }
    }
}
