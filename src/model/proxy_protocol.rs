//! Whether a `tcp` service tells its instances the client's real address with HAProxy's PROXY
//! protocol header (the encoding is in `proxy/proxy_header.rs`).

use serde::{Deserialize, Serialize};

use super::InvalidInput;

/// The header's version: instances must be configured to expect exactly this one (HAProxy's
/// `accept-proxy`, nginx's `listen ... proxy_protocol` take both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// The text header: `PROXY TCP4 CLIENT VIP CPORT VPORT\r\n`.
    V1,
    /// The binary header (16 bytes + 12 of IPv4 addresses).
    V2,
}

impl std::fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        })
    }
}

impl std::str::FromStr for ProxyProtocol {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, InvalidInput> {
        match s {
            "v1" => Ok(ProxyProtocol::V1),
            "v2" => Ok(ProxyProtocol::V2),
            _ => Err(InvalidInput::new("proxy_protocol", "must be v1 or v2").value(s)),
        }
    }
}
