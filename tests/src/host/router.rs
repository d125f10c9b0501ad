//! Spin's HTTP routing: exact routes beat parameterised ones, which beat wildcards; among
//! wildcards the longest prefix wins. Also computes the `spin-*` headers of a match.

/// One route of the manifest.
#[derive(Clone, Debug)]
struct Route {
    pattern: String,
    segments: Vec<Segment>,
    wildcard: bool,
    component: String,
}

#[derive(Clone, Debug, PartialEq)]
enum Segment {
    Literal(String),
    Param(String),
}

/// The outcome of routing one path.
#[derive(Debug, PartialEq)]
pub struct RouteMatch {
    /// The component to run.
    pub component: String,
    /// The route as written in the manifest.
    pub route: String,
    /// The part of the path after a wildcard route's prefix (`spin-path-info`).
    pub path_info: String,
    /// `:name` segments and their values.
    pub params: Vec<(String, String)>,
}

/// The routes of an application.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// Adds a route (`/x`, `/x/:id/y`, `/x/...`).
    pub fn add(&mut self, pattern: &str, component: &str) {
        let (base, wildcard) = match pattern.strip_suffix("/...") {
            Some(base) => (base, true),
            None if pattern == "/..." => ("", true),
            None => (pattern, false),
        };
        let segments = base
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| match s.strip_prefix(':') {
                Some(name) => Segment::Param(name.to_owned()),
                None => Segment::Literal(s.to_owned()),
            })
            .collect();
        self.routes.push(Route { pattern: pattern.to_owned(), segments, wildcard, component: component.to_owned() });
    }

    /// The route for a path, if any.
    pub fn route(&self, path: &str) -> Option<RouteMatch> {
        let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let mut best: Option<(u8, usize, RouteMatch)> = None;
        for route in &self.routes {
            if parts.len() < route.segments.len() || (!route.wildcard && parts.len() != route.segments.len()) {
                continue;
            }
            let mut params = Vec::new();
            let matched = route.segments.iter().zip(&parts).all(|(segment, part)| match segment {
                Segment::Literal(literal) => literal == part,
                Segment::Param(name) => {
                    params.push((name.clone(), (*part).to_owned()));
                    true
                }
            });
            if !matched {
                continue;
            }
            let rank = match (route.wildcard, params.is_empty()) {
                (false, true) => 3,
                (false, false) => 2,
                (true, _) => 1,
            };
            let length = route.segments.len();
            let path_info = if route.wildcard { format!("/{}", parts[length..].join("/")) } else { String::new() };
            let candidate =
                RouteMatch { component: route.component.clone(), route: route.pattern.clone(), path_info, params };
            if best.as_ref().is_none_or(|(r, l, _)| (rank, length) > (*r, *l)) {
                best = Some((rank, length, candidate));
            }
        }
        best.map(|(_, _, m)| m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let mut router = Router::default();
        router.add("/api/...", "request-fn");
        router.add("/api/requests/:id/approve", "approve-fn");
        router.add("/internal/sweep", "expire-fn");
        router.add("/api/requests/...", "longer-wildcard");
        router
    }

    #[test]
    fn parameterised_routes_beat_wildcards_and_capture_segments() {
        let m = router().route("/api/requests/abc/approve").unwrap();
        assert_eq!(m.component, "approve-fn");
        assert_eq!(m.params, [("id".to_string(), "abc".to_string())]);
    }

    #[test]
    fn the_longest_wildcard_prefix_wins_and_sets_path_info() {
        let m = router().route("/api/requests/abc/cancel").unwrap();
        assert_eq!((m.component.as_str(), m.path_info.as_str()), ("longer-wildcard", "/abc/cancel"));
        let m = router().route("/api/policies/x").unwrap();
        assert_eq!((m.component.as_str(), m.path_info.as_str()), ("request-fn", "/policies/x"));
    }

    #[test]
    fn exact_routes_match_only_themselves() {
        assert_eq!(router().route("/internal/sweep").unwrap().component, "expire-fn");
        assert!(router().route("/internal/sweep/more").is_none());
        assert!(router().route("/other").is_none());
    }
}
