//! DNS queries as they come off a UDP or TCP socket (`dns::answer`): whatever the bytes,
//! parsing and answering never panic, a reply is a well-formed response carrying the query's
//! id, and a UDP reply fits what a client without EDNS accepts unless it asked for more.
#![no_main]

use std::sync::Arc;

use flux::catalog::State;
use flux::dns::answer::{answer, Reply, Transport, Zone};
use flux::dns::catalog::Snapshot;
use flux::model::{Instance, Service};
use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;

/// A catalog with a service with a VIP and instances, and one without a VIP.
fn snapshot() -> Snapshot {
    let mut state = State::default();
    let web: Service = serde_json::from_str(
        r#"{"name":"web","address":"198.18.0.1:80"}"#,
    )
    .expect("a valid service record");
    let edge: Service = serde_json::from_str(r#"{"name":"edge","address":"none"}"#).expect("a valid service record");
    state.services.insert("web".into(), Arc::new(web));
    state.services.insert("edge".into(), Arc::new(edge));
    for (i, name) in ["a1", "b2", "c3"].into_iter().enumerate() {
        let addr = format!("10.0.0.{}:8080", i + 1).parse().unwrap();
        state.instances.insert(
            ("web".into(), name.into()),
            Arc::new(Instance::new_static("web", name, addr)),
        );
    }
    Snapshot::new(Arc::new(state), None)
}

fuzz_target!(|data: &[u8]| {
    let names = snapshot();
    for forwarding in [false, true] {
        let zone = Zone::new("flux", forwarding).unwrap();
        for transport in [Transport::Udp, Transport::Tcp] {
            match answer(&zone, &names, data, transport) {
                Reply::Message { bytes, rcode } => {
                    let m = Message::from_vec(&bytes).expect("a reply parses");
                    assert_eq!(m.message_type(), MessageType::Response);
                    assert_eq!(m.response_code(), rcode);
                    assert_eq!(&bytes[..2], &data[..2], "the reply carries the query's id");
                    if transport == Transport::Udp {
                        assert!(bytes.len() <= 1232, "UDP reply of {} bytes", bytes.len());
                    }
                }
                Reply::Forward => assert!(forwarding),
                Reply::Drop => {}
            }
        }
    }
});
