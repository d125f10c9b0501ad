//! A webhook receiver on loopback for the tests: records every delivery, checks its Standard
//! Webhooks signature on its own (independently of portcullis's code), and answers as told:
//! a status, a hang, or a status for the next few deliveries only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How the receiver answers.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// Answer with this status.
    Status(u16),
    /// Wait this long, then answer 200.
    Hang(Duration),
    /// Answer as Slack's Web API does: `chat.postMessage` and `chat.update` succeed with a
    /// channel and `ts`.
    SlackApi,
    /// Answer as Slack's Web API refusing: HTTP 200 with `"ok": false`.
    SlackRefuses,
    /// Answer 200 with this JSON.
    Json(&'static str),
}

/// One delivery as received.
#[derive(Clone, Debug)]
pub struct Received {
    /// The path it was posted to.
    pub path: String,
    /// `webhook-id`.
    pub id: String,
    /// `webhook-timestamp`.
    pub timestamp: i64,
    /// `webhook-signature`.
    pub signature: String,
    /// `content-type`.
    pub content_type: String,
    /// The body, parsed (`Null` when it is not JSON).
    pub body: serde_json::Value,
    /// The `authorization` header.
    pub authorization: String,
    /// The status the receiver answered.
    pub answered: u16,
    /// Whether a `v1` entry verifies with the path's secret (`None`: no secret known).
    pub verified: Option<bool>,
}

#[derive(Default)]
struct Inner {
    received: Vec<Received>,
    behaviour: HashMap<String, Behaviour>,
    secrets: HashMap<String, Vec<Vec<u8>>>,
}

/// The receiver.
pub struct Receiver {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// Starts on a free loopback port.
    pub async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new().fallback(receive).with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, inner, task })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:<port>`.
    pub fn authority(&self) -> String {
        self.addr.to_string()
    }

    /// Sets how deliveries to `path` are answered.
    pub fn behave(&self, path: &str, behaviour: Behaviour) {
        self.inner.lock().unwrap().behaviour.insert(path.to_owned(), behaviour);
    }

    /// Adds a `whsec_` secret that signatures on `path` may verify with.
    pub fn trust(&self, path: &str, secret: &str) {
        let bytes = STANDARD.decode(secret.strip_prefix("whsec_").expect("a whsec_ secret")).expect("base64");
        self.inner.lock().unwrap().secrets.entry(path.to_owned()).or_default().push(bytes);
    }

    /// Every delivery so far to `path`, in arrival order.
    pub fn received(&self, path: &str) -> Vec<Received> {
        self.inner.lock().unwrap().received.iter().filter(|r| r.path == path).cloned().collect()
    }

    /// Every delivery so far.
    pub fn all(&self) -> Vec<Received> {
        self.inner.lock().unwrap().received.clone()
    }
}

async fn receive(
    State(inner): State<Arc<Mutex<Inner>>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let path = uri.path().to_owned();
    let (id, timestamp, signature) = (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"));
    let (behaviour, secrets) = {
        let inner = inner.lock().unwrap();
        (inner.behaviour.get(&path).copied().unwrap_or(Behaviour::Status(200)), inner.secrets.get(&path).cloned())
    };
    let verified = secrets.map(|secrets| {
        let signed = format!("{id}.{timestamp}.");
        secrets.iter().any(|secret| {
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap();
            mac.update(signed.as_bytes());
            mac.update(&body);
            let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
            signature.split(' ').any(|entry| entry == expected)
        })
    });
    let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let (answered, reply) = match behaviour {
        Behaviour::Status(status) => (status, String::new()),
        Behaviour::Hang(duration) => {
            tokio::time::sleep(duration).await;
            (200, String::new())
        }
        Behaviour::SlackApi => {
            let count = inner.lock().unwrap().received.len();
            let ts = parsed["ts"].as_str().map_or_else(|| format!("1767323045.{count:06}"), str::to_owned);
            (200, serde_json::json!({"ok": true, "channel": parsed["channel"], "ts": ts}).to_string())
        }
        Behaviour::SlackRefuses => (200, r#"{"ok":false,"error":"channel_not_found"}"#.to_owned()),
        Behaviour::Json(body) => (200, body.to_owned()),
    };
    inner.lock().unwrap().received.push(Received {
        path,
        id,
        timestamp: timestamp.parse().unwrap_or_default(),
        signature,
        content_type: header("content-type"),
        authorization: header("authorization"),
        body: parsed,
        answered,
        verified,
    });
    (StatusCode::from_u16(answered).unwrap_or(StatusCode::OK), [("content-type", "application/json")], reply)
}
