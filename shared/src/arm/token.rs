//! ARM access tokens by client credentials, cached in the store until shortly before expiry.

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use super::ArmError;
use crate::config::{ArmSettings, Identity};
use crate::http::{HttpClient, HttpRequest, Method};
use crate::keys;
use crate::seal::SealingKey;
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

/// The cache as stored: sealed when a `token_encryption_key` is configured, else plain.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Stored {
    Sealed { sealed: String },
    Plain(CachedToken),
}

/// What a sealed token is bound to: its store key and the identity it was issued to, so a
/// token of a previous identity is never used after the identity changes.
fn label(settings: &ArmSettings) -> String {
    let identity = match settings.identity {
        Identity::ClientSecret => "client_secret",
        Identity::ManagedIdentity => "managed_identity",
        Identity::AppService { .. } => "app_service",
    };
    format!("{} {identity} {} {}", keys::ARM_TOKEN, settings.tenant_id, settings.client_id)
}

impl Stored {
    fn seal(token: &CachedToken, key: Option<&SealingKey>, label: &str) -> Self {
        let json = || serde_json::to_vec(token).expect("a token serializes");
        match key {
            Some(key) => Self::Sealed { sealed: key.seal(label, &json()) },
            None => Self::Plain(CachedToken { access_token: token.access_token.clone(), expires_at: token.expires_at }),
        }
    }

    /// The token, if this build can read it with its key: a plain token while a key is
    /// configured, or a box sealed under another key, is not used (a fresh one replaces it).
    fn open(self, key: Option<&SealingKey>, label: &str) -> Option<CachedToken> {
        match (self, key) {
            (Self::Plain(token), None) => Some(token),
            (Self::Sealed { sealed }, Some(key)) => {
                key.open(label, &sealed).and_then(|json| serde_json::from_slice(&json).ok())
            }
            _ => None,
        }
    }
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
    let key = settings.token_key.as_ref();
    if let Ok(Some(stored)) = store::load::<Stored>(kv, keys::ARM_TOKEN)
        && let Some(cached) = stored.value.open(key, &label(settings))
        && cached.expires_at - RENEW_EARLY > now
    {
        return Ok(cached.access_token);
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
    let _ = store::save(kv, keys::ARM_TOKEN, &Stored::seal(&cached, key, &label(settings)), version);
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

    use crate::http::HttpResponse;
    use crate::store::MemStore;
    use crate::testing::{ScriptedHttp, arm_settings, at};

    fn issued(token: &str) -> HttpResponse {
        let body = serde_json::json!({"access_token": token, "expires_in": 3600});
        HttpResponse { status: 200, headers: vec![], body: body.to_string().into_bytes() }
    }

    #[test]
    fn with_a_key_the_cached_token_is_sealed_and_still_reused() {
        let kv = MemStore::default();
        let mut settings = arm_settings();
        settings.token_key = Some(SealingKey::from_secret("0123456789abcdef0123456789abcdef"));
        let http =
            ScriptedHttp::new(vec![issued("secret-bearer-1"), issued("secret-bearer-2"), issued("secret-bearer-3")]);
        assert_eq!(token(&http, &kv, &settings, at(0)).unwrap(), "secret-bearer-1");
        let stored = String::from_utf8(kv.get(keys::ARM_TOKEN).unwrap().unwrap()).unwrap();
        assert!(!stored.contains("secret-bearer") && stored.contains("\"sealed\":\"v1."), "{stored}");
        assert_eq!(token(&http, &kv, &settings, at(1)).unwrap(), "secret-bearer-1", "read from the cache");
        assert_eq!(http.urls().len(), 1);
        // Another key cannot open it: a fresh token is fetched and sealed under the new key.
        settings.token_key = Some(SealingKey::from_secret("another key, at least 32 characters"));
        assert_eq!(token(&http, &kv, &settings, at(2)).unwrap(), "secret-bearer-2");
        // Nor is a token of another identity.
        settings.client_id = "another-app".into();
        assert_eq!(token(&http, &kv, &settings, at(3)).unwrap(), "secret-bearer-3");
    }

    #[test]
    fn a_plain_cached_token_is_not_used_once_a_key_is_configured() {
        let kv = MemStore::default();
        let mut settings = arm_settings();
        let http = ScriptedHttp::new(vec![issued("plain-1"), issued("sealed-2")]);
        assert_eq!(token(&http, &kv, &settings, at(0)).unwrap(), "plain-1");
        settings.token_key = Some(SealingKey::from_secret("0123456789abcdef0123456789abcdef"));
        assert_eq!(token(&http, &kv, &settings, at(1)).unwrap(), "sealed-2");
        let stored = String::from_utf8(kv.get(keys::ARM_TOKEN).unwrap().unwrap()).unwrap();
        assert!(!stored.contains("plain-1") && !stored.contains("sealed-2"), "{stored}");
    }

    #[test]
    fn form_values_are_percent_encoded() {
        assert_eq!(form_urlencoded(&[("a", "x y&z=/")]), "a=x%20y%26z%3D%2F");
    }
}
