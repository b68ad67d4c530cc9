//! The page and its libraries, embedded in the binary: the hand-written dashboard
//! (`crates/web/assets`) and noVNC and xterm.js from `web/node_modules` (see build.rs).
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

include!(concat!(env!("OUT_DIR"), "/vendor.rs"));

/// The dashboard's own files: (URL path, contents).
static OWN: &[(&str, &[u8])] = &[
    ("/", include_bytes!("../assets/index.html")),
    ("/app.js", include_bytes!("../assets/app.js")),
    ("/app.css", include_bytes!("../assets/app.css")),
];

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        _ => "text/html; charset=utf-8",
    }
}

/// Only this origin's scripts, styles (noVNC sets inline styles), images and connections.
const CSP: &str = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; connect-src 'self'; frame-ancestors 'none'";

/// Serves an embedded file, or 404.
pub async fn serve(uri: Uri) -> Response {
    let path = uri.path();
    let Some((_, body)) = OWN.iter().chain(VENDOR.iter()).find(|(p, _)| *p == path) else {
        return (StatusCode::NOT_FOUND, format!("ray web has no page {path}")).into_response();
    };
    let mut r = (StatusCode::OK, *body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_libraries_are_embedded() {
        for want in [
            "/vendor/novnc/core/rfb.js",
            "/vendor/xterm/lib/xterm.js",
            "/vendor/xterm/css/xterm.css",
            "/vendor/novnc/vendor/pako/lib/zlib/inflate.js",
        ] {
            assert!(
                VENDOR.iter().any(|(p, b)| *p == want && !b.is_empty()),
                "{want} is not embedded"
            );
        }
    }
}
