//! The outbound HTTP port, and the clock port that paces retries.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// An HTTP method the ARM client uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// PUT.
    Put,
    /// POST.
    Post,
    /// DELETE.
    Delete,
}

/// An outbound request; every one carries its own timeout.
#[derive(Clone, Debug)]
pub struct HttpRequest {
    /// Method.
    pub method: Method,
    /// Absolute URL.
    pub url: String,
    /// Headers (name, value).
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
    /// Connect plus first-byte budget.
    pub timeout: Duration,
}

/// An answer.
#[derive(Clone, Debug, Default)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A transport failure: no HTTP answer at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// No answer within the timeout.
    #[error("timed out")]
    Timeout,
    /// Could not connect, or the connection broke.
    #[error("connection failed: {0}")]
    Connection(String),
    /// The host refused to send it (e.g. not in `allowed_outbound_hosts`).
    #[error("request not sent: {0}")]
    Refused(String),
}

/// Sends HTTP requests.
pub trait HttpClient {
    /// Sends one request and reads the whole answer.
    fn send(&self, request: HttpRequest) -> Result<HttpResponse, HttpError>;
}

/// Time: read once per invocation for decisions; `sleep` paces retries and polling.
pub trait Clock {
    /// Now, UTC.
    fn now(&self) -> DateTime<Utc>;
    /// Waits.
    fn sleep(&self, duration: Duration);
    /// A reading of a clock that never jumps (the wall clock can, when it is set), for time
    /// limits within one invocation. Only differences between readings mean anything.
    fn monotonic(&self) -> Duration {
        (self.now() - DateTime::UNIX_EPOCH).to_std().unwrap_or_default()
    }
}

/// The system clock (WASI's wall clock inside a component).
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        std::time::SystemTime::now().into()
    }

    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }

    /// WASI's monotonic clock.
    fn monotonic(&self) -> Duration {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        START.get_or_init(std::time::Instant::now).elapsed()
    }
}
