//! A host: a machine running fluxd, present in the store while its fluxd is alive.

use std::net::{Ipv4Addr, SocketAddrV4};

use serde::{Deserialize, Serialize};

use super::{validate, InvalidInput, Validate};

/// Which address a host publishes for its container instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Host IP and the port Docker published: reachable from other hosts on any network.
    #[default]
    Local,
    /// Container IP and the instance port: for overlays that route container IPs.
    Global,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub network_mode: NetworkMode,
    /// fluxd version, so mixed versions during an upgrade are visible.
    pub version: String,
    /// The commit fluxd was built from (`unknown` outside a git checkout); absent in records
    /// of older fluxd versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// Unix time the daemon started; tells restarts apart.
    pub started_at: u64,
    /// Where other hosts reach this fluxd's read-only HTTP API (the UI gathers every host's
    /// series from there); absent when it listens on loopback only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddrV4>,
}

impl Validate for Host {
    fn validate(&self) -> Result<(), InvalidInput> {
        validate::host_name("name", &self.name)
    }
}
