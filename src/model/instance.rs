//! An instance: one backend of a service, a container enrolled by a rule or a static address.

use std::collections::BTreeMap;
use std::net::SocketAddr;

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

/// Longest address note: one sentence naming a port and an address or two.
pub const MAX_ADDRESS_NOTE: usize = 256;

/// The container behind a container instance, as Docker reported it at enrolment.
///
/// Unknown fields are accepted here (unlike in [`Instance`]), so a field added to this part of
/// the record is ignored by older fluxd versions instead of making them skip the whole record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub image: String,
    pub tag: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Why the instance has no address, or why its address is an unusual one (a binding other
    /// hosts cannot reach, used because this is the only host). For people, not for parsing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_note: Option<String>,
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
    pub address: Option<SocketAddr>,
}

impl Instance {
    /// A hand-registered backend.
    pub fn new_static(service: &str, name: &str, address: SocketAddr) -> Self {
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
                if let Some(note) = self
                    .container
                    .as_ref()
                    .and_then(|c| c.address_note.as_ref())
                {
                    address_note(note)?;
                }
            }
        }
        if let Some(a) = &self.address {
            validate::backend("address", a)?;
        }
        Ok(())
    }
}

/// A note is shown as is in tables and the web UI: one printable line of bounded length.
fn address_note(note: &str) -> Result<(), InvalidInput> {
    const FIELD: &str = "container.address_note";
    if note.is_empty() || note.len() > MAX_ADDRESS_NOTE {
        return Err(InvalidInput::new(
            FIELD,
            format!("must be 1-{MAX_ADDRESS_NOTE} bytes"),
        ));
    }
    if note.chars().any(char::is_control) {
        return Err(InvalidInput::new(FIELD, "must not contain control characters").value(note));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{decode, encode};

    const OLD: &str = r#"{"service":"web","name":"0123456789ab","origin":"container","host":"h1","rule":"all","container":{"id":"0123456789abcdef","name":"web0","image":"docker.io/library/webimg","tag":"latest"},"address":"192.0.2.1:49153"}"#;

    #[test]
    fn records_without_a_note_load_and_encode_as_before() {
        let i: Instance = decode(OLD.as_bytes()).unwrap();
        assert_eq!(i.container.as_ref().unwrap().address_note, None);
        assert_eq!(String::from_utf8(encode(&i)).unwrap(), OLD);
    }

    fn with_note(note: &str) -> String {
        let note = serde_json::Value::from(note).to_string();
        OLD.replace(
            r#""tag":"latest"}"#,
            &format!(r#""tag":"latest","address_note":{note}}}"#),
        )
    }

    #[test]
    fn notes_round_trip_and_are_checked() {
        let json =
            with_note("published only on 127.0.0.1:49153; used because this is the only host");
        let i: Instance = decode(json.as_bytes()).unwrap();
        assert!(i.container.as_ref().unwrap().address_note.is_some());
        assert_eq!(String::from_utf8(encode(&i)).unwrap(), json);
        for bad in [
            "",
            "two\nlines",
            "\u{1b}[31mred",
            &"x".repeat(MAX_ADDRESS_NOTE + 1),
        ] {
            let e = decode::<Instance>(with_note(bad).as_bytes()).unwrap_err();
            assert_eq!(e.field, "container.address_note", "{bad:?}: {e}");
        }
    }

    #[test]
    fn unknown_container_fields_are_ignored() {
        // The property that lets older versions read records carrying a note (their
        // ContainerInfo has no such field) and lets this one read a later version's additions.
        let json = OLD.replace(r#""tag":"latest"}"#, r#""tag":"latest","future":1}"#);
        assert!(decode::<Instance>(json.as_bytes()).is_ok());
    }
}
