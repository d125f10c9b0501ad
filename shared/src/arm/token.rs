//! ARM access tokens by client credentials, cached in the store until shortly before expiry.

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use super::ArmError;
use crate::config::{ArmSettings, Identity};
use crate::http::{HttpClient, HttpRequest, Method};
use crate::keys;
use crate::store::{self, KvStore};

/// The scope of ARM tokens for client credentials (the same for an emulator).
const ARM_SCOPE: &str = "https://management.azure.com/.default";
/// The resource of ARM tokens for managed identities.
const ARM_RESOURCE: &str = "https://management.azure.com/";
/// Renew this long before a token expires.
const RENEW_EARLY: TimeDelta = TimeDelta::minutes(5);

#[derive(Serialize, Deserialize)]
struct CachedToken {
    access_token: String,
    expires_at: DateTime<Utc>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: serde_json::Value,
    #[serde(default)]
    expires_on: serde_json::Value,
}

fn number(value: &serde_json::Value) -> Option<i64> {
    match value {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A valid token: the cached one, or a new one fetched and cached.
pub(super) fn token(
    http: &dyn HttpClient,
    kv: &dyn KvStore,
    settings: &ArmSettings,
    now: DateTime<Utc>,
) -> Result<String, ArmError> {
    // A cache that cannot be read is only a cache: fetch a fresh token.
    if let Ok(Some(cached)) = store::load::<CachedToken>(kv, keys::ARM_TOKEN)
        && cached.value.expires_at - RENEW_EARLY > now
    {
        return Ok(cached.value.access_token);
    }
    let request = match &settings.identity {
        Identity::ClientSecret => {
            let form = form_urlencoded(&[
                ("grant_type", "client_credentials"),
                ("client_id", &settings.client_id),
                ("client_secret", settings.client_secret.expose()),
                ("scope", ARM_SCOPE),
            ]);
            HttpRequest {
                method: Method::Post,
                url: format!("{}/{}/oauth2/v2.0/token", settings.login_base_url, settings.tenant_id),
                headers: vec![("content-type".into(), "application/x-www-form-urlencoded".into())],
                body: form.into_bytes(),
                timeout: settings.timeout,
            }
        }
        Identity::ManagedIdentity => HttpRequest {
            method: Method::Get,
            url: format!(
                "{}?api-version=2018-02-01&resource={}",
                settings.identity_endpoint,
                percent_encode(ARM_RESOURCE)
            ),
            headers: vec![("metadata".into(), "true".into())],
            body: Vec::new(),
            timeout: settings.timeout,
        },
        Identity::AppService { header } => HttpRequest {
            method: Method::Get,
            url: format!(
                "{}?api-version=2019-08-01&resource={}",
                settings.identity_endpoint,
                percent_encode(ARM_RESOURCE)
            ),
            headers: vec![("x-identity-header".into(), header.expose().to_owned())],
            body: Vec::new(),
            timeout: settings.timeout,
        },
    };
    let response = http.send(request).map_err(|e| ArmError::Transient(format!("token endpoint: {e}")))?;
    match response.status {
        200 => {}
        429 | 500..=599 => return Err(ArmError::Transient(format!("token endpoint answered {}", response.status))),
        status => {
            // The identity platform's error body names the problem; it never echoes the secret.
            let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap_or_default();
            let code = body["error"].as_str().unwrap_or("token_error").to_owned();
            let message = body["error_description"]
                .as_str()
                .or(body["message"].as_str())
                .unwrap_or("no description")
                .chars()
                .take(300)
                .collect();
            return Err(ArmError::Refused { status, code, message, request_id: None });
        }
    }
    let parsed: TokenResponse = serde_json::from_slice(&response.body)
        .map_err(|e| ArmError::Transient(format!("unreadable token response: {e}")))?;
    // Entra ID answers `expires_in` as a number; IMDS as a string; App Service gives only
    // `expires_on`, an epoch string. Unknown means a short life, not a long one.
    let expires_at = number(&parsed.expires_in)
        .map(|secs| now + TimeDelta::seconds(secs))
        .or_else(|| number(&parsed.expires_on).and_then(|epoch| DateTime::from_timestamp(epoch, 0)))
        .unwrap_or(now + TimeDelta::minutes(5) + RENEW_EARLY);
    let cached = CachedToken { access_token: parsed.access_token, expires_at };
    // Failing to cache costs one more token fetch later, nothing else.
    let version = store::load::<serde_json::Value>(kv, keys::ARM_TOKEN).ok().flatten().map(|v| v.version);
    let _ = store::save(kv, keys::ARM_TOKEN, &cached, version);
    Ok(cached.access_token)
}

fn form_urlencoded(fields: &[(&str, &str)]) -> String {
    fields.iter().map(|(k, v)| format!("{k}={}", percent_encode(v))).collect::<Vec<_>>().join("&")
}

fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_are_percent_encoded() {
        assert_eq!(form_urlencoded(&[("a", "x y&z=/")]), "a=x%20y%26z%3D%2F");
    }
}
