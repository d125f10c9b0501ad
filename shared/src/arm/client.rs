//! The ARM REST client: authenticated calls, retries that honour `Retry-After`, and
//! long-running-operation polling, all inside a time budget so a function never hangs.

use std::cell::Cell;
use std::time::Duration;

use serde::Deserialize;

use super::{AllowRule, Arm, ArmError, NETWORK_API_VERSION, token};
use crate::config::ArmSettings;
use crate::domain::NsgId;
use crate::http::{Clock, HttpClient, HttpError, HttpRequest, HttpResponse, Method};
use crate::keys;
use crate::store::KvStore;

/// Attempts per ARM call before it is left for the next sweep.
const MAX_ATTEMPTS: u32 = 4;
/// Timeout of one HTTP exchange.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest single wait, whatever `Retry-After` says.
const MAX_WAIT: Duration = Duration::from_secs(5);
/// Poll interval when ARM gives no `Retry-After`.
const DEFAULT_POLL: Duration = Duration::from_secs(1);

/// The REST implementation of [`Arm`].
pub struct ArmClient<'a> {
    http: &'a dyn HttpClient,
    kv: &'a dyn KvStore,
    clock: &'a dyn Clock,
    settings: &'a ArmSettings,
    /// Time still available for waiting (backoff and polling) in this invocation.
    budget: Cell<Duration>,
}

#[derive(Deserialize, Default)]
struct ArmErrorBody {
    #[serde(default)]
    error: ArmErrorDetail,
}

#[derive(Deserialize, Default)]
struct ArmErrorDetail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    details: Vec<ArmErrorDetail>,
}

#[derive(Deserialize)]
struct AsyncStatus {
    status: String,
    #[serde(default)]
    error: Option<ArmErrorDetail>,
}

impl<'a> ArmClient<'a> {
    /// A client that may spend at most `wait_budget` waiting on ARM in this invocation.
    pub fn new(
        http: &'a dyn HttpClient,
        kv: &'a dyn KvStore,
        clock: &'a dyn Clock,
        settings: &'a ArmSettings,
        wait_budget: Duration,
    ) -> Self {
        Self { http, kv, clock, settings, budget: Cell::new(wait_budget) }
    }

    /// Waits, if the budget allows; `false` means give up and leave the work for later.
    fn wait(&self, duration: Duration) -> bool {
        let duration = duration.min(MAX_WAIT);
        let left = self.budget.get();
        if duration > left {
            return false;
        }
        self.budget.set(left - duration);
        self.clock.sleep(duration);
        true
    }

    fn rule_url(&self, nsg: &NsgId, name: &str) -> String {
        format!("{}{}/securityRules/{name}?api-version={NETWORK_API_VERSION}", self.settings.arm_base_url, nsg.as_str())
    }

    /// One ARM call, retried on throttling, server errors and transport failures.
    fn call(&self, method: Method, url: &str, body: Option<&serde_json::Value>) -> Result<HttpResponse, ArmError> {
        let mut last = String::new();
        for attempt in 0..MAX_ATTEMPTS {
            let token = token::token(self.http, self.kv, self.settings, self.clock.now(), CALL_TIMEOUT)?;
            let mut headers = vec![("authorization".to_owned(), format!("Bearer {token}"))];
            if body.is_some() {
                headers.push(("content-type".into(), "application/json".into()));
            }
            let request = HttpRequest {
                method,
                url: url.to_owned(),
                headers,
                body: body.map(|b| b.to_string().into_bytes()).unwrap_or_default(),
                timeout: CALL_TIMEOUT,
            };
            let backoff = Duration::from_millis(250 << attempt);
            let wait = match self.http.send(request) {
                Ok(response) if response.status < 400 => return Ok(response),
                Ok(response) => {
                    let error = classify(&response);
                    match &error {
                        ArmError::Transient(reason) => last = reason.clone(),
                        ArmError::Refused { status: 401, .. } if attempt == 0 => {
                            // A revoked or rotated token: drop the cache and fetch a new one once.
                            let _ = self.kv.delete(keys::ARM_TOKEN);
                            last = "ARM rejected the token".into();
                            continue;
                        }
                        ArmError::Refused { .. } | ArmError::PriorityConflict => return Err(error),
                    }
                    retry_after(&response).unwrap_or(backoff)
                }
                Err(HttpError::Refused(reason)) => {
                    return Err(ArmError::Refused { status: 0, code: "OutboundRefused".into(), message: reason });
                }
                Err(error) => {
                    last = error.to_string();
                    backoff
                }
            };
            if attempt + 1 == MAX_ATTEMPTS || !self.wait(wait) {
                break;
            }
        }
        Err(ArmError::Transient(last))
    }

    /// Follows an `Azure-AsyncOperation` URL to its end.
    fn poll_async_operation(&self, url: &str, first_wait: Duration) -> Result<(), ArmError> {
        let mut wait = first_wait;
        loop {
            if !self.wait(wait) {
                return Err(ArmError::Transient("the operation is still in progress".into()));
            }
            let response = self.call(Method::Get, url, None)?;
            let status: AsyncStatus = serde_json::from_slice(&response.body)
                .map_err(|e| ArmError::Transient(format!("unreadable operation status: {e}")))?;
            match status.status.as_str() {
                "Succeeded" => return Ok(()),
                "Failed" | "Canceled" => {
                    let detail = status.error.unwrap_or_default();
                    return Err(ArmError::Refused { status: 200, code: detail.code, message: detail.message });
                }
                _ => wait = retry_after(&response).unwrap_or(DEFAULT_POLL),
            }
        }
    }

    /// Follows a `Location` URL: 202 while running, 200 or 204 when done.
    fn poll_location(&self, url: &str, first_wait: Duration) -> Result<(), ArmError> {
        let mut wait = first_wait;
        loop {
            if !self.wait(wait) {
                return Err(ArmError::Transient("the operation is still in progress".into()));
            }
            let response = self.call(Method::Get, url, None)?;
            if response.status != 202 {
                return Ok(());
            }
            wait = retry_after(&response).unwrap_or(DEFAULT_POLL);
        }
    }
}

impl Arm for ArmClient<'_> {
    fn put_rule(&self, nsg: &NsgId, rule: &AllowRule) -> Result<(), ArmError> {
        let response = self.call(Method::Put, &self.rule_url(nsg, &rule.name), Some(&rule.to_arm_body()))?;
        match response.header("azure-asyncoperation") {
            Some(url) => self.poll_async_operation(url, retry_after(&response).unwrap_or(DEFAULT_POLL)),
            None => Ok(()),
        }
    }

    fn delete_rule(&self, nsg: &NsgId, name: &str) -> Result<(), ArmError> {
        let response = match self.call(Method::Delete, &self.rule_url(nsg, name), None) {
            Err(ArmError::Refused { status: 404, .. }) => return Ok(()),
            other => other?,
        };
        let first_wait = retry_after(&response).unwrap_or(DEFAULT_POLL);
        match (response.status, response.header("azure-asyncoperation"), response.header("location")) {
            (202, Some(url), _) => self.poll_async_operation(url, first_wait),
            (202, None, Some(url)) => self.poll_location(url, first_wait),
            _ => Ok(()),
        }
    }
}

/// Maps an error answer to what the caller should do about it.
fn classify(response: &HttpResponse) -> ArmError {
    let body: ArmErrorBody = serde_json::from_slice(&response.body).unwrap_or_default();
    let codes: Vec<&str> =
        std::iter::once(body.error.code.as_str()).chain(body.error.details.iter().map(|d| d.code.as_str())).collect();
    let busy = codes
        .iter()
        .any(|c| matches!(*c, "AnotherOperationInProgress" | "RetryableError" | "RetryableErrorDueToAnotherOperation"));
    match response.status {
        400 if codes.contains(&"SecurityRuleConflict") => ArmError::PriorityConflict,
        408 | 429 | 500..=599 => ArmError::Transient(format!("ARM answered {} {}", response.status, body.error.code)),
        409 if busy => ArmError::Transient(format!("ARM answered 409 {}", body.error.code)),
        status => {
            ArmError::Refused { status, code: body.error.code, message: body.error.message.chars().take(300).collect() }
        }
    }
}

fn retry_after(response: &HttpResponse) -> Option<Duration> {
    response.header("retry-after")?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FakeClock, ScriptedHttp, arm_settings, nsg, rule};

    fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> HttpResponse {
        HttpResponse {
            status,
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn token_ok() -> HttpResponse {
        answer(200, &[], r#"{"token_type":"Bearer","expires_in":3599,"access_token":"t1"}"#)
    }

    #[test]
    fn put_follows_the_async_operation_and_reuses_the_cached_token() {
        let http = ScriptedHttp::new(vec![
            token_ok(),
            answer(201, &[("Azure-AsyncOperation", "https://arm/op/1"), ("Retry-After", "1")], "{}"),
            answer(200, &[], r#"{"status":"InProgress"}"#),
            answer(200, &[], r#"{"status":"Succeeded"}"#),
            answer(200, &[], "{}"),
        ]);
        let (kv, clock, settings) = (crate::store::MemStore::default(), FakeClock::default(), arm_settings());
        let client = ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30));
        client.put_rule(&nsg(), &rule()).unwrap();
        client.put_rule(&nsg(), &rule()).unwrap();
        let urls = http.urls();
        assert_eq!(urls.iter().filter(|u| u.contains("oauth2")).count(), 1, "{urls:?}");
        assert!(urls[1].ends_with("/securityRules/jit-r1?api-version=2024-05-01"));
        assert_eq!(clock.slept(), Duration::from_secs(2));
    }

    #[test]
    fn throttling_is_retried_after_the_advertised_delay() {
        let http = ScriptedHttp::new(vec![
            token_ok(),
            answer(
                429,
                &[("Retry-After", "2")],
                r#"{"error":{"code":"RetryableError","details":[{"code":"RetryableErrorDueToAnotherOperation"}]}}"#,
            ),
            answer(200, &[], "{}"),
        ]);
        let (kv, clock, settings) = (crate::store::MemStore::default(), FakeClock::default(), arm_settings());
        ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30)).put_rule(&nsg(), &rule()).unwrap();
        assert_eq!(clock.slept(), Duration::from_secs(2));
    }

    #[test]
    fn persistent_server_errors_become_transient_within_the_budget() {
        let mut script = vec![token_ok()];
        script.extend((0..MAX_ATTEMPTS).map(|_| answer(503, &[], "")));
        let http = ScriptedHttp::new(script);
        let (kv, clock, settings) = (crate::store::MemStore::default(), FakeClock::default(), arm_settings());
        let err = ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30))
            .delete_rule(&nsg(), "jit-r1")
            .unwrap_err();
        assert!(matches!(err, ArmError::Transient(_)), "{err:?}");
        assert!(clock.slept() < Duration::from_secs(5));
    }

    #[test]
    fn conflicts_and_validation_errors_are_not_retried() {
        let http = ScriptedHttp::new(vec![
            token_ok(),
            answer(400, &[], r#"{"error":{"code":"SecurityRuleConflict","message":"taken"}}"#),
        ]);
        let (kv, clock, settings) = (crate::store::MemStore::default(), FakeClock::default(), arm_settings());
        let client = ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30));
        assert_eq!(client.put_rule(&nsg(), &rule()), Err(ArmError::PriorityConflict));
        let http = ScriptedHttp::new(vec![answer(
            400,
            &[],
            r#"{"error":{"code":"SecurityRuleInvalidPortRange","message":"bad"}}"#,
        )]);
        let client = ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30));
        assert!(
            matches!(client.put_rule(&nsg(), &rule()), Err(ArmError::Refused { status: 400, code, .. }) if code == "SecurityRuleInvalidPortRange")
        );
    }

    #[test]
    fn delete_of_an_absent_rule_succeeds_and_202_polls_the_location() {
        let http = ScriptedHttp::new(vec![token_ok(), answer(204, &[], "")]);
        let (kv, clock, settings) = (crate::store::MemStore::default(), FakeClock::default(), arm_settings());
        ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30)).delete_rule(&nsg(), "jit-r1").unwrap();
        let http = ScriptedHttp::new(vec![
            answer(202, &[("Location", "https://arm/res/1"), ("Retry-After", "0")], ""),
            answer(202, &[], ""),
            answer(204, &[], ""),
        ]);
        ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30)).delete_rule(&nsg(), "jit-r1").unwrap();
        assert_eq!(http.urls().last().unwrap(), "https://arm/res/1");
    }
}
