//! `GET /api/audit/export`, streamed: events are read and written in chunks as the client
//! takes them, so a large range never sits in memory.

use futures::SinkExt;
use spin_sdk::http::{Fields, OutgoingResponse, Request, ResponseOutparam};

use super::{Ctx, respond};
use crate::api::ApiError;
use crate::service::audit;

/// Bytes gathered before a chunk is sent.
const CHUNK: usize = 64 * 1024;

/// Streams the export; errors before the first byte are ordinary JSON errors. The
/// `x-audit-first` and `x-audit-last` headers give the range, so a client can tell a complete
/// export from one cut short.
pub async fn stream_export(request: &Request, response_out: ResponseOutparam) {
    let prepared = Ctx::load().and_then(|ctx| {
        let (caller, origin) = ctx.caller(request)?;
        let plan = ctx.run(origin.clone(), |env| audit::plan_export(env, &caller, request.query()))?;
        Ok((ctx, origin, plan))
    });
    let (ctx, origin, plan) = match prepared {
        Ok(prepared) => prepared,
        Err(error) => return send_whole(response_out, respond(Err(error))).await,
    };
    let headers = [
        ("content-type".to_owned(), plan.format.content_type().as_bytes().to_vec()),
        ("x-audit-first".to_owned(), plan.from.to_string().into_bytes()),
        ("x-audit-last".to_owned(), plan.to.to_string().into_bytes()),
    ];
    let Ok(fields) = Fields::from_list(&headers) else {
        return send_whole(response_out, respond(Err(ApiError::internal("export headers")))).await;
    };
    let response = OutgoingResponse::new(fields);
    let _ = response.set_status_code(200);
    let mut body = response.take_body();
    response_out.set(response);
    let arm = ctx.arm();
    let env = ctx.env(&arm, origin);
    let mut chunk = String::new();
    for line in audit::export_lines(&env, plan) {
        match line {
            Ok(line) => chunk.push_str(&line),
            Err(error) => {
                // The status is sent already: stop short, which the last-event header shows.
                eprintln!("audit export stopped: {error}");
                break;
            }
        }
        if chunk.len() >= CHUNK && body.send(std::mem::take(&mut chunk).into_bytes()).await.is_err() {
            return; // The client went away.
        }
    }
    if !chunk.is_empty() {
        let _ = body.send(chunk.into_bytes()).await;
    }
}

async fn send_whole(response_out: ResponseOutparam, response: spin_sdk::http::Response) {
    let mut response = response;
    let body = std::mem::take(response.body_mut());
    match OutgoingResponse::try_from(response) {
        Ok(outgoing) => {
            if let Err(error) = response_out.set_with_body(outgoing, body).await {
                eprintln!("could not answer: {error}");
            }
        }
        Err(error) => eprintln!("could not convert the answer: {error}"),
    }
}

/// Answers a whole response through the outparam (the components that stream use this for
/// every other route).
pub async fn answer(response_out: ResponseOutparam, response: spin_sdk::http::Response) {
    send_whole(response_out, response).await
}
