//! Service, rule, instance and host records as read from the store or an API body
//! (`model::decode`). No panic; a record that decodes re-encodes and decodes to the same value.
#![no_main]

use flux::model::{self, Host, Instance, Rule, Service, Validate};
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

fuzz_target!(|data: &[u8]| {
    // The first byte picks the kind, so one corpus serves all four.
    let Some((kind, body)) = data.split_first() else {
        return;
    };
    match kind % 4 {
        0 => round_trip::<Service>(body),
        1 => round_trip::<Rule>(body),
        2 => round_trip::<Instance>(body),
        _ => round_trip::<Host>(body),
    }
});
