//! The floor of the service benchmark (`tests/benches/service.rs`): what a Spin HTTP
//! component costs in the host when it does nothing at all.

use spin_sdk::http::{IntoResponse, Request, Response};
use spin_sdk::http_component;

#[http_component]
fn handle(_request: Request) -> anyhow::Result<impl IntoResponse> {
    Ok(Response::new(200, ()))
}
