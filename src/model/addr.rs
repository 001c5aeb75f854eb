//! Serde for `IP:PORT` fields (optional ones, and service addresses that may be `none`), so
//! that a bad address is refused with the same message whether it came from the CLI, the API
//! or the store.

use std::net::SocketAddr;

use serde::{de::Error, Deserialize, Deserializer, Serializer};

fn message(e: &super::InvalidInput) -> String {
    match &e.value {
        Some(v) => format!("{} (got \"{v}\")", e.reason),
        None => e.reason.clone(),
    }
}

pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match a {
            Some(a) => s.collect_str(a),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => super::super::validate::parse_socket_addr("", &s)
                .map(Some)
                .map_err(|e| D::Error::custom(message(&e))),
        }
    }
}

/// A service address: `IP:PORT`, or `none` for a service without a VIP (one only `fluxd edge`
/// publishes). Spelt out rather than left out, so that a body that forgot the field is still
/// refused, and so that scripts always find a string there.
pub mod vip {
    use super::*;

    /// The spelling of "no VIP" in records, API bodies and on the command line.
    pub const NONE: &str = "none";

    pub fn serialize<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match a {
            Some(a) => s.collect_str(a),
            None => s.serialize_str(NONE),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let s = String::deserialize(d)?;
        if s == NONE {
            return Ok(None);
        }
        super::super::validate::parse_socket_addr("", &s)
            .map(Some)
            .map_err(|e| D::Error::custom(format!("{} or none", message(&e))))
    }
}
