//! The headers of an `Upgrade` request and of an instance's 101 (`proxy::http::upgrade`), as
//! they come from a client or an instance: whatever they hold, no panic; an upgrade is asked
//! for only with `Connection: upgrade`, never for h2c; the 101 the client gets says
//! `Connection: upgrade` and carries none of the instance's hop-by-hop framing.
#![no_main]

use flux::proxy::http::upgrade::{protocols, switched_headers};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Version;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // One header a line, "name: value"; lines hyper would refuse are left out as it would.
    let mut headers = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    if let Some(p) = protocols(Version::HTTP_11, &headers) {
        let p = p.to_str().expect("built from visible ASCII");
        assert!(!p.trim().is_empty());
        for token in p.split(',') {
            let name = token.split('/').next().unwrap().trim();
            assert!(!name.eq_ignore_ascii_case("h2c"), "{p}");
        }
        let listed = headers
            .get_all("connection")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        assert!(listed);
    }
    assert!(protocols(Version::HTTP_10, &headers).is_none());
    let out = switched_headers(&headers);
    assert_eq!(out.get_all("connection").iter().count(), 1);
    assert_eq!(out["connection"], "upgrade");
    for hop in ["keep-alive", "transfer-encoding", "te", "trailer", "proxy-connection"] {
        assert!(out.get(hop).is_none(), "{hop}");
    }
    assert_eq!(
        out.get_all("upgrade").iter().count(),
        headers.get_all("upgrade").iter().count()
    );
});
