//! The HTTP API as the CLI uses it: one blocking client, and every failure mapped to the exit
//! code the CLI documents.

use std::io::Read;
use std::time::Duration;

use serde_json::Value;

/// Why a command failed, and so how the process exits.
#[derive(Debug)]
pub enum Failure {
    /// The API said no: its status, code and message, shown as they came.
    Api { status: u16, code: String, message: String },
    /// portcullis could not be reached, or answered something unreadable.
    Network(String),
    /// The command line or a local file is wrong.
    Usage(String),
    /// No credential to send.
    NoCredential,
    /// Something local went wrong (a file, a refused confirmation).
    Local(String),
}

impl Failure {
    /// 0 ok, 1 refused by policy or state, 2 usage, 3 authentication, 4 not found, 5 server
    /// or network.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Api { status: 401, .. } | Self::NoCredential => 3,
            Self::Api { status: 404, .. } => 4,
            Self::Api { status: 500.., .. } | Self::Network(_) => 5,
            Self::Api { .. } | Self::Local(_) => 1,
            Self::Usage(_) => 2,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Api { status, code, message } => write!(f, "{message} ({code}, HTTP {status})"),
            Self::Network(message) | Self::Usage(message) | Self::Local(message) => f.write_str(message),
            Self::NoCredential => {
                f.write_str("no credential: run `portcullis login`, or set PORTCULLIS_TOKEN, or pass --token")
            }
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Self {
        Self::Local(error.to_string())
    }
}

/// A client of one portcullis.
pub struct Api {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Api {
    /// A client of `base` sending `token`.
    pub fn new(base: &str, token: Option<String>) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .user_agent(concat!("portcullis-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Self { agent, base: base.trim_end_matches('/').to_owned(), token }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn authorization(&self) -> Result<String, Failure> {
        self.token.as_ref().map(|t| format!("Bearer {t}")).ok_or(Failure::NoCredential)
    }

    /// Calls the API; answers the JSON body of a 2xx, else the API's error.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, Failure> {
        let url = self.url(path);
        let authorization = self.authorization()?;
        let response = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("authorization", &authorization).call(),
            ("DELETE", _) => self.agent.delete(&url).header("authorization", &authorization).call(),
            (_, body) => {
                let body = body.map_or_else(|| "{}".to_owned(), Value::to_string);
                let request = match method {
                    "PUT" => self.agent.put(&url),
                    _ => self.agent.post(&url),
                };
                request.header("authorization", &authorization).header("content-type", "application/json").send(body)
            }
        };
        let mut response = response.map_err(|e| Failure::Network(format!("{method} {url}: {e}")))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| Failure::Network(format!("reading the answer to {method} {path}: {e}")))?;
        let value: Value =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::Null) };
        if (200..300).contains(&status) {
            return Ok(value);
        }
        let error = &value["error"];
        Err(Failure::Api {
            status,
            code: error["code"].as_str().unwrap_or("unknown").to_owned(),
            message: error["message"].as_str().map_or_else(|| text.chars().take(300).collect(), str::to_owned),
        })
    }

    /// A GET whose 2xx body is read as a stream (the audit export).
    pub fn stream(&self, path: &str) -> Result<impl Read + use<>, Failure> {
        let url = self.url(path);
        let mut response = self
            .agent
            .get(&url)
            .header("authorization", &self.authorization()?)
            .call()
            .map_err(|e| Failure::Network(format!("GET {url}: {e}")))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let text = response.body_mut().read_to_string().unwrap_or_default();
            let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            return Err(Failure::Api {
                status,
                code: value["error"]["code"].as_str().unwrap_or("unknown").to_owned(),
                message: value["error"]["message"].as_str().unwrap_or(&text).to_owned(),
            });
        }
        Ok(response.into_body().into_reader())
    }
}

/// Characters a path segment or query value keeps as they are (RFC 3986 unreserved).
const UNRESERVED: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// A path segment or query value, percent-encoded.
pub fn encode(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, UNRESERVED).to_string()
}
