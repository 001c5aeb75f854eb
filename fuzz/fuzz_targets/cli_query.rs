//! `fluxctl query`'s inputs as fluxd and fluxctl read them: the query string of
//! `GET /v1/instances` (filters, with images in any form Docker accepts and an optional tag),
//! the `--format` template in both spellings (`{{name}}`, `{{.Name}}`, `{{json .}}`), and the
//! image filter alone. No panic; an accepted query string prints back as one that parses to
//! the same filters; an accepted template renders.
#![no_main]

use flux::api::views::{InstanceQuery, InstanceView};
use flux::cli::output::{check_template, render_template};
use flux::docker::image::split_filter;
use flux::model::Instance;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(q) = InstanceQuery::parse(s) {
        let again = InstanceQuery::parse(&q.to_query_string())
            .expect("a query fluxd accepted prints back as one it accepts");
        assert_eq!(q, again);
    }
    if check_template(s).is_ok() {
        let view = InstanceView::new(&Instance::new_static(
            "web",
            "b1",
            "192.0.2.1:80".parse().expect("a valid address"),
        ));
        let _ = render_template(s, &view);
    }
    let _ = split_filter(s);
});
