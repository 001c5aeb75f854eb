//! `fluxctl select` flags: `--image`, `--tag`, `--labels k=v,...`, `--env k=v,...`, split
//! from one input at NUL bytes. No panic; an accepted `k=v` list joins back to the same
//! text's meaning; an accepted selector validates and survives the store's JSON round trip.
//! Also `service add --health SPEC`: an accepted spec validates and prints back as itself.
#![no_main]

use flux::cli::SelectorArgs;
use flux::model::{self, validate, HealthCheck, Rule, Validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(map) = validate::parse_pairs("labels", s) {
        assert!(!map.is_empty() && map.len() <= validate::MAX_PAIRS);
        assert!(validate::pairs("labels", &map).is_ok());
        let joined: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let again = validate::parse_pairs("labels", &joined.join(",")).unwrap();
        assert_eq!(map, again);
    }
    match s.parse::<HealthCheck>() {
        Ok(h) => {
            assert!(h.validate().is_ok());
            assert_eq!(h.spec(), s);
        }
        Err(e) => assert_eq!(e.field, "health"),
    }
    let mut fields = s.split('\0');
    let mut next = || fields.next().filter(|f| !f.is_empty()).map(str::to_string);
    let args = SelectorArgs {
        image: next(),
        tag: next(),
        labels: next(),
        env: next(),
    };
    let Ok(selector) = args.to_selector() else {
        return;
    };
    if selector.validate().is_err() {
        return;
    }
    let rule = Rule {
        service: "web".into(),
        name: "v1".into(),
        selector,
        instance_port: None,
        weight: None,
    };
    let bytes = model::encode(&rule);
    let back: Rule = model::decode(&bytes).expect("a valid rule decodes after encoding");
    assert_eq!(rule, back);
});
