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
    /// 0 ok, 1 refused by policy or state, 2 usage (a value the command line gave, refused
    /// here or by the API's validation), 3 authentication, 4 not found, 5 server or network
    /// (including a rate limit still in force after the retries).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Api { status: 401, .. } | Self::NoCredential => 3,
            Self::Api { status: 404, .. } => 4,
            Self::Api { status: 400 | 413, .. } | Self::Usage(_) => 2,
            Self::Api { status: 429 | 500.., .. } | Self::Network(_) => 5,
            Self::Api { .. } | Self::Local(_) => 1,
        }
    }

    /// Whether trying again later may succeed (the server or the network, not a refusal).
    pub fn is_transient(&self) -> bool {
        self.exit_code() == 5
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
    /// For streamed answers: no overall deadline, only on connecting and on each wait.
    streaming: ureq::Agent,
    base: String,
    token: Option<String>,
}

/// How often a rate-limited call is tried again, and the longest `Retry-After` waited for.
const RATE_LIMIT_RETRIES: u32 = 3;
const LONGEST_RETRY_AFTER: u64 = 60;

impl Api {
    /// A client of `base` sending `token`. A token never travels in clear text beyond this
    /// machine: plain `http` only to a loopback address.
    pub fn new(base: &str, token: Option<String>) -> Result<Self, Failure> {
        let base = base.trim_end_matches('/').to_owned();
        if token.is_some() && !is_https_or_loopback(&base) {
            return Err(Failure::Usage(format!("{base}: a token is only sent over https (or http to this machine)")));
        }
        let config = || {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .user_agent(concat!("portcullis-cli/", env!("CARGO_PKG_VERSION")))
                .timeout_connect(Some(Duration::from_secs(10)))
        };
        let agent = config().timeout_global(Some(Duration::from_secs(60))).build().into();
        let streaming = config().timeout_recv_response(Some(Duration::from_secs(60))).build().into();
        Ok(Self { agent, streaming, base, token })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn authorization(&self) -> Result<String, Failure> {
        self.token.as_ref().map(|t| format!("Bearer {t}")).ok_or(Failure::NoCredential)
    }

    /// Calls the API; answers the JSON body of a 2xx, else the API's error. A rate-limited call
    /// waits as `Retry-After` says (up to a minute) and is tried again, three times at most.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, Failure> {
        let mut tries = 0;
        loop {
            match self.call_once(method, path, body) {
                Err((Failure::Api { status: 429, .. }, Some(wait))) if tries < RATE_LIMIT_RETRIES => {
                    tries += 1;
                    std::thread::sleep(Duration::from_secs(wait.min(LONGEST_RETRY_AFTER)));
                }
                outcome => return outcome.map_err(|(failure, _)| failure),
            }
        }
    }

    fn call_once(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, (Failure, Option<u64>)> {
        let plain = |failure: Failure| (failure, None);
        let url = self.url(path);
        let authorization = self.authorization().map_err(plain)?;
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
        let mut response = response.map_err(|e| plain(Failure::Network(format!("{method} {url}: {e}"))))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| plain(Failure::Network(format!("reading the answer to {method} {path}: {e}"))))?;
        let value: Value =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::Null) };
        if (200..300).contains(&status) {
            return Ok(value);
        }
        let error = &value["error"];
        let failure = Failure::Api {
            status,
            code: error["code"].as_str().unwrap_or("unknown").to_owned(),
            message: error["message"].as_str().map_or_else(|| text.chars().take(300).collect(), str::to_owned),
        };
        Err((failure, retry_after))
    }

    /// A GET whose 2xx body is read as a stream (the audit export).
    pub fn stream(&self, path: &str) -> Result<impl Read + use<>, Failure> {
        let url = self.url(path);
        let mut response = self
            .streaming
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

/// Whether a URL is https, or plain http to this machine.
pub fn is_https_or_loopback(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else { return url.starts_with("https://") };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => authority,
    };
    matches!(host, "localhost" | "[::1]") || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// Characters a path segment or query value keeps as they are (RFC 3986 unreserved).
const UNRESERVED: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// A path segment or query value, percent-encoded.
pub fn encode(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, UNRESERVED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_go_over_https_or_to_this_machine_only() {
        for url in ["https://jit.example.com", "http://127.0.0.1:3000", "http://localhost:3000/", "http://[::1]:3000"] {
            assert!(is_https_or_loopback(url), "{url}");
        }
        for url in ["http://jit.example.com", "http://10.0.0.1:3000", "ftp://x", "http://127.0.0.1.evil.com"] {
            assert!(!is_https_or_loopback(url), "{url}");
        }
        assert!(Api::new("http://jit.example.com", Some("t".into())).is_err());
        assert!(Api::new("http://jit.example.com", None).is_ok(), "nothing secret to send");
    }

    #[test]
    fn exit_codes_are_the_documented_ones() {
        let api = |status| Failure::Api { status, code: String::new(), message: String::new() };
        let codes: Vec<u8> = [400, 401, 403, 404, 409, 422, 429, 502].into_iter().map(|s| api(s).exit_code()).collect();
        assert_eq!(codes, [2, 3, 1, 4, 1, 1, 5, 5]);
        assert_eq!((Failure::NoCredential.exit_code(), Failure::Network(String::new()).exit_code()), (3, 5));
    }
}
