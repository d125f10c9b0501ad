//! The self-service page's configuration (`/ui/config.json`): what the page needs to sign
//! people in, derived from the service's settings. The page's files are web-fn's.

use shared::spin::Ctx;
use spin_sdk::http::{Method, Request, Response};

/// Answers `/ui/config.json`; `None` for any other path.
pub fn serve(request: &Request) -> Option<Response> {
    if request.path() != "/ui/config.json" {
        return None;
    }
    if !matches!(request.method(), Method::Get | Method::Head) {
        return Some(shared::spin::respond(Err(shared::api::ApiError::method_not_allowed(
            "the page's configuration is read with GET",
        ))));
    }
    let config = Ctx::load().ok().map(|ctx| ctx.config);
    let sign_in = config.as_ref().and_then(|c| c.sign_in.clone());
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
    Some(
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            // The page's own headers (web-fn), should a browser open it as a document.
            .header(
                "content-security-policy",
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
                 form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            )
            .header("x-content-type-options", "nosniff")
            .header("referrer-policy", "no-referrer")
            .header("x-frame-options", "DENY")
            .header("cache-control", "no-cache")
            .body(body.to_string())
            .build(),
    )
}
