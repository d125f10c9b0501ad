//! approve-fn: decisions on requests and grants. An approval that completes the required count
//! opens the NSG rule; a revoke removes it at once; an extend moves its end.
//! Routes: `/api/requests/:id/{approve,deny,revoke,extend}`.

use shared::api::ApiError;
use shared::service::decisions;
use shared::spin::{segments, serve_api};
use spin_sdk::http::{Method, Request, Response};
use spin_sdk::http_component;

#[http_component]
fn handle(request: Request) -> Response {
    serve_api(&request, |_, env, caller| match (request.method(), segments(&request, "/api").as_slice()) {
        (Method::Post, ["requests", id, "approve"]) => decisions::approve(env, caller, id, request.body()),
        (Method::Post, ["requests", id, "deny"]) => decisions::deny(env, caller, id, request.body()),
        (Method::Post, ["requests", id, "revoke"]) => decisions::revoke(env, caller, id, request.body()),
        (Method::Post, ["requests", id, "extend"]) => decisions::extend(env, caller, id, request.body()),
        (_, ["requests", _, "approve" | "deny" | "revoke" | "extend"]) => {
            Err(ApiError::method_not_allowed("decisions are POSTed"))
        }
        _ => Err(ApiError::not_found("no_such_route", format!("no API at {}", request.path()))),
    })
}
