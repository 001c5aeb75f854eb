//! IPv4 and IPv6 addresses in records: IPv4 ones encode exactly as before the type took both
//! families, IPv6 ones are written `[IP]:PORT`, and what no address may be is refused with the
//! field named.

use super::{decode, encode, Instance, Service, Validate};

const OLD_SERVICE: &str =
    r#"{"name":"web","address":"198.18.0.10:80","protocol":"tcp","balance":"round-robin"}"#;
const OLD_INSTANCE: &str =
    r#"{"service":"web","name":"db","origin":"static","address":"192.0.2.1:5432"}"#;

#[test]
fn ipv4_records_encode_byte_identically() {
    let s: Service = decode(OLD_SERVICE.as_bytes()).unwrap();
    assert!(s.address.unwrap().is_ipv4());
    assert_eq!(String::from_utf8(encode(&s)).unwrap(), OLD_SERVICE);
    let i: Instance = decode(OLD_INSTANCE.as_bytes()).unwrap();
    assert_eq!(String::from_utf8(encode(&i)).unwrap(), OLD_INSTANCE);
    assert!(s.validate().is_ok() && i.validate().is_ok());
}

#[test]
fn ipv6_records_round_trip_in_brackets() {
    let json = OLD_SERVICE.replace("198.18.0.10:80", "[fd00:18::a]:80");
    let s: Service = decode(json.as_bytes()).unwrap();
    assert_eq!(s.address_text(), "[fd00:18::a]:80");
    assert_eq!(String::from_utf8(encode(&s)).unwrap(), json);
    assert!(s.validate().is_ok());
    let json = OLD_INSTANCE.replace("192.0.2.1:5432", "[fd00::10]:5432");
    let i: Instance = decode(json.as_bytes()).unwrap();
    assert_eq!(String::from_utf8(encode(&i)).unwrap(), json);
    assert!(i.validate().is_ok());
}

#[test]
fn bad_ipv6_addresses_are_refused_naming_the_field() {
    // Not parsed at all: no brackets, a zone, garbage.
    for bad in [
        "fd00::1:80",
        "[fd00::1%eth0]:80",
        "[fd00::zz]:80",
        "[fd00::1]",
        "[]:80",
    ] {
        let json = OLD_SERVICE.replace("198.18.0.10:80", bad);
        let e = decode::<Service>(json.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("[fd00::1]:80"), "{bad}: {e}");
    }
    // Parsed, then refused as a VIP.
    for (bad, why) in [
        ("[::1]:80", "loopback"),
        ("[::]:80", "unspecified"),
        ("[ff02::1]:80", "multicast"),
        ("[fe80::1]:80", "link-local"),
        ("[::ffff:198.18.0.1]:80", "IPv4-mapped"),
        ("[fd00::1]:0", "port"),
    ] {
        let json = OLD_SERVICE.replace("198.18.0.10:80", bad);
        // decode validates what it reads.
        let e = decode::<Service>(json.as_bytes()).unwrap_err();
        assert_eq!(e.field, "address", "{bad}");
        assert!(e.to_string().contains(why), "{bad}: {e}");
    }
    // Backends may be loopback, never link-local, multicast or mapped.
    let ok = OLD_INSTANCE.replace("192.0.2.1:5432", "[::1]:5432");
    assert!(decode::<Instance>(ok.as_bytes())
        .unwrap()
        .validate()
        .is_ok());
    for bad in [
        "[fe80::1]:1",
        "[ff02::1]:1",
        "[::ffff:192.0.2.1]:1",
        "[::]:1",
    ] {
        let json = OLD_INSTANCE.replace("192.0.2.1:5432", bad);
        let e = decode::<Instance>(json.as_bytes()).unwrap_err();
        assert_eq!(e.field, "address", "{bad}");
    }
}

#[test]
fn kernel_forwarding_needs_an_ipv4_vip() {
    let json = OLD_SERVICE
        .replace("198.18.0.10:80", "[fd00::1]:80")
        .replace(r#""round-robin"}"#, r#""round-robin","forward":"kernel"}"#);
    let e = decode::<Service>(json.as_bytes()).unwrap_err();
    assert_eq!(e.field, "forward");
}
