//! The interfaces whose connections to VIPs are steered: `lo` (the host's own processes) and
//! those matching `--bridge-interfaces` (Docker bridges; a trailing `+` matches any suffix, as
//! in iptables). Read from the kernel each time, since bridges come and go with Docker
//! networks.

use std::collections::BTreeMap;
use std::ffi::CStr;

/// Whether `name` matches `pattern` (`docker0`, or `br-+` for every `br-` name).
pub fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('+') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

/// `lo` and the interfaces of this network namespace matching `patterns`, by index.
pub fn steered(patterns: &[String]) -> std::io::Result<BTreeMap<u32, String>> {
    Ok(all()?
        .into_iter()
        .filter(|(_, name)| name == "lo" || patterns.iter().any(|p| matches(p, name)))
        .collect())
}

/// Every interface of this network namespace, by index (for `fluxd debug`).
pub fn all_names() -> std::io::Result<BTreeMap<u32, String>> {
    Ok(all()?.into_iter().collect())
}

/// Every interface of the calling thread's network namespace (`if_nameindex(3)`, netlink).
fn all() -> std::io::Result<Vec<(u32, String)>> {
    // SAFETY: if_nameindex returns a heap array ending with a zero entry, or NULL on failure;
    // it is read up to that entry and freed once.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut at = list;
        while (*at).if_index != 0 && !(*at).if_name.is_null() {
            let name = CStr::from_ptr((*at).if_name).to_string_lossy().into_owned();
            out.push(((*at).if_index, name));
            at = at.add(1);
        }
        libc::if_freenameindex(list);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_as_iptables_reads_them() {
        assert!(matches("docker0", "docker0"));
        assert!(!matches("docker0", "docker01"));
        assert!(matches("br-+", "br-1a2b"));
        assert!(matches("br-+", "br-"));
        assert!(!matches("br-+", "eth0"));
    }

    #[test]
    fn lo_is_always_there() {
        let got = steered(&[]).unwrap();
        assert_eq!(got.get(&1).map(String::as_str), Some("lo"));
    }
}
