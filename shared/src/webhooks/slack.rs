//! Slack as a Slack app: with a bot token, messages are posted to a channel with
//! `chat.postMessage` and every later change of the request updates the same message with
//! `chat.update`, so nobody approves something already handled; with interactivity, a click
//! on Approve, Deny or Extend decides as the Slack user's mapped principal, where a policy
//! allows it (`"chat_decisions": "direct"`).

use std::collections::HashMap;

use chrono::{DateTime, TimeDelta, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::auth::{Caller, Role};
use crate::config::Secret;
use crate::domain::{GroupName, Principal};
use crate::http::{HttpRequest, HttpResponse, Method};

/// How far a callback's timestamp may be from now.
pub const TOLERANCE: TimeDelta = TimeDelta::minutes(5);

/// The Slack app's settings.
#[derive(Clone, Debug, Default)]
pub struct SlackSettings {
    /// `slack_bot_token` (`xoxb-`): posts and updates messages.
    pub bot_token: Option<Secret>,
    /// `slack_signing_secret`: verifies interactivity callbacks.
    pub signing_secret: Option<Secret>,
    /// `slack_team_id`: the only workspace whose users' clicks count.
    pub team_id: Option<String>,
    /// `slack_users`: Slack user id -> who they are here.
    pub users: HashMap<String, SlackUser>,
    /// `slack_api_url`: the Web API's base (`https://slack.com`).
    pub api_url: String,
    /// `slack_email_lookup`: an unmapped user is looked up with `users.info` and known by
    /// their Slack email (needs the `users:read.email` scope, and trusts Slack's emails).
    pub email_lookup: bool,
}

/// A Slack user as portcullis knows them.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackUser {
    /// Their principal.
    pub principal: Principal,
    /// Their groups (what policies' approver lists name).
    #[serde(default)]
    pub groups: Vec<GroupName>,
    /// Their roles.
    #[serde(default)]
    pub roles: Vec<Role>,
}

impl SlackSettings {
    /// Whether clicks can decide here.
    pub fn interactive(&self) -> bool {
        self.signing_secret.is_some() && self.team_id.is_some()
    }

    /// The caller behind a Slack user id, if mapped.
    pub fn caller(&self, user_id: &str) -> Option<Caller> {
        let user = self.users.get(user_id)?;
        Some(Caller {
            principal: user.principal.clone(),
            display_name: None,
            groups: user.groups.clone(),
            roles: user.roles.clone(),
        })
    }

    /// The `users.info` call that finds an unmapped user's email.
    pub fn user_info(&self, user_id: &str) -> Option<HttpRequest> {
        let token = self.bot_token.as_ref().filter(|_| self.email_lookup)?;
        let user: String = user_id.chars().filter(char::is_ascii_alphanumeric).take(32).collect();
        Some(HttpRequest {
            method: Method::Get,
            url: format!("{}/api/users.info?user={user}", self.api_url),
            headers: vec![("authorization".into(), format!("Bearer {}", token.expose()))],
            body: Vec::new(),
            timeout: std::time::Duration::from_secs(5),
        })
    }

    /// The principal behind a `users.info` answer: the user's email, unless the account is
    /// deleted, a bot, or of another workspace.
    pub fn principal_by_email(&self, answer: &serde_json::Value) -> Option<Principal> {
        let user = &answer["user"];
        let ours = user["team_id"].as_str().is_some_and(|team| Some(team) == self.team_id.as_deref());
        if !ours || user["deleted"] == true || user["is_bot"] == true {
            return None;
        }
        Principal::parse(user["profile"]["email"].as_str()?).ok()
    }

    /// A Web API call (`chat.postMessage`, `chat.update`) with the bot token.
    pub fn call(&self, method: &str, body: &serde_json::Value) -> Option<HttpRequest> {
        let token = self.bot_token.as_ref()?;
        Some(HttpRequest {
            method: Method::Post,
            url: format!("{}/api/{method}", self.api_url),
            headers: vec![
                ("content-type".into(), "application/json; charset=utf-8".into()),
                ("authorization".into(), format!("Bearer {}", token.expose())),
            ],
            body: body.to_string().into_bytes(),
            timeout: std::time::Duration::from_secs(5),
        })
    }
}

/// Where a posted message is, to update it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Posted {
    /// The channel id.
    pub channel: String,
    /// The message's `ts`.
    pub ts: String,
}

/// Judges a Web API answer: Slack reports failures as HTTP 200 with `"ok": false`.
pub fn judge(response: &HttpResponse) -> Result<serde_json::Value, String> {
    if response.status != 200 {
        return Err(format!("Slack answered HTTP {}", response.status));
    }
    let body: serde_json::Value =
        serde_json::from_slice(&response.body).map_err(|_| "Slack's answer is not JSON".to_owned())?;
    if body["ok"] == true {
        Ok(body)
    } else {
        Err(format!(
            "Slack refused: {}",
            body["error"].as_str().unwrap_or("no error given").chars().take(100).collect::<String>()
        ))
    }
}

/// Whether a callback is Slack's: `v0=` + hex HMAC-SHA256 of `v0:<timestamp>:<body>`,
/// compared in constant time, with a timestamp within 5 minutes.
pub fn verify(
    secret: &Secret,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: DateTime<Utc>,
) -> bool {
    let (Some(timestamp), Some(signature)) = (timestamp, signature) else { return false };
    let Some(at) = timestamp.parse::<i64>().ok().and_then(|t| DateTime::from_timestamp(t, 0)) else { return false };
    if (now - at).abs() > TOLERANCE {
        return false;
    }
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.expose().as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("v0:{timestamp}:").as_bytes());
    mac.update(body);
    let expected = format!("v0={}", hex::encode(mac.finalize().into_bytes()));
    bool::from(subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), signature.as_bytes()))
}

/// A button click.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Click {
    /// The clicker's home team.
    pub team_id: String,
    /// The clicker.
    pub user_id: String,
    /// `approve`, `deny` or `extend`.
    pub action: String,
    /// The request it is about.
    pub request: String,
    /// Where to answer the clicker (a capability: never logged).
    pub response_url: Option<String>,
}

/// Reads an interactivity callback (`payload=<JSON>`, form-encoded); `None` when it is not a
/// button click portcullis made.
pub fn click(body: &[u8]) -> Option<Click> {
    let form = std::str::from_utf8(body).ok()?;
    let payload: serde_json::Value = serde_json::from_str(&crate::api::query_param(form, "payload")?).ok()?;
    if payload["type"] != "block_actions" {
        return None;
    }
    let action = &payload["actions"][0];
    Some(Click {
        team_id: payload["user"]["team_id"].as_str()?.to_owned(),
        user_id: payload["user"]["id"].as_str()?.to_owned(),
        action: action["action_id"].as_str().filter(|a| ["approve", "deny", "extend"].contains(a))?.to_owned(),
        request: action["value"].as_str()?.chars().take(64).collect(),
        response_url: payload["response_url"].as_str().map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slacks_documented_signature_verifies_and_nothing_else_does() {
        let secret = Secret::new("8f742231b10e8888abcd99yyyzzz85a5".into());
        let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let signature = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";
        let at = DateTime::from_timestamp(1531420618, 0).unwrap();
        assert!(verify(&secret, Some("1531420618"), Some(signature), body, at));
        assert!(!verify(&secret, Some("1531420618"), Some(signature), body, at + TimeDelta::minutes(6)), "too old");
        assert!(!verify(&secret, Some("1531420619"), Some(signature), body, at), "another timestamp");
        assert!(!verify(&secret, Some("1531420618"), Some(signature), &body[1..], at), "another body");
        assert!(!verify(&secret, None, Some(signature), body, at));
    }

    #[test]
    fn a_click_is_read_from_the_form_payload() {
        let payload = serde_json::json!({"type": "block_actions", "user": {"id": "U0B0B", "team_id": "T0ACME"},
            "response_url": "https://hooks.slack.com/actions/x", "actions": [{"action_id": "approve", "value": "r1"}]});
        let body = format!(
            "payload={}",
            percent_encoding::utf8_percent_encode(&payload.to_string(), percent_encoding::NON_ALPHANUMERIC)
        );
        let click = click(body.as_bytes()).unwrap();
        assert_eq!((click.user_id.as_str(), click.action.as_str(), click.request.as_str()), ("U0B0B", "approve", "r1"));
        assert_eq!(super::click(b"payload=%7B%7D"), None);
    }
}
