//! The bytes an `http` service's client sends (`proxy::http::serve_io`): HTTP/1.1 requests or
//! an HTTP/2 connection (preface, frames, HPACK), parsed by hyper and h2 and then handled by
//! flux (header rewriting, the HTTP/2 form of the request, gRPC detection and answers). Whatever
//! the bytes, the connection ends (an answer, a reset or GOAWAY) and nothing panics. The first
//! byte picks the service's instance protocol; its one instance refuses connections, so every
//! request that gets through goes the whole way to flux's own 503.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use flux::catalog::State;
use flux::controller::routing::{route_table, Built};
use flux::metrics::Metrics;
use flux::model::{Instance, Service};
use flux::proxy::limits::Timeouts;
use flux::proxy::route_table::RouteTable;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VIP: &str = "198.18.0.1:80";

fn routes(instance_protocol: u8) -> RouteTable {
    let protocol = match instance_protocol % 3 {
        0 => "",
        1 => r#","instance_protocol":"http1""#,
        _ => r#","instance_protocol":"h2""#,
    };
    let web: Service = serde_json::from_str(&format!(
        r#"{{"name":"web","address":"{VIP}","protocol":"http"{protocol}}}"#
    ))
    .expect("a valid service record");
    let mut state = State::default();
    state.services.insert("web".into(), Arc::new(web));
    // Port 1 on loopback: refused at once, no traffic leaves the process's namespace.
    let addr = "127.0.0.1:1".parse().unwrap();
    state.instances.insert(
        ("web".into(), "i1".into()),
        Arc::new(Instance::new_static("web", "i1", addr)),
    );
    route_table(&state, &mut Built::default(), &Metrics::new())
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, wire)) = data.split_first() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let table = Arc::new(ArcSwap::from_pointee(routes(first)));
    let timeouts = Timeouts {
        connect: Duration::from_millis(200),
        http_response: Duration::from_millis(200),
        half_closed_idle: Duration::from_millis(200),
    };
    let wire = wire.to_vec();
    runtime.block_on(async move {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let served = tokio::spawn(flux::proxy::http::serve_io(
            server,
            Some([127, 0, 0, 1].into()),
            VIP.parse().unwrap(),
            table,
            timeouts,
            stop,
        ));
        let exchange = async {
            let _ = client.write_all(&wire).await;
            let _ = client.shutdown().await;
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
        };
        // Bounded: a request cut short may leave the connection waiting for more bytes.
        let _ = tokio::time::timeout(Duration::from_secs(1), exchange).await;
        served.abort();
    });
});
