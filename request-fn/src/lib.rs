//! request-fn: policies (admin), access requests (create, read, list, cancel), the audit
//! trail (read, export, verify, checkpoint), the reconciler's drift reports, webhook
//! subscriptions, the health check and who the caller is (`/api/whoami`); and the
//! self-service page's configuration (`/ui/config.json`, see `ui`). Routes: `/api/...` except
//! what approve-fn and web-fn own. The rules live in `shared::service`.

mod ui;

use shared::api::{ApiError, query_param};
use shared::service::{audit, health, policies, reconcile, requests, webhooks, whoami};
use shared::spin::{
    answer, deliver_after_answer, new_request_id, random_bytes, segments, serve_api, serve_public, stream_export,
};
use spin_sdk::http::conversions::TryFromIncomingRequest;
use spin_sdk::http::{IncomingRequest, Method, Request, Response, ResponseOutparam};
use spin_sdk::http_component;

/// The export streams its body; every other route answers whole.
#[http_component]
async fn handle(incoming: IncomingRequest, response_out: ResponseOutparam) {
    let request = match Request::try_from_incoming_request(incoming).await {
        Ok(request) => request,
        Err(error) => {
            let refused = ApiError::bad_request("unreadable_request", format!("cannot read the request: {error}"));
            return answer(response_out, shared::spin::respond(Err(refused))).await;
        }
    };
    if *request.method() == Method::Get && segments(&request, "/api") == ["audit", "export"] {
        return stream_export(&request, response_out).await;
    }
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
        (Method::Get, ["policies"]) => policies::list(env, caller),
        (Method::Put, ["policies", name]) => {
            policies::put(env, caller, name, request.body(), policies::wants_revoke(query))
        }
        (Method::Get, ["policies", name]) => policies::get(env, caller, name),
        (Method::Delete, ["policies", name]) => policies::delete(env, caller, name, policies::wants_revoke(query)),
        (Method::Post, ["requests"]) => {
            requests::create(env, caller, ctx.client_ip(request), new_request_id(), request.body())
        }
        (Method::Post, ["policies", name, "evaluate"]) => policies::evaluate(env, caller, name, request.body()),
        (Method::Get, ["requests"]) => {
            let state = query_param(query, "state");
            let filter = requests::ListFilter {
                state: state.as_deref(),
                mine: query_param(query, "mine").as_deref() == Some("true"),
                awaiting_me: query_param(query, "awaiting").as_deref() == Some("me"),
            };
            requests::list(env, caller, filter)
        }
        (Method::Get, ["drift"]) => reconcile::list(env, caller),
        (Method::Get, ["health"]) => health::detailed(env, caller),
        (Method::Get, ["audit"]) => audit::list(env, caller, query),
        (Method::Get, ["audit", "verify"]) => audit::verify(env, caller, query),
        (Method::Post, ["audit", "checkpoint"]) => audit::checkpoint(env, caller),
        (Method::Get, ["requests", id]) => requests::get(env, caller, id),
        (Method::Post, ["requests", id, "cancel"]) => requests::cancel(env, caller, id),
        (Method::Get, ["webhooks"]) => webhooks::list(env, caller),
        (Method::Put, ["webhooks", name]) => webhooks::put(env, caller, name, request.body(), random_bytes(32)),
        (Method::Get, ["webhooks", name]) => webhooks::get(env, caller, name),
        (Method::Delete, ["webhooks", name]) => webhooks::delete(env, caller, name),
        (Method::Post, ["webhooks", name, "rotate-secret"]) => {
            webhooks::rotate_secret(env, caller, name, random_bytes(32))
        }
        (Method::Get, ["webhooks", name, "deliveries"]) => webhooks::deliveries(env, caller, name),
        (Method::Post, ["webhooks", name, "deliveries", id, "retry"]) => webhooks::retry(env, caller, name, id),
        // Unknown paths were answered above: a known one with another method.
        _ => Err(ApiError::method_not_allowed(format!("{} is not supported on {}", request.method(), request.path()))),
    })
}

/// Whether a path is one of this component's routes (in any method).
fn known(path: &[&str]) -> bool {
    matches!(
        path,
        ["whoami"]
            | ["policies"]
            | ["policies", _]
            | ["policies", _, "evaluate"]
            | ["requests"]
            | ["requests", _]
            | ["requests", _, "cancel"]
            | ["audit"]
            | ["audit", "export" | "verify" | "checkpoint"]
            | ["drift"]
            | ["health"]
            | ["webhooks"]
            | ["webhooks", _]
            | ["webhooks", _, "rotate-secret" | "deliveries"]
            | ["webhooks", _, "deliveries", _, "retry"]
    )
}
