//! The live web page at `/`: this gateway, its peers, feeds, per-topic rates and
//! a chart of each topic's recent numeric readings, kept up to date over the
//! API's SSE follows and periodic fetches of `/health`, `/peers`, `/feeds` and
//! `/topics`. Its three files are compiled into the binary (nodes may be
//! offline: no CDN); the chart is plain SVG, no library.
//!
//! ## The token
//!
//! The files themselves hold no data and are served without the token; every
//! request for data needs it. `EventSource` can't send an `Authorization`
//! header, so the page keeps the token in `sessionStorage` and in a session
//! cookie (`SameSite=Strict`, so another site can't make the browser use it)
//! that [`token_cookie`] reads, for `GET`s only: a publish needs the header. The operator opens `http://HOST:PORT/#token=T`
//! once: the fragment never reaches the server or its logs, and the page takes
//! it out of the address bar. Without it, the page asks for the token.

use axum::{
    Router,
    http::{HeaderMap, HeaderValue, header},
    response::IntoResponse,
    routing::get,
};

/// The session cookie the page sets to carry the token.
const TOKEN_COOKIE: &str = "multifeed_token";

const INDEX_HTML: &str = include_str!("web/index.html");
const WEB_JS: &str = include_str!("web/web.js");
const WEB_CSS: &str = include_str!("web/web.css");

/// Scripts and styles from this origin only; no inline code, no frames.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page's routes.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/assets/web.js",
            get(|| async { asset("text/javascript; charset=utf-8", WEB_JS) }),
        )
        .route(
            "/assets/web.css",
            get(|| async { asset("text/css; charset=utf-8", WEB_CSS) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
}

/// The token the page's session cookie carries, if the request has one.
pub fn token_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        assert_eq!(token_cookie(&headers), None);
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("x=y; multifeed_token=abc; z=1"),
        );
        assert_eq!(token_cookie(&headers), Some("abc"));
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("not_multifeed_token=abc"),
        );
        assert_eq!(token_cookie(&headers), None);
    }

    #[test]
    fn the_page_loads_no_inline_code_and_nothing_from_elsewhere() {
        assert!(!INDEX_HTML.contains("<script>"));
        assert!(!INDEX_HTML.contains("http://") && !INDEX_HTML.contains("https://"));
        assert!(!WEB_JS.contains("innerHTML") && !WEB_JS.contains("insertAdjacentHTML"));
    }
}
