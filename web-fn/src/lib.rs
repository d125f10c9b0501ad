//! web-fn: the files nobody needs a credential for, compiled in: the self-service page (`/`,
//! `/ui/app.js`, `/ui/app.css`) and the API's description (`/api/openapi.json`). A component
//! of their own: they are a third of the bytes request-fn would otherwise load on every cold
//! start, and they need no store, no secret and no outbound host. The page's configuration
//! (`/ui/config.json`) is request-fn's: it is derived from the service's settings.

use spin_sdk::http::{IntoResponse, Method, Request, Response};
use spin_sdk::http_component;

const INDEX: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/app.js");
const STYLE: &str = include_str!("../ui/app.css");
/// `openapi.json` at the root of the repository, minified by `build.rs`.
const OPENAPI: &str = include_str!(concat!(env!("OUT_DIR"), "/openapi.min.json"));

#[http_component]
fn handle(request: Request) -> anyhow::Result<impl IntoResponse> {
    Ok(serve(&request))
}

fn serve(request: &Request) -> Response {
    if !matches!(request.method(), Method::Get | Method::Head) {
        return error(405, "method_not_allowed", "these files are read with GET");
    }
    match request.path() {
        "/" => page("text/html; charset=utf-8", INDEX, sign_in_origin()),
        "/ui/app.js" => page("text/javascript; charset=utf-8", SCRIPT, None),
        "/ui/app.css" => page("text/css; charset=utf-8", STYLE, None),
        // The contract is public: the CLI, the page and anyone's client generator read it.
        "/api/openapi.json" => Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .header("cache-control", "public, max-age=300")
            .body(OPENAPI)
            .build(),
        _ => error(404, "not_found", "no such file"),
    }
}

/// The origin of the token endpoint the page redeems its sign-in code at, when sign-in is
/// configured (the Content-Security-Policy must let the page reach it).
fn sign_in_origin() -> Option<String> {
    let variable = |name| spin_sdk::variables::get(name).ok().filter(|v| !v.trim().is_empty());
    variable("oidc_client_id")?;
    origin(&variable("oidc_token_url")?)
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.trim().split_once("://")?;
    let host = rest.split(['/', '?', '#']).next().filter(|h| !h.is_empty())?;
    Some(format!("{scheme}://{host}"))
}

fn page(content_type: &str, body: &'static str, connect: Option<String>) -> Response {
    let connect = connect.map_or("'self'".to_owned(), |origin| format!("'self' {origin}"));
    Response::builder()
        .status(200)
        .header("content-type", content_type)
        .header(
            "content-security-policy",
            format!(
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src {connect}; \
                 form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
            ),
        )
        .header("x-content-type-options", "nosniff")
        .header("referrer-policy", "no-referrer")
        .header("x-frame-options", "DENY")
        .header("cache-control", "no-cache")
        .body(body)
        .build()
}

/// The API's error shape, `{"error":{"code","message"}}`.
fn error(status: u16, code: &str, message: &str) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-content-type-options", "nosniff")
        .body(format!(r#"{{"error":{{"code":"{code}","message":"{message}"}}}}"#))
        .build()
}
