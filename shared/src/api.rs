//! The HTTP contract shared by every component: JSON error bodies and small request helpers.
//! Errors map to HTTP here and nowhere else.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::json;

use crate::arm::ArmError;
use crate::auth::AuthError;
use crate::store::StoreError;

/// A successful answer: status and JSON body.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: serde_json::Value,
}

impl Reply {
    /// 200 with a body.
    pub fn ok(body: serde_json::Value) -> Self {
        Self { status: 200, body }
    }

    /// 201 with a body.
    pub fn created(body: serde_json::Value) -> Self {
        Self { status: 201, body }
    }
}

/// Every way a call can fail, as the client will see it.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Stable snake_case code.
    pub code: &'static str,
    /// What is wrong and how to fix it (for 5xx: nothing an attacker could use).
    pub message: String,
    /// The cause of a 5xx, for the logs only.
    pub internal: Option<String>,
    /// For 429: seconds until the caller may try again (the `Retry-After` header).
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// Whether another writer changed the record first (the caller may reload and retry).
    pub fn is_concurrent_update(&self) -> bool {
        self.code == "concurrent_update"
    }

    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), internal: None, retry_after: None }
    }

    /// 413: the body is larger than the configured limit.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(413, "body_too_large", message)
    }

    /// 429: over a rate limit; the caller may try again in `retry_after` seconds.
    pub fn rate_limited(message: impl Into<String>, retry_after: u32) -> Self {
        Self { retry_after: Some(retry_after), ..Self::new(429, "rate_limited", message) }
    }

    /// 400: the input cannot be read.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(400, code, message)
    }

    /// 401: who are you?
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401, "unauthenticated", message)
    }

    /// 403: known caller, not allowed.
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(403, code, message)
    }

    /// 404.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(404, code, message)
    }

    /// 405: the path exists, the method does not.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "method_not_allowed", message)
    }

    /// 409: wrong state or a lost race.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(409, code, message)
    }

    /// 422: valid JSON that breaks policy.
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(422, code, message)
    }

    /// 500: something broke inside; the cause goes to the logs only.
    pub fn internal(cause: impl fmt::Display) -> Self {
        Self {
            status: 500,
            code: "internal_error",
            message: "internal error; the cause is in the service logs".into(),
            internal: Some(cause.to_string()),
            retry_after: None,
        }
    }

    /// 502: ARM failed in a way the caller cannot fix by changing the request.
    pub fn bad_gateway(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(502, code, message)
    }

    /// The JSON body: `{"error":{"code":...,"message":...}}`.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict { .. } => {
                Self::conflict("concurrent_update", "the record was changed by another call at the same time; retry")
            }
            StoreError::Corrupt { .. } | StoreError::Backend(_) => Self::internal(error),
            StoreError::Unsupported(why) => Self::new(503, "store_unsupported", why),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Unavailable(_) => Self::new(503, "identity_provider_unavailable", error.to_string()),
            AuthError::Missing | AuthError::Unknown | AuthError::InvalidToken(_) => {
                Self::unauthorized(error.to_string())
            }
        }
    }
}

impl From<ArmError> for ApiError {
    fn from(error: ArmError) -> Self {
        match error {
            ArmError::Refused { .. } | ArmError::PriorityConflict => {
                Self::bad_gateway("arm_refused", format!("ARM refused the rule: {error}"))
            }
            ArmError::Transient(_) => Self::bad_gateway("arm_unavailable", format!("{error}; the sweep will retry")),
        }
    }
}

/// Parses a JSON body into the raw type of an endpoint; an empty body reads as `{}` when
/// `empty_ok`, for endpoints whose fields are all optional.
pub fn parse_json<T: DeserializeOwned>(body: &[u8], empty_ok: bool) -> Result<T, ApiError> {
    let body = if empty_ok && body.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { body };
    // serde reads a struct from an array too, field by field: `[]` would pass as `{}`.
    if body.iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|first| *first != b'{') {
        return Err(ApiError::bad_request("invalid_body", "the request body must be a JSON object"));
    }
    serde_json::from_slice(body).map_err(|e| {
        let code = if e.is_syntax() || e.is_eof() { "invalid_json" } else { "invalid_body" };
        ApiError::bad_request(code, format!("request body: {e}"))
    })
}

/// A query parameter's value (`state` in `?state=active&mine=true`), percent-decoded; `None`
/// when absent or not UTF-8.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    let (_, value) = query.split('&').filter_map(|pair| pair.split_once('=')).find(|(k, _)| *k == name)?;
    let value = value.replace('+', " ");
    percent_encoding::percent_decode_str(&value).decode_utf8().ok().map(|v| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_must_be_objects_even_where_an_array_would_fill_the_fields() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Body {
            #[serde(default)]
            comment: Option<String>,
        }
        for body in [&b"[]"[..], b" [\"x\"]", b"\"text\"", b"1"] {
            let error = parse_json::<Body>(body, true).unwrap_err();
            assert_eq!((error.status, error.code), (400, "invalid_body"), "{}", String::from_utf8_lossy(body));
        }
        assert!(parse_json::<Body>(b"", true).is_ok());
        assert!(parse_json::<Body>(b" {\"comment\": \"ok\"}", true).is_ok());
    }

    #[test]
    fn internal_errors_hide_their_cause_from_the_body() {
        let error = ApiError::internal("token=abc leaked?");
        assert!(!error.body().to_string().contains("abc"));
        assert_eq!(error.internal.as_deref(), Some("token=abc leaked?"));
    }

    #[test]
    fn json_errors_distinguish_syntax_from_shape() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Body {
            n: u8,
        }
        assert_eq!(parse_json::<Body>(b"{", false).unwrap_err().code, "invalid_json");
        assert_eq!(parse_json::<Body>(br#"{"n":"x"}"#, false).unwrap_err().code, "invalid_body");
        assert_eq!(parse_json::<Body>(b"", false).unwrap_err().code, "invalid_json");
        assert_eq!(query_param("state=active&mine=true", "mine").as_deref(), Some("true"));
        assert_eq!(query_param("since=2026-01-01T00%3A00%3A00Z", "since").as_deref(), Some("2026-01-01T00:00:00Z"));
    }
}
