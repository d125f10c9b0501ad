//! request-fn: policies (admin) and access requests (create, read, list, cancel).
//! Routes: `/api/...` except what approve-fn owns. The rules live in `shared::service`.

use shared::api::{ApiError, query_param};
use shared::service::{policies, requests};
use shared::spin::{new_request_id, segments, serve_api};
use spin_sdk::http::{Method, Request, Response};
use spin_sdk::http_component;

#[http_component]
fn handle(request: Request) -> Response {
    let query = request.query();
    serve_api(&request, |ctx, env, caller| match (request.method(), segments(&request, "/api").as_slice()) {
        (Method::Get, ["policies"]) => policies::list(env, caller),
        (Method::Put, ["policies", name]) => {
            policies::put(env, caller, name, request.body(), policies::wants_revoke(query))
        }
        (Method::Get, ["policies", name]) => policies::get(env, caller, name),
        (Method::Delete, ["policies", name]) => policies::delete(env, caller, name, policies::wants_revoke(query)),
        (Method::Post, ["requests"]) => {
            requests::create(env, caller, ctx.client_ip(&request), new_request_id(), request.body())
        }
        (Method::Post, ["policies", name, "evaluate"]) => policies::evaluate(env, caller, name, request.body()),
        (Method::Get, ["requests"]) => {
            let filter = requests::ListFilter {
                state: query_param(query, "state"),
                mine: query_param(query, "mine") == Some("true"),
                awaiting_me: query_param(query, "awaiting") == Some("me"),
            };
            requests::list(env, caller, filter)
        }
        (Method::Get, ["requests", id]) => requests::get(env, caller, id),
        (Method::Post, ["requests", id, "cancel"]) => requests::cancel(env, caller, id),
        (
            _,
            ["policies"]
            | ["policies", _]
            | ["policies", _, "evaluate"]
            | ["requests"]
            | ["requests", _]
            | ["requests", _, "cancel"],
        ) => Err(ApiError::method_not_allowed(format!("{} is not supported on {}", request.method(), request.path()))),
        _ => Err(ApiError::not_found("no_such_route", format!("no API at {}", request.path()))),
    })
}
