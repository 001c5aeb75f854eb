//! `fluxd edge --service NAME=[ADDR]:PORT[@SERVER_NAME,...]`. No panic; an accepted site
//! holds a valid service name, a usable listen argument and nginx-safe server names, and
//! writing it back out gives the same site.
#![no_main]

use flux::edge::config::parse_site;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(site) = parse_site(s) else {
        return;
    };
    assert!(flux::model::validate::name("service", &site.service).is_ok());
    // Nothing in an accepted site can end an nginx directive or open a block.
    let safe = |t: &str| !t.contains([';', '{', '}', '\n', '\r', ' ', '"', '\'', '#', '$']);
    assert!(safe(&site.listen), "{:?}", site.listen);
    for n in &site.server_names {
        assert!(!n.is_empty() && safe(n), "{n:?}");
        assert_eq!(n, &n.to_ascii_lowercase());
    }
    let listen = if site.listen.bytes().all(|b| b.is_ascii_digit()) {
        format!(":{}", site.listen)
    } else {
        site.listen.clone()
    };
    let mut text = format!("{}={listen}", site.service);
    if !site.server_names.is_empty() {
        text.push('@');
        text.push_str(&site.server_names.join(","));
    }
    let again = parse_site(&text).expect("a written-out site parses");
    assert_eq!(site, again);
});
