//! An instance: one backend of a service, a container enrolled by a rule or a static address.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;

use serde::{Deserialize, Serialize};

use super::{validate, InvalidInput, Validate};

/// Where an instance came from, which decides who removes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Added by hand with `fluxctl instance add`; stays until removed by hand.
    Static,
    /// Enrolled by a host's Docker agent; bound to that host's liveness.
    Container,
}

/// The container behind a container instance, as Docker reported it at enrolment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub image: String,
    pub tag: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub service: String,
    /// Static instances: the name given; containers: the short container id.
    pub name: String,
    pub origin: Origin,
    /// The host whose agent enrolled it (containers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The rule that matched (containers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerInfo>,
    /// Where to connect; absent when the container has no usable address ("no address").
    #[serde(
        default,
        with = "super::addr::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub address: Option<SocketAddrV4>,
}

impl Instance {
    /// A hand-registered backend.
    pub fn new_static(service: &str, name: &str, address: SocketAddrV4) -> Self {
        Instance {
            service: service.to_string(),
            name: name.to_string(),
            origin: Origin::Static,
            host: None,
            rule: None,
            container: None,
            address: Some(address),
        }
    }
}

impl Validate for Instance {
    fn validate(&self) -> Result<(), InvalidInput> {
        validate::name("service", &self.service)?;
        match self.origin {
            Origin::Static => {
                validate::name("name", &self.name)?;
                if self.address.is_none() {
                    return Err(InvalidInput::new("address", "a static instance needs one"));
                }
            }
            Origin::Container => {
                // Container ids are hex; names from Docker are checked by the agent.
                validate::name("name", &self.name)?;
                if let Some(h) = &self.host {
                    validate::host_name("host", h)?;
                }
            }
        }
        if let Some(a) = &self.address {
            validate::backend("address", a)?;
        }
        Ok(())
    }
}
