//! The self-service page: static files compiled into the component (no build step, nothing
//! fetched from elsewhere), served with strict security headers, and the little configuration
//! the page needs to sign people in (`/ui/config.json`).

use shared::spin::Ctx;
use spin_sdk::http::{Method, Request, Response};

const INDEX: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/app.js");
const STYLE: &str = include_str!("../ui/app.css");

/// `scheme://host[:port]` of a URL, for the Content-Security-Policy.
fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split(['/', '?', '#']).next().filter(|h| !h.is_empty())?;
    Some(format!("{scheme}://{host}"))
}

/// Answers the page's routes (`/`, `/ui/...`); `None` for any other path.
pub fn serve(request: &Request) -> Option<Response> {
    let path = request.path();
    if path != "/" && !path.starts_with("/ui/") {
        return None;
    }
    if !matches!(request.method(), Method::Get | Method::Head) {
        return Some(shared::spin::respond(Err(shared::api::ApiError::method_not_allowed(
            "the page is read with GET",
        ))));
    }
    let config = Ctx::load().ok().map(|ctx| ctx.config);
    let sign_in = config.as_ref().and_then(|c| c.sign_in.clone());
    // The browser signs in with the provider and redeems its code at the token endpoint.
    let connect = sign_in.as_ref().and_then(|s| origin(&s.token_url));
    Some(match path {
        "/" => plain(200, "text/html; charset=utf-8", INDEX.into(), connect),
        "/ui/app.js" => plain(200, "text/javascript; charset=utf-8", SCRIPT.into(), None),
        "/ui/app.css" => plain(200, "text/css; charset=utf-8", STYLE.into(), None),
        "/ui/config.json" => {
            let public_url = config.as_ref().map(|c| c.webhooks.public_url.clone()).unwrap_or_default();
            let body = serde_json::json!({
                "oidc": sign_in.map(|s| serde_json::json!({
                    "client_id": s.client_id,
                    "authorize_url": s.authorize_url,
                    "token_url": s.token_url,
                    // Entra: a token for the API's own registration.
                    "scope": format!("openid profile {}/.default", s.client_id),
                    "redirect_uri": format!("{public_url}/"),
                })),
            });
            plain(200, "application/json", body.to_string(), None)
        }
        _ => plain(404, "text/plain; charset=utf-8", "no such file".into(), None),
    })
}

fn plain(status: u16, content_type: &str, body: String, connect: Option<String>) -> Response {
    let connect = connect.map_or("'self'".to_owned(), |origin| format!("'self' {origin}"));
    Response::builder()
        .status(status)
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
