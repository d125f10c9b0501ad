//! admin-fn: what admins and auditors manage: policies, webhook subscriptions, the audit
//! trail (read, export, verify, checkpoint) and the reconciler's drift reports. Routes:
//! `/api/policies/...`, `/api/webhooks/...`, `/api/audit/...` and `/api/drift`. A component
//! of its own so the requesters' hot path (request-fn) does not load their code on every cold
//! start. The rules live in `shared::service`.
//!
//! Unlike request-fn and approve-fn, it does not deliver webhooks after answering: what an
//! admin changes reaches the subscriptions with the next sweep's deliveries (within a minute),
//! and the deliverer's code stays out of this component (about 67 KB).

use shared::api::ApiError;
use shared::service::{audit, policies, reconcile, webhooks};
use shared::spin::{answer, random_bytes, segments, serve_api, stream_export};
use spin_sdk::http::{IncomingRequest, Method, Request, Response, ResponseOutparam};
use spin_sdk::http_component;

/// The export streams its body; every other route answers whole.
#[http_component]
async fn handle(incoming: IncomingRequest, response_out: ResponseOutparam) {
    let request = match shared::spin::read_request(incoming).await {
        Ok(request) => request,
        Err(refused) => return answer(response_out, refused).await,
    };
    if *request.method() == Method::Get && segments(&request, "/api") == ["audit", "export"] {
        return stream_export(&request, response_out).await;
    }
    answer(response_out, route(&request)).await;
}

fn route(request: &Request) -> Response {
    let query = request.query();
    // An unknown route is answered before any credential is looked at: nothing to audit.
    if !known(&segments(request, "/api")) {
        return shared::spin::respond(Err(ApiError::not_found(
            "no_such_route",
            format!("no API at {}", request.path().chars().take(200).collect::<String>()),
        )));
    }
    serve_api(request, |_, env, caller| match (request.method(), segments(request, "/api").as_slice()) {
        (Method::Get, ["policies"]) => policies::list(env, caller),
        (Method::Put, ["policies", name]) => {
            policies::put(env, caller, name, request.body(), policies::wants_revoke(query))
        }
        (Method::Get, ["policies", name]) => policies::get(env, caller, name),
        (Method::Delete, ["policies", name]) => policies::delete(env, caller, name, policies::wants_revoke(query)),
        (Method::Post, ["policies", name, "evaluate"]) => policies::evaluate(env, caller, name, request.body()),
        (Method::Get, ["drift"]) => reconcile::list(env, caller),
        (Method::Get, ["audit"]) => audit::list(env, caller, query),
        (Method::Get, ["audit", "verify"]) => audit::verify(env, caller, query),
        (Method::Post, ["audit", "checkpoint"]) => audit::checkpoint(env, caller),
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
        ["policies"]
            | ["policies", _]
            | ["policies", _, "evaluate"]
            | ["audit"]
            | ["audit", "export" | "verify" | "checkpoint"]
            | ["drift"]
            | ["webhooks"]
            | ["webhooks", _]
            | ["webhooks", _, "rotate-secret" | "deliveries"]
            | ["webhooks", _, "deliveries", _, "retry"]
    )
}
