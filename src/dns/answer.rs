//! The pure part of the responder: a query's bytes and a picture of the catalog in, the bytes
//! to send back out. No socket, clock or lock here, so that every case is a unit test and the
//! whole path is fuzzed (`fuzz/fuzz_targets/dns_query.rs`). Wire format is hickory-proto's.
//!
//! Names under the domain (`flux.` by default), case-insensitively:
//! - `NAME.flux.` A: the service's VIP (none for a service without one);
//! - `_NAME._tcp.flux.` SRV: the VIP's port, target `NAME.flux.` with its A in additional;
//! - `NAME.instances.flux.` A and SRV: the instances live from this host; the SRV targets are
//!   `INSTANCE.NAME.instances.flux.`, whose A records come in additional;
//! - the domain itself: SOA.
//!
//! Unknown names get NXDOMAIN, other types of known names NOERROR with no data (both with the
//! SOA in authority, for negative caching), names outside the domain REFUSED or, with
//! forwarding, [`Reply::Forward`].

use std::net::IpAddr;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use super::catalog::Names;

/// Seconds resolvers may cache an answer: instances come and go, so short.
pub const TTL: u32 = 5;

/// What a UDP reply may weigh without EDNS (RFC 1035).
const UDP_PLAIN: usize = 512;

/// The most a UDP reply weighs even if the client allows more: the size the DNS flag day 2020
/// settled on, which no path fragments.
const UDP_EDNS: u16 = 1232;

/// Labels of the instances subtree, under the domain.
const INSTANCES: &[u8] = b"instances";

/// The zone fluxd answers for.
#[derive(Debug, Clone)]
pub struct Zone {
    /// The domain, fully qualified and lower case (`flux.`).
    origin: Name,
    /// Queries for other names are relayed rather than refused.
    forwarding: bool,
}

impl Zone {
    /// `domain` as [`super::Settings`] checked it (`flux`, `svc.example`).
    pub fn new(domain: &str, forwarding: bool) -> Result<Zone, String> {
        let origin = Name::from_ascii(format!("{domain}."))
            .map_err(|e| format!("dns_domain: {e}"))?
            .to_lowercase();
        Ok(Zone { origin, forwarding })
    }
}

/// How a query arrived: it bounds the reply's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Send these bytes back; `rcode` is for the metrics.
    Message { bytes: Vec<u8>, rcode: ResponseCode },
    /// A name outside the zone and forwarding is on: relay the query as it is.
    Forward,
    /// Send nothing: not a query (a response, which answering could loop), or too short to
    /// carry even an id.
    Drop,
}

/// Answers one query.
pub fn answer(zone: &Zone, names: &dyn Names, bytes: &[u8], transport: Transport) -> Reply {
    let request = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(_) => return error_reply(bytes, ResponseCode::FormErr).map_or(Reply::Drop, message),
    };
    if request.message_type() != MessageType::Query {
        return Reply::Drop;
    }
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(zone.forwarding)
        .set_checking_disabled(request.checking_disabled());
    let limit = match (transport, request.extensions()) {
        (Transport::Tcp, _) => usize::from(u16::MAX),
        (Transport::Udp, None) => UDP_PLAIN,
        (Transport::Udp, Some(edns)) => usize::from(edns.max_payload().clamp(512, UDP_EDNS)),
    };
    if request.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_EDNS);
        response.set_edns(edns);
    }
    if request.op_code() != OpCode::Query {
        return finish(response, ResponseCode::NotImp, limit);
    }
    let [query] = request.queries() else {
        return finish(response, ResponseCode::FormErr, limit);
    };
    response.add_query(query.clone());
    if !zone.origin.zone_of(query.name()) {
        if zone.forwarding {
            return Reply::Forward;
        }
        return finish(response, ResponseCode::Refused, limit);
    }
    response.set_authoritative(true);
    if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
        return finish(response, ResponseCode::Refused, limit);
    }
    let found = lookup(zone, names, query);
    let rcode = match found {
        Found::Records {
            answers,
            additionals,
        } if !answers.is_empty() => {
            response.add_answers(answers);
            response.add_additionals(additionals);
            ResponseCode::NoError
        }
        Found::Records { .. } => {
            response.add_name_server(soa(zone, names));
            ResponseCode::NoError
        }
        Found::NoSuchName => {
            response.add_name_server(soa(zone, names));
            ResponseCode::NXDomain
        }
    };
    finish(response, rcode, limit)
}

/// A reply with only `rcode` to `bytes`, if they hold at least a query's header: for a query
/// that cannot be parsed (FORMERR) or that could not be forwarded (SERVFAIL).
pub fn error_reply(bytes: &[u8], rcode: ResponseCode) -> Option<(Vec<u8>, ResponseCode)> {
    let header = Header::read(&mut BinDecoder::new(bytes)).ok()?;
    if header.message_type() != MessageType::Query {
        return None;
    }
    let mut m = Message::error_msg(header.id(), header.op_code(), rcode);
    m.set_recursion_desired(header.recursion_desired());
    if let Ok(full) = Message::from_vec(bytes) {
        m.add_queries(full.queries().iter().take(1).cloned());
    }
    m.to_vec().ok().map(|b| (b, rcode))
}

/// The name of an rcode as dig prints it, for metrics labels.
pub fn rcode_name(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        _ => "OTHER",
    }
}

fn message((bytes, rcode): (Vec<u8>, ResponseCode)) -> Reply {
    Reply::Message { bytes, rcode }
}

/// Encodes the response; one that does not fit the client's limit goes with its records left
/// out and the TC bit set, so the client asks again over TCP.
fn finish(mut response: Message, rcode: ResponseCode, limit: usize) -> Reply {
    response.set_response_code(rcode);
    let bytes = match response.to_vec() {
        Ok(b) if b.len() <= limit => Ok(b),
        Ok(_) => response.truncate().to_vec(),
        Err(e) => Err(e),
    };
    match bytes {
        Ok(bytes) => Reply::Message { bytes, rcode },
        // Only names too long to encode get here (a query name of 250 bytes with a service
        // name in front): say so rather than send nothing.
        Err(_) => {
            let mut m =
                Message::error_msg(response.id(), response.op_code(), ResponseCode::ServFail);
            m.add_queries(response.queries().iter().cloned());
            match m.to_vec() {
                Ok(bytes) => Reply::Message {
                    bytes,
                    rcode: ResponseCode::ServFail,
                },
                Err(_) => Reply::Drop,
            }
        }
    }
}

/// What a name in the zone holds.
enum Found {
    /// The name exists; the records of the asked type (none: no data).
    Records {
        answers: Vec<Record>,
        additionals: Vec<Record>,
    },
    NoSuchName,
}

impl Found {
    fn empty() -> Found {
        Found::Records {
            answers: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

fn lookup(zone: &Zone, names: &dyn Names, query: &Query) -> Found {
    let name = query.name().to_lowercase();
    let qtype = query.query_type();
    let wants = |t: RecordType| qtype == t || qtype == RecordType::ANY;
    // A for an IPv4 address, AAAA for an IPv6 one.
    let wants_ip = |ip: &IpAddr| wants(address_type(ip));
    // The labels in front of the domain, most specific first.
    let depth = usize::from(name.num_labels()) - usize::from(zone.origin.num_labels());
    let labels: Vec<&[u8]> = name.iter().take(depth).collect();
    let text = |l: &[u8]| std::str::from_utf8(l).ok().map(str::to_string);
    match labels.as_slice() {
        [] => {
            if wants(RecordType::SOA) {
                Found::Records {
                    answers: vec![soa(zone, names)],
                    additionals: Vec::new(),
                }
            } else {
                Found::empty()
            }
        }
        [service] => {
            let Some(service) = text(service) else {
                return Found::NoSuchName;
            };
            match names.service(&service) {
                Some(vip) => {
                    let mut answers = Vec::new();
                    if let Some(vip) = vip.filter(|v| wants_ip(&v.ip())) {
                        answers.push(a_record(&name, vip.ip()));
                    }
                    Found::Records {
                        answers,
                        additionals: Vec::new(),
                    }
                }
                // `instances.flux.` exists (its children do) even without such a service.
                None if service.as_bytes() == INSTANCES => Found::empty(),
                None => Found::NoSuchName,
            }
        }
        [srv, tcp] if tcp == b"_tcp" && srv.starts_with(b"_") => {
            let Some(service) = text(&srv[1..]) else {
                return Found::NoSuchName;
            };
            match names.service(&service) {
                None => Found::NoSuchName,
                Some(None) => Found::empty(),
                Some(Some(vip)) => {
                    if !wants(RecordType::SRV) {
                        return Found::empty();
                    }
                    let Some(target) = child(&zone.origin, &[service.as_bytes()]) else {
                        return Found::NoSuchName;
                    };
                    Found::Records {
                        answers: vec![srv_record(&name, vip.port(), target.clone())],
                        additionals: vec![a_record(&target, vip.ip())],
                    }
                }
            }
        }
        [service, sub] if *sub == INSTANCES => {
            let Some(service) = text(service) else {
                return Found::NoSuchName;
            };
            if names.service(&service).is_none() {
                return Found::NoSuchName;
            }
            let live = names.live_instances(&service);
            let mut answers = Vec::new();
            let mut additionals = Vec::new();
            let mut ips: Vec<IpAddr> = live
                .iter()
                .map(|(_, a)| a.ip())
                .filter(|ip| wants_ip(ip))
                .collect();
            ips.sort();
            ips.dedup();
            answers.extend(ips.into_iter().map(|ip| a_record(&name, ip)));
            if wants(RecordType::SRV) {
                for (instance, addr) in &live {
                    let Some(target) = child(&name, &[instance.as_bytes()]) else {
                        continue;
                    };
                    answers.push(srv_record(&name, addr.port(), target.clone()));
                    additionals.push(a_record(&target, addr.ip()));
                }
            }
            Found::Records {
                answers,
                additionals,
            }
        }
        [instance, service, sub] if *sub == INSTANCES => {
            let (Some(instance), Some(service)) = (text(instance), text(service)) else {
                return Found::NoSuchName;
            };
            // Instance names are matched as DNS matches them, without regard to case.
            let live: Vec<IpAddr> = names
                .live_instances(&service)
                .into_iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(&instance))
                .map(|(_, a)| a.ip())
                .collect();
            if live.is_empty() {
                return Found::NoSuchName;
            }
            let answers = live
                .into_iter()
                .filter(|ip| wants_ip(ip))
                .map(|ip| a_record(&name, ip))
                .collect();
            Found::Records {
                answers,
                additionals: Vec::new(),
            }
        }
        _ => Found::NoSuchName,
    }
}

/// `labels` (most specific first) in front of `parent`; None if the result is no valid name.
fn child(parent: &Name, labels: &[&[u8]]) -> Option<Name> {
    Name::from_labels(labels.iter().copied())
        .ok()?
        .append_domain(parent)
        .ok()
}

/// An A record for an IPv4 address, an AAAA record for an IPv6 one.
fn a_record(name: &Name, ip: IpAddr) -> Record {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name.clone(), TTL, data)
}

fn address_type(ip: &IpAddr) -> RecordType {
    match ip {
        IpAddr::V4(_) => RecordType::A,
        IpAddr::V6(_) => RecordType::AAAA,
    }
}

fn srv_record(name: &Name, port: u16, target: Name) -> Record {
    Record::from_rdata(name.clone(), TTL, RData::SRV(SRV::new(0, 0, port, target)))
}

/// The zone's SOA: its minimum is the TTL, so NXDOMAIN is cached no longer than an answer.
fn soa(zone: &Zone, names: &dyn Names) -> Record {
    let hostmaster = child(&zone.origin, &[b"hostmaster"]).unwrap_or_else(|| zone.origin.clone());
    Record::from_rdata(
        zone.origin.clone(),
        TTL,
        RData::SOA(SOA::new(
            zone.origin.clone(),
            hostmaster,
            names.serial(),
            60,
            10,
            600,
            TTL,
        )),
    )
}

#[cfg(test)]
#[path = "answer_tests.rs"]
mod tests;
