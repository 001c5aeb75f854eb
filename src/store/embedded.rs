//! Embedded store backend (to be written).
