//! What a route matches of a request: its path (exact, prefix or
//! regular expression; a gRPC service and method are a path), its method
//! and its headers. Every condition given must hold; none given matches
//! everything.
//!
//! Matching reads the request's head as it is, with no allocation: string
//! comparisons, and for a regular expression the `regex` crate's search
//! (its scratch space is pooled). It runs on every request to an upstream
//! with routes, before the first attempt.

use http::{HeaderName, HeaderValue, Method, Request};

/// How a route matches the request's path (without its query).
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// The whole path.
    Exact(String),
    /// Whole segments at its start: `/v1` matches `/v1` and `/v1/models`,
    /// not `/v1beta` (Gateway API's `PathPrefix`). Kept without a
    /// trailing `/` (but `/` itself, which matches every path).
    Prefix(String),
    /// The whole path matches the expression (anchored at both ends, as
    /// Envoy's `safe_regex`).
    Regex(regex::Regex),
}

impl PartialEq for PathMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (PathMatch::Exact(a), PathMatch::Exact(b)) => a == b,
            (PathMatch::Prefix(a), PathMatch::Prefix(b)) => a == b,
            (PathMatch::Regex(a), PathMatch::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl PathMatch {
    /// A prefix as written: a trailing `/` is the same prefix.
    pub fn prefix(prefix: &str) -> Self {
        let trimmed = prefix.trim_end_matches('/');
        PathMatch::Prefix(if trimmed.is_empty() {
            "/".to_owned()
        } else {
            trimmed.to_owned()
        })
    }

    /// A regular expression matched against the whole path.
    pub fn regex(expression: &str) -> Result<Self, String> {
        // Checked as written first, so that a mistake is shown in the
        // user's text, in one line (the crate's message draws a caret
        // under it).
        let why = |e: regex::Error| {
            let text = e.to_string();
            let last = text.lines().last().unwrap_or_default();
            format!(
                "not a valid regular expression: {}",
                last.trim_start_matches("error: ")
            )
        };
        regex::Regex::new(expression).map_err(why)?;
        regex::Regex::new(&format!("^(?:{expression})$"))
            .map(PathMatch::Regex)
            .map_err(why)
    }

    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(exact) => path == exact,
            PathMatch::Prefix(prefix) => has_prefix(path, prefix),
            PathMatch::Regex(regex) => regex.is_match(path),
        }
    }

    /// Whether every path `other` matches, this matches too.
    fn covers(&self, other: &PathMatch) -> bool {
        match (self, other) {
            (PathMatch::Exact(a), PathMatch::Exact(b)) => a == b,
            (PathMatch::Prefix(a), PathMatch::Exact(b) | PathMatch::Prefix(b)) => has_prefix(b, a),
            (PathMatch::Regex(a), PathMatch::Exact(b)) => a.is_match(b),
            (PathMatch::Regex(a), PathMatch::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }

    /// The path condition as the policy file writes it.
    pub fn describe(&self) -> String {
        match self {
            PathMatch::Exact(p) => format!("path {p}"),
            PathMatch::Prefix(p) => format!("paths under {p}"),
            PathMatch::Regex(r) => format!("paths matching {}", unanchored(r.as_str())),
        }
    }
}

/// A path expression as written, without the anchors [`PathMatch::regex`]
/// adds.
fn unanchored(expression: &str) -> &str {
    expression
        .strip_prefix("^(?:")
        .and_then(|e| e.strip_suffix(")$"))
        .unwrap_or(expression)
}

/// Whether `path` starts with the whole segments of `prefix`.
fn has_prefix(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// A route's conditions on a request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteMatch {
    /// The path, if the route names one.
    pub path: Option<PathMatch>,
    /// The method, if the route names one.
    pub method: Option<Method>,
    /// Headers that must be present with these values (any of a repeated
    /// header's values may be the one).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The JSON-RPC method, if the route names one (read from the
    /// request as `jsonrpc::Call`).
    pub jsonrpc_method: Option<Box<str>>,
}

impl RouteMatch {
    /// Whether the request's head meets every condition.
    pub fn matches<B>(&self, request: &Request<B>) -> bool {
        if let Some(method) = &self.method
            && request.method() != method
        {
            return false;
        }
        if let Some(path) = &self.path
            && !path.matches(request.uri().path())
        {
            return false;
        }
        if let Some(method) = &self.jsonrpc_method {
            let call = request.extensions().get::<crate::jsonrpc::Call>();
            if call.and_then(|c| c.method.as_deref()) != Some(&**method) {
                return false;
            }
        }
        self.headers.iter().all(|(name, value)| {
            request
                .headers()
                .get_all(name)
                .iter()
                .any(|have| have == value)
        })
    }

    /// The conditions in words, for `config check`: `GET path /v1/models`,
    /// `every request`.
    pub fn describe(&self) -> String {
        let mut words: Vec<String> = Vec::new();
        if let Some(method) = &self.method {
            words.push(method.to_string());
        }
        words.extend(self.path.as_ref().map(PathMatch::describe));
        for (name, value) in &self.headers {
            words.push(format!("{name}: {}", value.to_str().unwrap_or("(bytes)")));
        }
        if let Some(method) = &self.jsonrpc_method {
            words.push(format!("JSON-RPC {method}"));
        }
        if words.is_empty() {
            "every request".to_owned()
        } else {
            words.join(", ")
        }
    }

    /// Whether every request `later` matches, this matches too: then a
    /// route with `later`'s conditions after one with these is never
    /// reached. Sound, not complete: two regular expressions are compared
    /// only as text.
    pub fn covers(&self, later: &RouteMatch) -> bool {
        let method = match (&self.method, &later.method) {
            (None, _) => true,
            (Some(a), Some(b)) => a == b,
            (Some(_), None) => false,
        };
        let path = match (&self.path, &later.path) {
            (None, _) => true,
            (Some(a), Some(b)) => a.covers(b),
            (Some(_), None) => false,
        };
        let headers = self
            .headers
            .iter()
            .all(|condition| later.headers.contains(condition));
        let jsonrpc = match (&self.jsonrpc_method, &later.jsonrpc_method) {
            (None, _) => true,
            (Some(a), Some(b)) => a == b,
            (Some(_), None) => false,
        };
        method && path && headers && jsonrpc
    }
}

/// As the policy file writes it, for `/config`.
impl serde::Serialize for RouteMatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        let path = match &self.path {
            Some(PathMatch::Exact(p)) => Some(("exact", p.as_str())),
            Some(PathMatch::Prefix(p)) => Some(("prefix", p.as_str())),
            // Without the anchors added at load.
            Some(PathMatch::Regex(r)) => Some(("regex", unanchored(r.as_str()))),
            None => None,
        };
        if let Some(path) = path {
            map.serialize_entry("path", &std::collections::BTreeMap::from([path]))?;
        }
        if let Some(method) = &self.method {
            map.serialize_entry("method", method.as_str())?;
        }
        if !self.headers.is_empty() {
            let headers: std::collections::BTreeMap<&str, &str> = self
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.to_str().unwrap_or("")))
                .collect();
            map.serialize_entry("headers", &headers)?;
        }
        if let Some(method) = &self.jsonrpc_method {
            map.serialize_entry(
                "jsonrpc",
                &std::collections::BTreeMap::from([("method", &**method)]),
            )?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn on(path: Option<PathMatch>, method: Option<&str>, headers: &[(&str, &str)]) -> RouteMatch {
        RouteMatch {
            path,
            method: method.map(|m| m.parse().unwrap()),
            headers: headers
                .iter()
                .map(|(n, v)| (n.parse().unwrap(), v.parse().unwrap()))
                .collect(),
            jsonrpc_method: None,
        }
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let v1 = PathMatch::prefix("/v1/");
        assert_eq!(v1, PathMatch::Prefix("/v1".into()));
        assert!(v1.matches("/v1"));
        assert!(v1.matches("/v1/"));
        assert!(v1.matches("/v1/models"));
        assert!(!v1.matches("/v1beta/models"));
        assert!(!v1.matches("/v"));
        let root = PathMatch::prefix("/");
        assert!(root.matches("/anything/at/all"));
    }

    #[test]
    fn exact_and_regex_take_the_whole_path_without_the_query() {
        let exact = on(Some(PathMatch::Exact("/v1/models".into())), None, &[]);
        assert!(exact.matches(&request("GET", "http://x/v1/models?limit=2", &[])));
        assert!(!exact.matches(&request("GET", "http://x/v1/models/gpt", &[])));
        let regex = on(
            Some(PathMatch::regex("/v1/models/[^/]+").unwrap()),
            None,
            &[],
        );
        assert!(regex.matches(&request("GET", "/v1/models/gpt-5", &[])));
        // Anchored: a match inside the path is not a match of the path.
        assert!(!regex.matches(&request("GET", "/api/v1/models/gpt-5", &[])));
        assert!(!regex.matches(&request("GET", "/v1/models/a/b", &[])));
        assert_eq!(
            PathMatch::regex("(").unwrap_err(),
            "not a valid regular expression: unclosed group"
        );
    }

    #[test]
    fn every_condition_must_hold() {
        let route = on(
            Some(PathMatch::prefix("/mcp")),
            Some("POST"),
            &[("mcp-method", "tools/call")],
        );
        let hit = request("POST", "/mcp", &[("mcp-method", "tools/call")]);
        assert!(route.matches(&hit));
        assert!(!route.matches(&request("GET", "/mcp", &[("mcp-method", "tools/call")])));
        assert!(!route.matches(&request("POST", "/other", &[("mcp-method", "tools/call")])));
        assert!(!route.matches(&request("POST", "/mcp", &[("mcp-method", "tools/list")])));
        assert!(!route.matches(&request("POST", "/mcp", &[])));
        // Any of a repeated header's values.
        let repeated = request(
            "POST",
            "/mcp",
            &[("mcp-method", "ping"), ("mcp-method", "tools/call")],
        );
        assert!(route.matches(&repeated));
        assert!(RouteMatch::default().matches(&request("DELETE", "/", &[])));
        assert_eq!(
            route.describe(),
            "POST, paths under /mcp, mcp-method: tools/call"
        );
        assert_eq!(RouteMatch::default().describe(), "every request");
    }

    #[test]
    fn an_earlier_route_covers_a_later_one_only_when_it_takes_all_its_requests() {
        let all = RouteMatch::default();
        let v1 = on(Some(PathMatch::prefix("/v1")), None, &[]);
        let models = on(Some(PathMatch::Exact("/v1/models".into())), None, &[]);
        let get_models = on(
            Some(PathMatch::Exact("/v1/models".into())),
            Some("GET"),
            &[],
        );
        let beta = on(Some(PathMatch::prefix("/v1beta")), None, &[]);
        let regex = on(Some(PathMatch::regex("/v1/.*").unwrap()), None, &[]);
        let tagged = on(None, None, &[("x-tier", "gold")]);
        assert!(all.covers(&v1));
        assert!(v1.covers(&models));
        assert!(v1.covers(&get_models));
        assert!(models.covers(&get_models));
        assert!(regex.covers(&models));
        assert!(all.covers(&tagged));
        // Narrower first: the later, wider route still gets the rest.
        assert!(!models.covers(&v1));
        assert!(!get_models.covers(&models));
        assert!(!v1.covers(&beta));
        assert!(!v1.covers(&all));
        assert!(!regex.covers(&v1));
        assert!(!tagged.covers(&all));
        assert!(!tagged.covers(&models));
    }
}
