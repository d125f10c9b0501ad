//! The HTTP front door: routes each request like Spin and injects Spin's headers. Any
//! `spin-*` header a client sends is dropped first: only the host may set them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::header::{HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use super::router::Router;
use super::runtime::Runtime;

/// Routes and runtime, shared by every connection.
pub struct App {
    /// Spin routes.
    pub router: Router,
    /// The components.
    pub runtime: Arc<Runtime>,
}

/// Serves until the task is aborted.
pub async fn serve(listener: TcpListener, app: Arc<App>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        let app = app.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(handle(&app, peer, request).await) }
            });
            let _ = http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn error(status: u16, code: &str, message: &str) -> hyper::Response<HyperOutgoingBody> {
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    let body =
        http_body_util::Full::new(bytes::Bytes::from(body)).map_err(|never: Infallible| match never {}).boxed_unsync();
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(body)
        .expect("static response")
}

async fn handle(
    app: &App,
    peer: SocketAddr,
    mut request: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<HyperOutgoingBody> {
    let path = request.uri().path().to_owned();
    let Some(matched) = app.router.route(&path) else {
        return error(404, "no_route", &format!("no route matches {path}"));
    };
    let host = request.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("localhost").to_owned();
    let full_url = format!("http://{host}{}", request.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let headers = request.headers_mut();
    let forged: Vec<HeaderName> = headers.keys().filter(|k| k.as_str().starts_with("spin-")).cloned().collect();
    for name in forged {
        headers.remove(name);
    }
    let mut set = |name: &str, value: &str| {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            headers.insert(name, value);
        }
    };
    let component_route = matched.route.strip_suffix("/...").unwrap_or(&matched.route);
    set("spin-full-url", &full_url);
    set("spin-path-info", &matched.path_info);
    set("spin-matched-route", &matched.route);
    set("spin-raw-component-route", &matched.route);
    set("spin-component-route", component_route);
    set("spin-base-path", "/");
    set("spin-client-addr", &peer.to_string());
    for (name, value) in &matched.params {
        set(&format!("spin-path-match-{name}"), value);
    }
    match app.runtime.handle_http(&matched.component, request).await {
        Ok(response) => response,
        Err(cause) => {
            app.runtime.log.push_host(&format!("{} failed: {cause:#}", matched.component));
            error(500, "component_failed", "the component failed; see the host log")
        }
    }
}
