//! request-fn: access requests (create, read, list, cancel), the health check and who the
//! caller is (`/api/whoami`); and the self-service page's configuration (`/ui/config.json`,
//! see `ui`). Routes: `/api/...` except what approve-fn (decisions), admin-fn (policies,
//! webhooks, audit, drift) and web-fn (`/api/openapi.json`) own. The rules live in
//! `shared::service`.

mod ui;

use shared::api::{ApiError, query_param};
use shared::service::{health, requests, whoami};
use shared::spin::{answer, deliver_after_answer, new_request_id, segments, serve_api, serve_public};
use spin_sdk::http::{IncomingRequest, Method, Request, Response, ResponseOutparam};
use spin_sdk::http_component;

#[http_component]
async fn handle(incoming: IncomingRequest, response_out: ResponseOutparam) {
    let request = match shared::spin::read_request(incoming).await {
        Ok(request) => request,
        Err(refused) => return answer(response_out, refused).await,
    };
    let change = !matches!(request.method(), Method::Get | Method::Head | Method::Options);
    let response = route(&request);
    let changed = change && *response.status() < 400;
    answer(response_out, response).await;
    // The caller has its answer: now tell the subscriptions (the sweep sends what this leaves).
    // Only after a change that was made: a flood of refusals sets nothing off.
    if changed {
        deliver_after_answer();
    }
}

fn route(request: &Request) -> Response {
    if let Some(page) = ui::serve(request) {
        return page;
    }
    let query = request.query();
    // The watchdog answers without a credential (only ok or failing); with one, in detail.
    if *request.method() == Method::Get
        && segments(request, "/api") == ["health"]
        && request.header("authorization").is_none()
    {
        return serve_public(health::public);
    }
    // An unknown route is answered before any credential is looked at: nothing to audit.
    if !known(&segments(request, "/api")) {
        return shared::spin::respond(Err(ApiError::not_found(
            "no_such_route",
            format!("no API at {}", request.path().chars().take(200).collect::<String>()),
        )));
    }
    serve_api(request, |ctx, env, caller| match (request.method(), segments(request, "/api").as_slice()) {
        (Method::Get, ["whoami"]) => Ok(whoami::whoami(caller, ctx.client_ip(request))),
        (Method::Post, ["requests"]) => {
            requests::create(env, caller, ctx.client_ip(request), new_request_id(), request.body())
        }
        (Method::Get, ["requests"]) => {
            let state = query_param(query, "state");
            let filter = requests::ListFilter {
                state: state.as_deref(),
                mine: query_param(query, "mine").as_deref() == Some("true"),
                awaiting_me: query_param(query, "awaiting").as_deref() == Some("me"),
            };
            requests::list(env, caller, filter)
        }
        (Method::Get, ["health"]) => health::detailed(env, caller),
        (Method::Get, ["requests", id]) => requests::get(env, caller, id),
        (Method::Post, ["requests", id, "cancel"]) => requests::cancel(env, caller, id),
        // Unknown paths were answered above: a known one with another method.
        _ => Err(ApiError::method_not_allowed(format!("{} is not supported on {}", request.method(), request.path()))),
    })
}

/// Whether a path is one of this component's routes (in any method).
fn known(path: &[&str]) -> bool {
    matches!(path, ["whoami"] | ["requests"] | ["requests", _] | ["requests", _, "cancel"] | ["health"])
}
