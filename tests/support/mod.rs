//! Harness code shared by the black-box tests. Each test file uses the parts it needs.
#![allow(dead_code)]

pub mod backend;
pub mod base_image;
pub mod browser;
pub mod client_loop;
pub mod docker;
pub mod etcd;
pub mod fluxd;
pub mod http_backend;
pub mod netns;
pub mod nginx;
pub mod openmetrics;
pub mod steered;
pub mod udp_backend;
pub mod websocket;
