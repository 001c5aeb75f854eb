//! Harness for tests that need real iptables: throwaway network namespaces, so nothing a test
//! does can reach the machine's own rules or routes.

pub mod netns;
pub mod traffic;
