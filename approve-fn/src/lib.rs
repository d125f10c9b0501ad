//! approve-fn: decisions on requests and grants. An approval that completes the required count
//! opens the NSG rule; a revoke removes it at once; an extend moves its end.
//! Routes: `/api/requests/:id/{approve,deny,revoke,extend}`, and decisions from integrations
//! at `/webhooks/decision`, and decision links (`/decide/{token}`).

use shared::api::ApiError;
use shared::service::decisions;
use shared::spin::{
    accept_slack, answer, deliver_after_answer, follow_up_slack, respond, segments, serve_api, serve_decision_link,
    serve_integration, serve_signed_in,
};
use spin_sdk::http::{IncomingRequest, Method, Request, Response, ResponseOutparam};
use spin_sdk::http_component;

/// Answers, then tells the webhook subscriptions what changed.
#[http_component]
async fn handle(incoming: IncomingRequest, response_out: ResponseOutparam) {
    let request = match shared::spin::read_request(incoming).await {
        Ok(request) => request,
        Err(refused) => return answer(response_out, refused).await,
    };
    // Slack wants its answer within 3 seconds: acknowledge, then act.
    if *request.method() == Method::Post && request.path() == "/webhooks/slack" {
        let (response, click) = accept_slack(&request);
        answer(response_out, response).await;
        if let Some(click) = click {
            follow_up_slack(click);
        }
        return;
    }
    let response = route(&request);
    let changed = *request.method() == Method::Post && *response.status() < 400;
    answer(response_out, response).await;
    // Only after a change that was made: refusals set nothing off.
    if changed {
        deliver_after_answer();
    }
}

fn route(request: &Request) -> Response {
    match (request.method(), segments(request, "").as_slice()) {
        (Method::Get, ["decide", "signed-in"]) => return serve_signed_in(request),
        (_, ["decide", "signed-in"]) => {
            return respond(Err(ApiError::method_not_allowed("the identity provider sends the browser back with GET")));
        }
        (Method::Get | Method::Post, ["decide", token]) => return serve_decision_link(request, token),
        _ => {}
    }
    match (request.method(), segments(request, "/webhooks").as_slice()) {
        (Method::Post, ["decision"]) if request.path().starts_with("/webhooks/") => return serve_integration(request),
        (_, ["decision"]) if request.path().starts_with("/webhooks/") => {
            return respond(Err(ApiError::method_not_allowed("decisions are POSTed")));
        }
        _ if request.path().starts_with("/webhooks/") => {
            return respond(Err(ApiError::not_found("no_such_route", "no such webhook endpoint")));
        }
        _ => {}
    }
    serve_api(request, |_, env, caller| match (request.method(), segments(request, "/api").as_slice()) {
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
