//! gRPC seen from the proxy: which requests are gRPC calls, the status an instance ended a call
//! with (`grpc-status`, in the trailers or in a trailers-only response), and flux's own answers
//! to a gRPC client, which carry a gRPC status as well as the HTTP one so that the client's
//! library reports UNAVAILABLE or DEADLINE_EXCEEDED rather than a bare HTTP error.

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};

use super::ToClient;
use crate::metrics::{grpc_status_index, HttpMetrics};

/// gRPC status codes flux answers with itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Code {
    /// 4: the instance did not answer in time.
    DeadlineExceeded = 4,
    /// 14: no instance reachable, or it closed the connection before answering.
    Unavailable = 14,
}

/// Whether the request is a gRPC call (`content-type: application/grpc[+proto|;...]`).
pub(super) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let v = v.trim_start();
            v.len() >= 16
                && v[..16].eq_ignore_ascii_case("application/grpc")
                && matches!(v.as_bytes().get(16), None | Some(b'+' | b';'))
        })
}

/// Whether the client said it takes trailers (`TE: trailers`): the one `TE` value HTTP/2
/// allows, which gRPC requires; kept on the way to an HTTP/2 instance.
pub(super) fn wants_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// Counts the call's status if `headers` (trailers, or a trailers-only response's headers)
/// carry one; whether they did. A value that is no status code counts as `other`.
pub(super) fn count(http: &HttpMetrics, headers: &HeaderMap) -> bool {
    let Some(v) = headers.get("grpc-status") else {
        return false;
    };
    http.grpc[grpc_status_index(v.as_bytes())].inc();
    true
}

/// flux's own answer to a gRPC call: the HTTP status (as to any client) with the gRPC status
/// and message in a trailers-only response (headers that end the stream).
pub(super) fn own_answer(status: StatusCode, code: Code, message: &str) -> Response<ToClient> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from((code as u8) as u16));
    if let Ok(m) = HeaderValue::from_str(&percent_encode(message.trim_end())) {
        h.insert("grpc-message", m);
    }
    r
}

/// `grpc-message` is percent-encoded: bytes outside printable ASCII, and `%` itself.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn grpc_calls_are_told_by_their_content_type() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC;charset=x",
        ] {
            assert!(is_grpc(&headers(&[("content-type", ct)])), "{ct}");
        }
        for ct in ["application/grpc-web", "application/json", "text/plain", ""] {
            assert!(!is_grpc(&headers(&[("content-type", ct)])), "{ct}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn te_trailers_is_found_among_other_values() {
        assert!(wants_trailers(&headers(&[("te", "trailers")])));
        assert!(wants_trailers(&headers(&[("te", "gzip, Trailers;q=1")])));
        assert!(!wants_trailers(&headers(&[("te", "gzip")])));
        assert!(!wants_trailers(&HeaderMap::new()));
    }

    #[test]
    fn own_answers_are_trailers_only_with_a_grpc_status() {
        let r = own_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Unavailable,
            "no instance of service g is reachable 100%\n",
        );
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(
            r.headers()["grpc-message"],
            "no instance of service g is reachable 100%25"
        );
        assert_eq!(r.headers()["content-type"], "application/grpc");
    }
}
