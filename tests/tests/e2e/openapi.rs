//! `openapi.json` cannot drift: the checker itself refuses what the description does not
//! say, every route of the routers is described and every described route is served (and
//! only with its methods), every error code in the sources is listed with its status, and the
//! description is served as it is checked in.

use std::collections::BTreeSet;

use regex::Regex;
use serde_json::{Value, json};

use crate::contract::{SPEC, check, template};
use crate::support::*;

fn refused(method: &str, path: &str, status: u16, body: &str) -> bool {
    std::panic::catch_unwind(|| check(method, path, status, body)).is_err()
}

#[test]
fn the_checker_refuses_what_the_description_does_not_say() {
    let error = |code: &str| json!({"error": {"code": code, "message": "m"}}).to_string();
    assert!(!refused("GET", "/api/requests/abc", 404, &error("request_not_found")));
    assert!(refused("GET", "/api/requests/abc", 404, &error("a_code_nobody_documented")));
    assert!(refused("GET", "/api/requests/abc", 418, &error("request_not_found")), "an undocumented status");
    assert!(refused("GET", "/api/requests/abc", 200, "{}"), "a request without its fields");
    let extra = json!({"error": {"code": "request_not_found", "message": "m"}, "hint": "x"}).to_string();
    assert!(refused("GET", "/api/requests/abc", 404, &extra), "a field the description does not have");
    let me = json!({"principal": "a", "roles": [], "groups": [], "address": null});
    assert!(!refused("GET", "/api/whoami", 200, &me.to_string()));
    let renamed = json!({"principal": "a", "roles": [], "groups": [], "addr": null});
    assert!(refused("GET", "/api/whoami", 200, &renamed.to_string()), "a renamed field");
    assert!(refused("GET", "/api/requests/abc", 200, "not json"));
    assert!(refused("GET", "/api/nothing-here", 200, "{}"), "a route the description does not know");
    assert!(!refused("GET", "/api/nothing-here", 404, &error("no_such_route")));
    assert_eq!(template("/decide/signed-in").as_deref(), Some("/decide/signed-in"));
    assert_eq!(template("/decide/abc").as_deref(), Some("/decide/{token}"));
    assert_eq!(template("/api/requests/x/approve").as_deref(), Some("/api/requests/{id}/approve"));
}

/// Every `(Method::X, ["segment", param, ...])` arm of the components' routers, with the
/// path it serves.
fn routes_in_source() -> BTreeSet<(String, String)> {
    let arm = Regex::new(r#"\(Method::(\w+)(?: \| Method::(\w+))?, \[([^\]]*)\]\)"#).unwrap();
    let mut routes = BTreeSet::new();
    let routers = ["request-fn/src/lib.rs", "approve-fn/src/lib.rs", "admin-fn/src/lib.rs"];
    for (file, prefix) in routers.map(|file| (file, "/api")) {
        let source = std::fs::read_to_string(format!("{}/../{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        for captures in arm.captures_iter(&source) {
            let segments: Vec<&str> = captures[3].split(',').map(str::trim).collect();
            if segments.contains(&"_") || segments.iter().any(|s| s.contains("..")) {
                continue; // a refusal arm (another method on a known path)
            }
            let path: Vec<String> = segments
                .iter()
                .map(|s| if s.starts_with('"') { s.trim_matches('"').to_owned() } else { "{}".to_owned() })
                .collect();
            let prefix = match path[0].as_str() {
                "decide" => "",
                "decision" | "slack" => "/webhooks",
                _ => prefix,
            };
            for method in [captures.get(1), captures.get(2)].into_iter().flatten() {
                routes.insert((method.as_str().to_uppercase(), format!("{prefix}/{}", path.join("/"))));
            }
        }
    }
    // Answered before the router, on exact segments.
    let early = Regex::new(r#"Method::(\w+)\s*&&\s*segments\(&?request, "([^"]*)"\) == \[([^\]]*)\]"#).unwrap();
    for file in routers {
        let source = std::fs::read_to_string(format!("{}/../{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        for captures in early.captures_iter(&source) {
            let path: Vec<&str> = captures[3].split(',').map(|s| s.trim().trim_matches('"')).collect();
            routes.insert((captures[1].to_uppercase(), format!("{}/{}", &captures[2], path.join("/"))));
        }
    }
    // Matched on the whole path rather than by segments (web-fn's files among them).
    routes.insert(("POST".into(), "/webhooks/slack".into()));
    routes.insert(("GET".into(), "/".into()));
    routes.insert(("GET".into(), "/ui/{}".into()));
    routes.insert(("GET".into(), "/api/openapi.json".into()));
    routes.insert(("POST".into(), "/internal/sweep".into()));
    routes
}

fn routes_described() -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    let parameter = Regex::new(r"\{[^}]+\}").unwrap();
    for (template, item) in SPEC["paths"].as_object().unwrap() {
        let path = parameter.replace_all(template, "{}").into_owned();
        for method in ["get", "put", "post", "delete", "patch"] {
            if item[method].is_object() {
                routes.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    routes
}

#[test]
fn every_route_in_the_routers_is_described_and_every_described_route_is_routed() {
    let (source, described) = (routes_in_source(), routes_described());
    let undescribed: Vec<_> = source.difference(&described).collect();
    let unrouted: Vec<_> = described.difference(&source).collect();
    assert!(undescribed.is_empty(), "served but not in openapi.json: {undescribed:?}");
    assert!(unrouted.is_empty(), "in openapi.json but in no router: {unrouted:?}");
}

/// Every error code the sources construct with a literal, and its status.
fn codes_in_source() -> Vec<(String, u64, String)> {
    let constructor = Regex::new(r#"ApiError::(\w+)\(\s*(\d+,\s*)?"([a-z_]+)""#).unwrap();
    let mut found = Vec::new();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut files = vec![];
    let mut dirs = vec![
        format!("{root}/shared/src"),
        format!("{root}/request-fn/src"),
        format!("{root}/admin-fn/src"),
        format!("{root}/approve-fn/src"),
        format!("{root}/expire-fn/src"),
    ];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path.display().to_string());
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    for file in files {
        let source = std::fs::read_to_string(&file).unwrap();
        for captures in constructor.captures_iter(&source) {
            let status = match &captures[1] {
                "bad_request" => 400,
                "forbidden" => 403,
                "not_found" => 404,
                "conflict" => 409,
                "unprocessable" => 422,
                "bad_gateway" => 502,
                "new" => captures[2].trim_end_matches(|c: char| c == ',' || c.is_whitespace()).parse().unwrap(),
                _ => continue,
            };
            found.push((captures[3].to_owned(), status, file.display().to_string()));
        }
    }
    assert!(found.len() > 40, "the scan finds the codes: {found:?}");
    found
}

#[test]
fn every_error_code_in_the_sources_is_described_with_its_status() {
    let described = SPEC["x-error-codes"].as_object().unwrap();
    let listed = SPEC["components"]["schemas"]["ErrorCode"]["enum"].as_array().unwrap();
    for (code, status, file) in codes_in_source() {
        assert_eq!(described.get(&code).map(|c| c["status"].as_u64()), Some(Some(status)), "{code} ({file})");
        assert!(listed.contains(&json!(code)), "{code} is not in the ErrorCode enum");
    }
}

/// A concrete path for a template.
fn concrete(template: &str) -> String {
    Regex::new(r"\{[^}]+\}").unwrap().replace_all(template, "probe").into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_described_route_is_served_and_other_methods_are_refused_there() {
    let world = World::with_variables(&[("decision_link_secret", "a-long-random-decision-link-secret-value")]).await;
    for (template, item) in SPEC["paths"].as_object().unwrap() {
        for method in ["GET", "PUT", "POST", "DELETE", "PATCH"] {
            let url = format!("{}{}", world.local.host.url(), concrete(template));
            let response = world
                .client
                .request(method.parse().unwrap(), &url)
                .bearer_auth(ADMIN)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let html =
                response.headers().get("content-type").is_some_and(|c| c.to_str().unwrap().starts_with("text/html"));
            let body = response.text().await.unwrap();
            let code: Option<String> =
                serde_json::from_str::<Value>(&body).ok().and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
            let not_served = status == 405 || matches!(code.as_deref(), Some("no_such_route" | "no_route"));
            let described = item[method.to_lowercase()].is_object();
            assert_eq!(!not_served, described, "{method} {template} answered {status}: {body}");
            if !html {
                check(method, &concrete(template), status, &body);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_description_is_served_without_a_credential_and_whoami_names_the_caller() {
    let world = World::start().await;
    let (status, served) = world.call("GET", "/api/openapi.json", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(served, *SPEC, "the served description is the checked-in file");
    let (status, me) = world.call("GET", "/api/whoami", Some(ALICE), None).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!((me["principal"].as_str(), me["address"].as_str()), (Some("alice"), Some("127.0.0.1")));
    assert_eq!(me["roles"], json!(["requester"]));
    let (status, _) = world.call("GET", "/api/whoami", None, None).await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_and_its_files_are_served_as_described_with_strict_headers() {
    let world = World::with_variables(&SIGN_IN_VARIABLES).await;
    for (path, content_type) in [
        ("/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
        ("/ui/config.json", "application/json"),
    ] {
        let response = world.client.get(format!("{}{path}", world.local.host.url())).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let header = |name: &str| response.headers()[name].to_str().unwrap().to_owned();
        assert!(header("content-type").starts_with(content_type), "{path}: {}", header("content-type"));
        let csp = header("content-security-policy");
        for directive in ["default-src 'none'", "script-src 'self';", "frame-ancestors 'none'", "base-uri 'none'"] {
            assert!(csp.contains(directive), "{path}: {directive} in {csp}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        // The page (the document whose policy counts) may redeem its sign-in code at the
        // provider's token endpoint.
        if path == "/" {
            assert!(csp.contains(&format!("connect-src 'self' {}", world.local.emulator.url())), "{csp}");
        }
        assert_eq!(
            (header("x-content-type-options"), header("referrer-policy")),
            ("nosniff".into(), "no-referrer".into())
        );
        let body = response.text().await.unwrap();
        if path == "/" {
            // No inline script: every script element loads a file of the page.
            assert_eq!(body.matches("<script").count(), body.matches("<script src=\"/ui/").count(), "{body}");
            assert!(!body.contains(" style=\""), "no inline style");
        }
        if path == "/ui/config.json" {
            check("GET", path, 200, &body);
            let config: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(config["oidc"]["client_id"], AUDIENCE);
            assert_eq!(config["oidc"]["redirect_uri"], "https://jit.example.com/");
        }
    }
}
