//! Editing a service in place: one store transaction that replaces the record and keeps its
//! VIP claim, or moves it (the old claim deleted, the new one created only if free), so the
//! catalog never holds a service without its claim or a claim without its service.

use super::{keys, no_service, put, Catalog, CatalogError, Result};
use crate::model::{self, InvalidInput, Service, ServiceEdit};
use crate::store::{Cond, Op, Txn};

/// Concurrent edits of one service retry this many times before giving up with a conflict.
const ATTEMPTS: usize = 5;

impl Catalog {
    /// A service moving to kernel forwarding must not have rules weighted other than 0 or the
    /// default, which the kernel cannot honour (`put_rule` refuses such rules afterwards).
    async fn rules_suit_forwarding(&self, next: &Service) -> Result<()> {
        for kv in self.store.list(&keys::rules_of(&next.name)).await?.kvs {
            if let Ok(rule) = model::decode::<crate::model::Rule>(&kv.value) {
                super::kernel_weight(next, &rule).map_err(|e| match e {
                    CatalogError::Invalid(i) => CatalogError::Invalid(
                        InvalidInput::new(
                            "forward",
                            format!(
                                "rule {} has weight {}; {}",
                                rule.name,
                                i.value.unwrap_or_default(),
                                i.reason
                            ),
                        )
                        .value("kernel"),
                    ),
                    other => other,
                })?;
            }
        }
        Ok(())
    }

    /// Applies `edit` to the service `name` and returns the service as written. Refused, with
    /// nothing written, if the edited service does not validate or its new VIP is taken.
    /// `check` sees the edited service first (the API's VIP-range check).
    pub async fn edit_service(
        &self,
        name: &str,
        edit: &ServiceEdit,
        check: impl Fn(&Service) -> std::result::Result<(), InvalidInput>,
    ) -> Result<Service> {
        let skey = keys::service(name);
        for _ in 0..ATTEMPTS {
            let kv = self
                .store
                .get(&skey)
                .await?
                .ok_or_else(|| no_service(name))?;
            let current: Service = model::decode(&kv.value).map_err(|e| {
                CatalogError::Invalid(InvalidInput::new(
                    "name",
                    format!("the stored service does not validate ({e}); remove it and add it again"),
                ).value(name))
            })?;
            let next = edit.apply(&current)?;
            check(&next)?;
            if next.forward != current.forward {
                self.rules_suit_forwarding(&next).await?;
            }
            let mut txn = Txn {
                // The record read above, unchanged: the edit applies to what was read.
                when: vec![Cond::ModRevision(skey.clone(), kv.mod_revision)],
                then: vec![put(&skey, model::encode(&next))],
            };
            let moved = next.address != current.address;
            if moved {
                if let Some(old) = &current.address {
                    txn.then.push(Op::Delete(keys::vip(old)));
                }
                if let Some(new) = &next.address {
                    txn.when.push(Cond::Absent(keys::vip(new)));
                    txn.then
                        .push(put(&keys::vip(new), name.as_bytes().to_vec()));
                }
            }
            if self.store.txn(txn).await?.succeeded {
                return Ok(next);
            }
            // Which condition failed: the record changed under us (retry on the new one), or
            // the new VIP is claimed.
            let still = self.store.get(&skey).await?;
            if still.as_ref().map(|kv| kv.mod_revision) != Some(kv.mod_revision) {
                if still.is_none() {
                    return Err(no_service(name));
                }
                continue;
            }
            if let Some(new) = next.address.filter(|_| moved) {
                let owner = self
                    .store
                    .get(&keys::vip(&new))
                    .await?
                    .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
                    .unwrap_or_default();
                return Err(CatalogError::Conflict(
                    InvalidInput::new("address", format!("already used by service {owner}"))
                        .value(new.to_string()),
                ));
            }
        }
        Err(CatalogError::Conflict(
            InvalidInput::new("name", "the service kept changing while editing it; retry")
                .value(name),
        ))
    }
}
