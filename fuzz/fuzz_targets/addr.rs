//! Addresses, ports and the name/image/tag checks every input path goes through
//! (`model::validate`): no panic, and what is accepted reads back the same.
#![no_main]

use flux::model::validate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(a) = validate::parse_socket_addr("address", s) {
        // An accepted address prints as something that parses back to itself.
        let again = validate::parse_socket_addr("address", &a.to_string()).unwrap();
        assert_eq!(a, again);
        assert_ne!(a.port(), 0);
        let _ = validate::vip("address", &a);
        let _ = validate::backend("address", &a);
    }
    if let Ok(p) = validate::parse_port("port", s) {
        assert_ne!(p, 0);
        assert!(validate::port("port", p).is_ok());
    }
    if validate::name("name", s).is_ok() {
        // Safe as a key segment, an iptables comment and a DNS label.
        assert!(!s.is_empty() && s.len() <= 63);
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
    }
    if validate::host_name("host", s).is_ok() {
        assert!(!s.contains('/') && !s.contains('\n'));
    }
    if validate::image("image", s).is_ok() {
        assert!(!s.contains('@') && !s.is_empty());
        // An accepted image is its own canonical form's repository.
        let canon = flux::docker::image::canonical_repository(s);
        assert_eq!(flux::docker::image::canonical_repository(&canon), canon);
    }
    if validate::tag("tag", s).is_ok() {
        assert!(!s.contains(':') && !s.contains('/'));
    }
    // Errors always name their field.
    if let Err(e) = validate::parse_socket_addr("address", s) {
        assert_eq!(e.field, "address");
    }
});
