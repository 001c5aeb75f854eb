//! The web UI's static files, compiled into fluxd: no build step and nothing fetched from the
//! internet at run time. The page reads the read-only API (`/v1/services`, `/v1/series`).

/// The file for a request path, with its content type.
pub fn asset(path: &str) -> Option<(&'static str, &'static [u8])> {
    match path {
        "/" | "/ui" | "/ui/" | "/index.html" => Some((
            "text/html; charset=utf-8",
            include_bytes!("index.html").as_slice(),
        )),
        "/ui/app.js" => Some((
            "text/javascript; charset=utf-8",
            include_bytes!("app.js").as_slice(),
        )),
        "/ui/style.css" => Some((
            "text/css; charset=utf-8",
            include_bytes!("style.css").as_slice(),
        )),
        _ => None,
    }
}
