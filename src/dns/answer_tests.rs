use std::collections::BTreeMap;
use std::net::SocketAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

use super::*;

/// A service's VIP and its live instances, as (name, address).
type Entry = (Option<SocketAddr>, Vec<(String, SocketAddr)>);

/// A catalog of services by name.
#[derive(Default)]
struct Fake {
    services: BTreeMap<String, Entry>,
}

impl Fake {
    fn with(mut self, name: &str, vip: Option<&str>, instances: &[(&str, &str)]) -> Fake {
        self.services.insert(
            name.into(),
            (
                vip.map(|v| v.parse().unwrap()),
                instances
                    .iter()
                    .map(|(n, a)| (n.to_string(), a.parse().unwrap()))
                    .collect(),
            ),
        );
        self
    }
}

impl Names for Fake {
    fn service(&self, name: &str) -> Option<Option<SocketAddr>> {
        self.services.get(name).map(|s| s.0)
    }
    fn live_instances(&self, service: &str) -> Vec<(String, SocketAddr)> {
        self.services
            .get(service)
            .map(|s| s.1.clone())
            .unwrap_or_default()
    }
    fn serial(&self) -> u32 {
        42
    }
}

fn catalog() -> Fake {
    Fake::default()
        .with(
            "web",
            Some("198.18.0.1:80"),
            &[
                ("a1", "10.0.0.1:8080"),
                ("b2", "10.0.0.2:8081"),
                ("c3", "10.0.0.2:8082"),
            ],
        )
        .with("edge-only", None, &[("x", "10.0.0.9:80")])
        .with("idle", Some("198.18.0.2:5432"), &[])
}

fn query_bytes(name: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(4242)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(4096);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn ask_in(zone: &Zone, names: &Fake, name: &str, qtype: RecordType, t: Transport) -> Message {
    match answer(zone, names, &query_bytes(name, qtype, false), t) {
        Reply::Message { bytes, rcode } => {
            let m = Message::from_vec(&bytes).unwrap();
            assert_eq!(m.response_code(), rcode);
            assert_eq!(m.id(), 4242);
            assert_eq!(m.message_type(), MessageType::Response);
            assert!(m.recursion_desired());
            m
        }
        other => panic!("expected a message, got {other:?}"),
    }
}

fn ask(name: &str, qtype: RecordType) -> Message {
    ask_in(
        &Zone::new("flux", false).unwrap(),
        &catalog(),
        name,
        qtype,
        Transport::Udp,
    )
}

fn a_of(m: &Message) -> Vec<String> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(format!("{} {}", r.name(), a.0)),
            _ => None,
        })
        .collect()
}

fn srv_of(m: &Message) -> Vec<String> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::SRV(s) => Some(format!("{} {} {}", r.name(), s.port(), s.target())),
            _ => None,
        })
        .collect()
}

fn has_soa_authority(m: &Message) -> bool {
    m.name_servers()
        .iter()
        .any(|r| r.record_type() == RecordType::SOA && r.name().to_string() == "flux.")
}

#[test]
fn service_name_is_its_vip() {
    let m = ask("web.flux.", RecordType::A);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.authoritative());
    assert_eq!(a_of(&m), ["web.flux. 198.18.0.1"]);
    assert!(m.answers().iter().all(|r| r.ttl() == TTL));
}

#[test]
fn names_are_case_insensitive() {
    let m = ask("WeB.FLUX.", RecordType::A);
    assert_eq!(m.answers().len(), 1);
    assert_eq!(
        m.answers()[0].data(),
        &RData::A(A("198.18.0.1".parse().unwrap()))
    );
}

#[test]
fn service_without_vip_has_no_address() {
    let m = ask("edge-only.flux.", RecordType::A);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.answers().is_empty());
    assert!(has_soa_authority(&m));
}

#[test]
fn other_types_of_known_names_have_no_data() {
    for qtype in [RecordType::AAAA, RecordType::MX, RecordType::TXT] {
        let m = ask("web.flux.", qtype);
        assert_eq!(m.response_code(), ResponseCode::NoError, "{qtype}");
        assert!(m.answers().is_empty());
        assert!(has_soa_authority(&m));
    }
}

#[test]
fn unknown_names_do_not_exist() {
    for name in [
        "nope.flux.",
        "_nope._tcp.flux.",
        "nope.instances.flux.",
        "zz.web.instances.flux.",
        "a.b.c.d.flux.",
        "_tcp.flux.",
    ] {
        let m = ask(name, RecordType::A);
        assert_eq!(m.response_code(), ResponseCode::NXDomain, "{name}");
        assert!(has_soa_authority(&m), "{name}");
    }
}

#[test]
fn srv_gives_vip_port_and_target_address() {
    let m = ask("_web._tcp.flux.", RecordType::SRV);
    assert_eq!(srv_of(&m), ["_web._tcp.flux. 80 web.flux."]);
    let extra: Vec<String> = m.additionals().iter().map(|r| r.to_string()).collect();
    assert_eq!(extra.len(), 1);
    assert!(extra[0].contains("198.18.0.1"), "{extra:?}");
    // A service without a VIP exists but has no SRV.
    let m = ask("_edge-only._tcp.flux.", RecordType::SRV);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.answers().is_empty());
}

#[test]
fn instances_are_the_live_ones() {
    let m = ask("web.instances.flux.", RecordType::A);
    // Two instances share 10.0.0.2: one A record each address.
    assert_eq!(
        a_of(&m),
        [
            "web.instances.flux. 10.0.0.1",
            "web.instances.flux. 10.0.0.2"
        ]
    );
    let m = ask("web.instances.flux.", RecordType::SRV);
    assert_eq!(
        srv_of(&m),
        [
            "web.instances.flux. 8080 a1.web.instances.flux.",
            "web.instances.flux. 8081 b2.web.instances.flux.",
            "web.instances.flux. 8082 c3.web.instances.flux.",
        ]
    );
    assert_eq!(m.additionals().len(), 3);
    // Each SRV target resolves.
    let m = ask("B2.web.instances.flux.", RecordType::A);
    assert_eq!(a_of(&m), ["b2.web.instances.flux. 10.0.0.2"]);
    // A service without a VIP still has instances.
    let m = ask("edge-only.instances.flux.", RecordType::A);
    assert_eq!(a_of(&m), ["edge-only.instances.flux. 10.0.0.9"]);
    // A known service with no live instance: the name exists, without data.
    let m = ask("idle.instances.flux.", RecordType::A);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.answers().is_empty());
}

#[test]
fn apex_has_soa_and_instances_is_a_name() {
    let m = ask("flux.", RecordType::SOA);
    assert_eq!(m.answers().len(), 1);
    match m.answers()[0].data() {
        RData::SOA(s) => {
            assert_eq!(s.serial(), 42);
            assert_eq!(s.minimum(), TTL);
        }
        other => panic!("{other:?}"),
    }
    let m = ask("instances.flux.", RecordType::A);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.answers().is_empty());
}

#[test]
fn any_gives_what_the_name_has() {
    assert_eq!(ask("web.flux.", RecordType::ANY).answers().len(), 1);
    assert_eq!(
        ask("web.instances.flux.", RecordType::ANY).answers().len(),
        5
    );
}

#[test]
fn other_zones_are_refused_or_forwarded() {
    let m = ask("example.com.", RecordType::A);
    assert_eq!(m.response_code(), ResponseCode::Refused);
    assert!(!m.authoritative());
    // A name ending like the domain is not in it.
    let m = ask("web.notflux.", RecordType::A);
    assert_eq!(m.response_code(), ResponseCode::Refused);
    let forwarding = Zone::new("flux", true).unwrap();
    let q = query_bytes("example.com.", RecordType::A, false);
    assert_eq!(
        answer(&forwarding, &catalog(), &q, Transport::Udp),
        Reply::Forward
    );
    // Own names are still answered here.
    let m = ask_in(
        &forwarding,
        &catalog(),
        "web.flux.",
        RecordType::A,
        Transport::Udp,
    );
    assert_eq!(a_of(&m), ["web.flux. 198.18.0.1"]);
    assert!(m.recursion_available());
}

#[test]
fn configured_domain() {
    let zone = Zone::new("svc.example", false).unwrap();
    let m = ask_in(
        &zone,
        &catalog(),
        "web.svc.example.",
        RecordType::A,
        Transport::Udp,
    );
    assert_eq!(a_of(&m), ["web.svc.example. 198.18.0.1"]);
    let m = ask_in(
        &zone,
        &catalog(),
        "web.flux.",
        RecordType::A,
        Transport::Udp,
    );
    assert_eq!(m.response_code(), ResponseCode::Refused);
}

#[test]
fn other_classes_are_refused() {
    let mut m = Message::new();
    let mut q = Query::query(Name::from_ascii("web.flux.").unwrap(), RecordType::A);
    q.set_query_class(DNSClass::CH);
    m.set_id(1).add_query(q);
    let zone = Zone::new("flux", false).unwrap();
    match answer(&zone, &catalog(), &m.to_vec().unwrap(), Transport::Udp) {
        Reply::Message { rcode, .. } => assert_eq!(rcode, ResponseCode::Refused),
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_input() {
    let zone = Zone::new("flux", false).unwrap();
    // Too short for an id: nothing to answer.
    assert_eq!(
        answer(&zone, &catalog(), b"\x01", Transport::Udp),
        Reply::Drop
    );
    // A header, then garbage: FORMERR with the same id.
    let mut bytes = query_bytes("web.flux.", RecordType::A, false);
    bytes.truncate(16);
    match answer(&zone, &catalog(), &bytes, Transport::Udp) {
        Reply::Message { bytes, rcode } => {
            assert_eq!(rcode, ResponseCode::FormErr);
            assert_eq!(Message::from_vec(&bytes).unwrap().id(), 4242);
        }
        other => panic!("{other:?}"),
    }
    // A response is never answered (two responders could bounce it forever).
    let mut m = Message::from_vec(&query_bytes("web.flux.", RecordType::A, false)).unwrap();
    m.set_message_type(MessageType::Response);
    assert_eq!(
        answer(&zone, &catalog(), &m.to_vec().unwrap(), Transport::Udp),
        Reply::Drop
    );
    // Other operations are not implemented; no question is a format error.
    let mut m = Message::from_vec(&query_bytes("web.flux.", RecordType::A, false)).unwrap();
    m.set_op_code(OpCode::Notify);
    match answer(&zone, &catalog(), &m.to_vec().unwrap(), Transport::Udp) {
        Reply::Message { rcode, .. } => assert_eq!(rcode, ResponseCode::NotImp),
        other => panic!("{other:?}"),
    }
    let mut m = Message::new();
    m.set_id(7);
    match answer(&zone, &catalog(), &m.to_vec().unwrap(), Transport::Udp) {
        Reply::Message { rcode, .. } => assert_eq!(rcode, ResponseCode::FormErr),
        other => panic!("{other:?}"),
    }
}

#[test]
fn large_answers_are_truncated_over_udp_only() {
    let instances: Vec<(String, String)> = (0..60)
        .map(|i| {
            (
                format!("instance-{i:03}"),
                format!("10.0.{}.{}:8080", i / 200, i % 200),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = instances
        .iter()
        .map(|(n, a)| (n.as_str(), a.as_str()))
        .collect();
    let names = Fake::default().with("big", Some("198.18.0.3:80"), &refs);
    let zone = Zone::new("flux", false).unwrap();
    let udp = ask_in(
        &zone,
        &names,
        "big.instances.flux.",
        RecordType::SRV,
        Transport::Udp,
    );
    assert!(udp.truncated());
    assert!(udp.answers().is_empty());
    let tcp = ask_in(
        &zone,
        &names,
        "big.instances.flux.",
        RecordType::SRV,
        Transport::Tcp,
    );
    assert!(!tcp.truncated());
    assert_eq!(tcp.answers().len(), 60);
    // With EDNS the client may take up to 1232 bytes: the 60 A records fit.
    let q = query_bytes("big.instances.flux.", RecordType::A, true);
    match answer(&zone, &names, &q, Transport::Udp) {
        Reply::Message { bytes, .. } => {
            assert!(bytes.len() <= 1232);
            let m = Message::from_vec(&bytes).unwrap();
            assert!(!m.truncated());
            assert_eq!(m.answers().len(), 60);
            assert!(m.extensions().is_some());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn error_replies_keep_the_id_and_question() {
    let q = query_bytes("example.com.", RecordType::A, false);
    let (bytes, rcode) = error_reply(&q, ResponseCode::ServFail).unwrap();
    assert_eq!(rcode, ResponseCode::ServFail);
    let m = Message::from_vec(&bytes).unwrap();
    assert_eq!(m.id(), 4242);
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    assert_eq!(m.queries().len(), 1);
    assert!(error_reply(b"\x00", ResponseCode::ServFail).is_none());
}

fn aaaa_of(m: &Message) -> Vec<String> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::AAAA(a) => Some(format!("{} {}", r.name(), a.0)),
            _ => None,
        })
        .collect()
}

#[test]
fn ipv6_vips_and_instances_answer_aaaa_and_a_stays_ipv4() {
    let names = catalog().with(
        "web6",
        Some("[fd00:18::a]:80"),
        &[("a", "[fd00:10::10]:8080"), ("b", "10.0.0.3:8080")],
    );
    let zone = Zone::new("flux", false).unwrap();
    let ask6 = |name: &str, t| ask_in(&zone, &names, name, t, Transport::Udp);
    let m = ask6("web6.flux.", RecordType::AAAA);
    assert_eq!(aaaa_of(&m), vec!["web6.flux. fd00:18::a"]);
    // The name exists, with no IPv4 address: an empty answer, not NXDOMAIN.
    let m = ask6("web6.flux.", RecordType::A);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.answers().is_empty());
    // Instances: each family under its own type.
    let m = ask6("web6.instances.flux.", RecordType::AAAA);
    assert_eq!(aaaa_of(&m), vec!["web6.instances.flux. fd00:10::10"]);
    let m = ask6("web6.instances.flux.", RecordType::A);
    assert_eq!(a_of(&m), vec!["web6.instances.flux. 10.0.0.3"]);
    // An IPv4 service asked for AAAA has none.
    let m = ask6("web.flux.", RecordType::AAAA);
    assert!(m.answers().is_empty());
    assert_eq!(m.response_code(), ResponseCode::NoError);
}
