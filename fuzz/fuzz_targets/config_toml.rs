//! fluxd's config file (`Config::from_toml_str`, the same path as `fluxd run --config`). No
//! panic; an accepted config holds only values `fluxd run` would accept.
#![no_main]

use flux::daemon::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The host's own name and address are read when the file gives none; give them, so the
    // target does not spend its time in syscalls.
    let mut text = text.to_string();
    if !text.contains("host_name") {
        text.insert_str(0, "host_name = \"fuzz\"\n");
    }
    if !text.contains("host_ip") {
        text.insert_str(0, "host_ip = \"192.0.2.1\"\n");
    }
    match Config::from_toml_str(&text) {
        Ok(c) => {
            assert!(flux::model::validate::host_name("host_name", &c.host_name).is_ok());
            assert_ne!(c.proxy_port, 0);
            assert!(c.max_connections > 0);
            assert!(c.etcd_prefix.starts_with('/') && c.etcd_prefix.ends_with('/'));
            assert!((2..=300).contains(&c.host_ttl.as_secs()));
            assert!(c.drain.as_secs() <= 3600);
            for i in &c.bridge_interfaces {
                assert!(!i.is_empty() && i.len() <= 15 && !i.contains(['\n', '"', ' ']));
            }
            for r in &c.vip_ranges {
                assert!(r.prefix_len() >= 8);
            }
        }
        Err(e) => {
            // Errors are one line naming the setting at fault.
            let msg = format!("{e:#}");
            assert!(!msg.is_empty());
        }
    }
});
