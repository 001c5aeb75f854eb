//! Service, rule, instance and host records as read from the store or an API body
//! (`model::decode`), and `service set`'s edits. No panic; a record that decodes re-encodes and
//! decodes to the same value; an edit applied to a service gives a valid service or an error
//! naming a field.
#![no_main]

use flux::model::{self, Host, Instance, Rule, Service, ServiceEdit, Validate};
use libfuzzer_sys::fuzz_target;

fn round_trip<T>(bytes: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize + Validate + PartialEq + std::fmt::Debug,
{
    match model::decode::<T>(bytes) {
        Ok(v) => {
            let again: T = model::decode(&model::encode(&v)).expect("re-encoded record decodes");
            assert_eq!(v, again);
        }
        Err(e) => {
            assert!(!e.field.is_empty(), "error names no field: {e}");
        }
    }
}

fn edit(bytes: &[u8]) {
    round_trip::<ServiceEdit>(bytes);
    let Ok(e) = model::decode::<ServiceEdit>(bytes) else {
        return;
    };
    let web: Service = model::decode(br#"{"name":"web","address":"198.18.0.1:80"}"#)
        .expect("a valid service");
    match e.apply(&web) {
        Ok(s) => s.validate().expect("an applied edit is a valid service"),
        Err(e) => assert!(!e.field.is_empty(), "error names no field: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the kind, so one corpus serves all five.
    let Some((kind, body)) = data.split_first() else {
        return;
    };
    match kind % 5 {
        0 => round_trip::<Service>(body),
        1 => round_trip::<Rule>(body),
        2 => round_trip::<Instance>(body),
        3 => round_trip::<Host>(body),
        _ => edit(body),
    }
});
