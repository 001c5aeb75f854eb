//! The store's key layout. Every other module names keys through these functions, so the
//! layout is written down once.

use std::net::SocketAddrV4;

pub const SERVICES: &str = "services/";
pub const VIPS: &str = "vips/";
pub const RULES: &str = "rules/";
pub const INSTANCES: &str = "instances/";
pub const HOSTS: &str = "hosts/";

pub fn service(name: &str) -> String {
    format!("{SERVICES}{name}")
}

/// The claim that makes a VIP:port unique across services: created in the same transaction as
/// the service, so two concurrent `service add` cannot both win.
pub fn vip(addr: &SocketAddrV4) -> String {
    format!("{VIPS}{addr}")
}

pub fn rule(service: &str, rule: &str) -> String {
    format!("{RULES}{service}/{rule}")
}

/// Trailing slash so that `web` does not also match `web-2`.
pub fn rules_of(service: &str) -> String {
    format!("{RULES}{service}/")
}

pub fn instance(service: &str, name: &str) -> String {
    format!("{INSTANCES}{service}/{name}")
}

pub fn instances_of(service: &str) -> String {
    format!("{INSTANCES}{service}/")
}

pub fn host(name: &str) -> String {
    format!("{HOSTS}{name}")
}
