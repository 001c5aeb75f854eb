//! Serde for `IP:PORT` fields, so that a bad address is refused with the same message whether
//! it came from the CLI, the API or the store.

use std::net::SocketAddrV4;

use serde::{de::Error, Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(a: &SocketAddrV4, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(a)
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddrV4, D::Error> {
    let s = String::deserialize(d)?;
    super::validate::parse_socket_addr("", &s).map_err(|e| D::Error::custom(message(&e)))
}

fn message(e: &super::InvalidInput) -> String {
    match &e.value {
        Some(v) => format!("{} (got \"{v}\")", e.reason),
        None => e.reason.clone(),
    }
}

pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(a: &Option<SocketAddrV4>, s: S) -> Result<S::Ok, S::Error> {
        match a {
            Some(a) => s.collect_str(a),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddrV4>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => super::super::validate::parse_socket_addr("", &s)
                .map(Some)
                .map_err(|e| D::Error::custom(message(&e))),
        }
    }
}
