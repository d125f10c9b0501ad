//! expire-fn: the sweep. Runs on every cron tick (the `fermyon:spin-cron` export) and on
//! `POST /internal/sweep` with the sweep secret, for hosts without the cron trigger.

use shared::api::{ApiError, Reply};
use shared::service::sweep::SweepReport;
use shared::spin::{Ctx, respond};
use spin_sdk::http::{Method, Request, Response};
use spin_sdk::http_component;

wit_bindgen::generate!({ path: "wit", world: "spin-cron" });

fn run_sweep() -> Result<SweepReport, ApiError> {
    let ctx = Ctx::load()?;
    let report = ctx.sweep()?;
    println!("sweep: {}", serde_json_line(&report));
    Ok(report)
}

fn serde_json_line(report: &SweepReport) -> String {
    format!(
        "closed={} opened={} retrying={} failed={} timed_out={} skipped={} minutes={} reconciled={} overdue={} deferred={}",
        report.closed,
        report.opened,
        report.retrying,
        report.failed,
        report.timed_out,
        report.skipped,
        report.minutes_scanned,
        report.reconciled,
        report.overdue,
        report.deferred
    )
}

#[http_component]
fn handle(request: Request) -> Response {
    respond(route(&request))
}

fn route(request: &Request) -> Result<Reply, ApiError> {
    if *request.method() != Method::Post {
        return Err(ApiError::method_not_allowed("POST /internal/sweep"));
    }
    let ctx = Ctx::load()?;
    let secret = ctx
        .config
        .sweep_secret
        .as_ref()
        .ok_or_else(|| ApiError::forbidden("sweep_disabled", "no sweep_secret is configured"))?;
    let header = request.header("authorization").and_then(|v| v.as_str());
    // The secret is checked whatever the address's failed logins: it is long and random, and
    // a scheduler behind a shared address must never be locked out of closing grants.
    if let Err(refused) = shared::auth::check_shared_secret(header, secret.expose()) {
        let error = ApiError::from(refused);
        ctx.count_failed_login(request, &error);
        return Err(error);
    }
    let report = run_sweep()?;
    Ok(Reply::ok(serde_json::to_value(report).map_err(ApiError::internal)?))
}

struct Cron;

impl Guest for Cron {
    fn handle_cron_event(_metadata: Metadata) -> Result<(), Error> {
        run_sweep().map(drop).map_err(|e| Error::Other(format!("{}: {}", e.code, e.internal.unwrap_or(e.message))))
    }
}

export!(Cron);
