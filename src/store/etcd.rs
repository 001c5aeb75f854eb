//! etcd store backend (to be written).
