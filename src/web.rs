//! What the status pages (the sidecar's and the control plane's) share:
//! HTML escaping, and the check that keeps a page on the web from making
//! changes through an operator's browser.

use http::Request;

/// Escapes text for HTML (element content and quoted attributes).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Whether a browser sent `request` from a page of another origin: its
/// `Origin` names another host and port than the one it was sent to (the
/// `Host` header, or HTTP/2's `:authority`). A request without `Origin`
/// (curl, the CLI) is not a browser's.
pub fn cross_origin<B>(request: &Request<B>) -> bool {
    let Some(origin) = request.headers().get(http::header::ORIGIN) else {
        return false;
    };
    let host = request
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    let authority = origin.to_str().ok().and_then(|o| {
        o.strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"))
    });
    match (authority, host) {
        (Some(authority), Some(host)) => !authority.eq_ignore_ascii_case(host),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_html() {
        assert_eq!(
            escape("<b a=\"1\">&'</b>"),
            "&lt;b a=&quot;1&quot;&gt;&amp;&#39;&lt;/b&gt;"
        );
    }

    #[test]
    fn only_a_page_of_this_host_and_port_is_same_origin() {
        let request = |origin: Option<&str>, host: &str| {
            let mut builder = Request::get("/").header("host", host);
            if let Some(origin) = origin {
                builder = builder.header("origin", origin);
            }
            builder.body(()).unwrap()
        };
        assert!(!cross_origin(&request(None, "127.0.0.1:15000")));
        assert!(!cross_origin(&request(
            Some("http://127.0.0.1:15000"),
            "127.0.0.1:15000"
        )));
        assert!(cross_origin(&request(
            Some("http://127.0.0.1:8080"),
            "127.0.0.1:15000"
        )));
        assert!(cross_origin(&request(Some("null"), "127.0.0.1:15000")));
        let h2 = Request::get("http://127.0.0.1:7001/x")
            .header("origin", "http://127.0.0.1:7001")
            .body(())
            .unwrap();
        assert!(!cross_origin(&h2), "HTTP/2's :authority is the host");
    }
}
