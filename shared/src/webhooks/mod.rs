//! Webhook integrations: subscriptions, the events they are sent, and their delivery.
//!
//! The audit trail is the outbox. Every change already writes its event to the trail before it
//! is made, so a subscription needs nothing more than a cursor into the trail: no write is
//! added to any request, and no event can be lost between a change and its notification.
//! Delivery ([`deliver`]) reads the trail from each subscription's cursor, keeps the events
//! that took effect (a change whose save failed is followed by a `failed` event, or never
//! shows in its request), queues them, and sends them in order with retries.

pub mod deliver;
pub mod events;
pub mod sign;
pub mod slack;

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{PolicyName, WebhookName};
pub use events::EVENT_TYPES;
use sign::SigningSecret;

/// How deliveries to a subscription are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `{"type", "timestamp", "data"}`, signed as Standard Webhooks specify.
    #[default]
    Standard,
    /// A CloudEvents 1.0 structured-mode envelope, signed the same way.
    Cloudevents,
    /// A Slack Block Kit message, for an incoming-webhook URL (notifications only).
    Slack,
    /// An Adaptive Card message, for a Teams Workflows webhook URL.
    Teams,
}

/// A signing secret as stored, with the end of its overlap after a rotation.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredSecret {
    /// `whsec_<base64>`.
    pub secret: String,
    /// Set on the old secret when it is rotated: it signs alongside the new one until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for StoredSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredSecret").field("secret", &"***").field("until", &self.until).finish()
    }
}

/// A subscription, as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Subscription {
    /// Its name.
    pub name: WebhookName,
    /// Where deliveries go.
    pub url: String,
    /// Event types or families (`request.*`, `*`) it receives.
    pub events: Vec<String>,
    /// Only events about these policies, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<Vec<PolicyName>>,
    /// How deliveries are written.
    pub format: Format,
    /// With a Slack bot token: the channel messages are posted to (and updated in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Signing secrets, newest last; never shown after creation or rotation.
    pub secrets: Vec<StoredSecret>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

impl Subscription {
    /// Whether an event of `kind` about `policy` is for this subscription.
    pub fn wants(&self, kind: &str, policy: Option<&str>) -> bool {
        let type_matches = self.events.iter().any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => kind.starts_with(prefix),
            None => pattern == kind,
        });
        let policy_matches = match &self.policies {
            None => true,
            Some(names) => policy.is_some_and(|p| names.iter().any(|n| n.as_str() == p)),
        };
        type_matches && policy_matches
    }

    /// The secrets that sign at `now`: the newest, and any older one still in its overlap.
    pub fn signing_secrets(&self, now: DateTime<Utc>) -> Vec<SigningSecret> {
        self.secrets
            .iter()
            .filter(|s| s.until.is_none_or(|until| until > now))
            .filter_map(|s| SigningSecret::parse(&s.secret))
            .collect()
    }

    /// The subscription as admins read it: everything but the secrets.
    pub fn view(&self, now: DateTime<Utc>) -> serde_json::Value {
        let rotating_until = self.secrets.iter().filter_map(|s| s.until).filter(|until| *until > now).max();
        serde_json::json!({
            "name": self.name, "url": self.url, "events": self.events, "policies": self.policies,
            "format": self.format, "channel": self.channel, "created_at": self.created_at, "previous_secret_valid_until": rotating_until,
        })
    }
}

/// A subscription as an admin sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSubscription {
    url: String,
    events: Vec<String>,
    #[serde(default)]
    policies: Option<Vec<PolicyName>>,
    #[serde(default)]
    format: Format,
    #[serde(default)]
    channel: Option<String>,
}

/// Where webhooks may be sent.
#[derive(Clone, Debug, Default)]
pub struct WebhookSettings {
    /// `scheme://host[:port]` entries the components' `allowed_outbound_hosts` hold
    /// (`webhook_host_1`... `webhook_host_4`).
    pub allowed_hosts: Vec<String>,
    /// `host[:port]` that may be reached over plain HTTP or at a private address (local
    /// development and tests; `webhook_dev_hosts`).
    pub dev_hosts: Vec<String>,
    /// portcullis's own base URL, for links in payloads (`public_url`).
    pub public_url: String,
    /// A pending request is reminded once after waiting this long (`reminder_after`).
    pub reminder_after: Option<chrono::TimeDelta>,
    /// How long before a pending request times out, or a grant ends, it says so
    /// (`notice_lead`).
    pub notice_lead: Option<chrono::TimeDelta>,
    /// Signs decision links (`decision_link_secret`); without it chat messages only notify.
    pub link_secret: Option<crate::config::Secret>,
    /// How long a decision link is valid (`decision_link_ttl`), at most the request's wait.
    pub link_ttl: chrono::TimeDelta,
    /// The Slack app, if one is configured.
    pub slack: slack::SlackSettings,
}

/// Why a subscription is refused.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    /// Stable code.
    pub code: &'static str,
    /// What to fix.
    pub message: String,
}

fn refused(code: &'static str, message: impl Into<String>) -> Refused {
    Refused { code, message: message.into() }
}

impl RawSubscription {
    /// Checks an admin's subscription: a URL portcullis may and can reach, known events.
    pub fn check(
        self,
        name: WebhookName,
        settings: &WebhookSettings,
        now: DateTime<Utc>,
        secret: Option<SigningSecret>,
    ) -> Result<Subscription, Refused> {
        if let Some(channel) = &self.channel {
            if self.format != Format::Slack {
                return Err(refused("invalid_channel", "'channel' is for \"format\": \"slack\" through the Slack app"));
            }
            if channel.is_empty() || channel.len() > 24 || !channel.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(refused("invalid_channel", "'channel' is a Slack channel id, like C0APPROVE"));
            }
            if settings.slack.bot_token.is_none() {
                return Err(refused(
                    "slack_not_configured",
                    "posting to a channel needs the Slack app's bot token in slack_bot_token",
                ));
            }
            if self.url.trim_end_matches('/') != settings.slack.api_url {
                return Err(refused(
                    "invalid_url",
                    format!("with 'channel', 'url' is the Slack Web API: {}", settings.slack.api_url),
                ));
            }
        }
        let target = Target::parse(&self.url).ok_or_else(|| {
            refused(
                "invalid_url",
                "'url' must be an absolute http(s) URL without credentials, like https://example.com/hooks",
            )
        })?;
        target.check(settings)?;
        if self.events.is_empty() || self.events.len() > 32 {
            return Err(refused("invalid_events", "'events' lists 1 to 32 event types or families (request.*)"));
        }
        for pattern in &self.events {
            let known = match pattern.strip_suffix('*') {
                Some(prefix) => {
                    prefix.is_empty() || (prefix.ends_with('.') && EVENT_TYPES.iter().any(|t| t.starts_with(prefix)))
                }
                None => EVENT_TYPES.contains(&pattern.as_str()),
            };
            if !known {
                return Err(refused(
                    "invalid_events",
                    format!(
                        "unknown event '{}': one of {} or a family like request.*",
                        pattern.chars().take(64).collect::<String>(),
                        EVENT_TYPES.join(", ")
                    ),
                ));
            }
        }
        Ok(Subscription {
            name,
            url: self.url,
            events: self.events,
            policies: self.policies,
            format: self.format,
            channel: self.channel,
            secrets: secret.map(|s| StoredSecret { secret: s.reveal(), until: None }).into_iter().collect(),
            created_at: now,
        })
    }
}

/// Whether portcullis may post to `url` (a Slack `response_url`, say): the same rules as a
/// subscription's URL.
pub fn reachable(url: &str, settings: &WebhookSettings) -> bool {
    Target::parse(url).is_some_and(|target| target.check(settings).is_ok())
}

/// The parts of a webhook URL that decide whether it may be reached.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    https: bool,
    host: String,
    port: Option<u16>,
}

impl Target {
    /// Parses `scheme://host[:port][/path][?query]`; no credentials, no fragments.
    fn parse(url: &str) -> Option<Self> {
        let (https, rest) = match url.split_once("://")? {
            ("https", rest) => (true, rest),
            ("http", rest) => (false, rest),
            _ => return None,
        };
        if url.len() > 2000 || url.chars().any(|c| c.is_control() || c.is_whitespace()) || url.contains('#') {
            return None;
        }
        let authority = rest.split(['/', '?']).next()?;
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']')?;
                host.parse::<std::net::Ipv6Addr>().ok()?;
                (host.to_owned(), after.strip_prefix(':'))
            }
            None => match authority.split_once(':') {
                Some((host, port)) => (host.to_owned(), Some(port)),
                None => (authority.to_owned(), None),
            },
        };
        let port = match port {
            Some(port) => Some(port.parse::<u16>().ok().filter(|p| *p > 0)?),
            None => None,
        };
        let host = host.to_ascii_lowercase();
        let name_like = host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
        // A path after the host, never a query straight after it (HTTP clients split there
        // differently); no trailing dot (`localhost.`).
        let plain = !rest[authority.len()..].starts_with('?') && !host.ends_with('.');
        // A host that is neither a name nor a dotted-quad address (`2130706433`, `0x7f.1`,
        // `0177.0.0.1`, `127.1`) is some resolver's idea of an address: refused.
        let last_label = host.rsplit('.').next().unwrap_or_default();
        let numeric = !host.contains(':')
            && host.parse::<std::net::Ipv4Addr>().is_err()
            && (last_label.chars().all(|c| c.is_ascii_digit()) || last_label.starts_with("0x"));
        (name_like && plain && !numeric && !host.is_empty()).then_some(Self { https, host, port })
    }

    /// `host[:port]` as the settings spell it.
    fn authority(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        match self.port {
            Some(port) => format!("{host}:{port}"),
            None => host,
        }
    }

    /// `scheme://host[:port]`, the form of an `allowed_outbound_hosts` entry.
    fn origin(&self) -> String {
        format!("{}://{}", if self.https { "https" } else { "http" }, self.authority())
    }

    fn check(&self, settings: &WebhookSettings) -> Result<(), Refused> {
        let dev = settings.dev_hosts.iter().any(|h| h.eq_ignore_ascii_case(&self.authority()));
        if !self.https && !dev {
            return Err(refused(
                "insecure_url",
                "webhook URLs must be https (list a host in webhook_dev_hosts for local development)",
            ));
        }
        if !dev && is_internal(&self.host) {
            return Err(refused(
                "forbidden_url",
                format!(
                    "{} is a private, loopback, link-local or metadata address: webhooks are never sent there (list it in webhook_dev_hosts for local development)",
                    self.host
                ),
            ));
        }
        let origin = self.origin();
        let default_port = if self.https { 443 } else { 80 };
        let allowed = settings.allowed_hosts.iter().any(|entry| {
            let entry = entry.trim_end_matches('/').to_ascii_lowercase();
            entry == origin
                || (self.port.is_none() && entry == format!("{origin}:{default_port}"))
                || (self.port == Some(default_port) && entry == origin.trim_end_matches(&format!(":{default_port}")))
        });
        if !allowed {
            return Err(refused(
                "host_not_allowed",
                format!(
                    "Spin will not let portcullis reach {origin}: set one of the variables webhook_host_1 to webhook_host_4 to '{origin}' and redeploy"
                ),
            ));
        }
        Ok(())
    }
}

/// Hosts a webhook must never reach unless listed for development: loopback, private,
/// link-local (the cloud metadata service at 169.254.169.254 among them), unique-local,
/// unspecified and carrier-grade NAT addresses, and `localhost` names.
fn is_internal(host: &str) -> bool {
    if host == "localhost" || host.ends_with(".localhost") || host.ends_with(".internal") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            let [a, b, ..] = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (18..20).contains(&b))
        }
        Ok(IpAddr::V6(v6)) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(&v4.to_string());
            }
            let s = v6.segments();
            let v4 = |hi: u16, lo: u16| std::net::Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
            // IPv4-compatible (::a.b.c.d), NAT64 (64:ff9b::/96) and 6to4 (2002::/16) addresses
            // carry an IPv4 one: judged by it.
            let embedded = match s {
                [0, 0, 0, 0, 0, 0, hi, lo] | [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),
                [0x2002, hi, lo, ..] => Some(v4(hi, lo)),
                _ => None,
            };
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || embedded.is_some_and(|v4| is_internal(&v4.to_string()))
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::at;

    fn settings() -> WebhookSettings {
        WebhookSettings {
            allowed_hosts: vec!["https://hooks.example.com".into(), "http://127.0.0.1:9000".into()],
            dev_hosts: vec!["127.0.0.1:9000".into()],
            public_url: "https://jit.example.com".into(),
            ..WebhookSettings::default()
        }
    }

    fn check(url: &str) -> Result<Subscription, Refused> {
        let raw: RawSubscription =
            serde_json::from_value(serde_json::json!({"url": url, "events": ["request.*"]})).unwrap();
        raw.check(WebhookName::parse("siem").unwrap(), &settings(), at(0), None)
    }

    #[test]
    fn private_loopback_link_local_and_metadata_addresses_are_refused() {
        for url in [
            "https://169.254.169.254/latest/meta-data",
            "https://10.0.0.5/hook",
            "https://192.168.1.1/",
            "https://172.16.0.1/",
            "https://127.0.0.1/",
            "https://[::1]/",
            "https://[fd00::1]/",
            "https://[fe80::1]/",
            "https://[::ffff:169.254.169.254]/",
            "https://0.0.0.0/",
            "https://100.64.0.1/",
            "https://localhost/",
            "https://metadata.google.internal/",
            "https://[::a9fe:a9fe]/",
            "https://[64:ff9b::a9fe:a9fe]/",
            "https://[2002:a9fe:a9fe::1]/",
            "https://[fec0::1]/",
            "https://240.0.0.1/",
            "https://198.18.0.1/",
        ] {
            assert_eq!(check(url).unwrap_err().code, "forbidden_url", "{url}");
        }
    }

    #[test]
    fn only_https_to_an_allowed_host_or_a_listed_development_host_is_accepted() {
        assert!(check("https://hooks.example.com/services/x?y=1").is_ok());
        assert!(check("https://hooks.example.com:443/x").is_ok());
        assert!(check("http://127.0.0.1:9000/hook").is_ok(), "a development host");
        assert_eq!(check("http://hooks.example.com/x").unwrap_err().code, "insecure_url");
        let other = check("https://evil.example.net/x").unwrap_err();
        assert_eq!(other.code, "host_not_allowed");
        assert!(other.message.contains("webhook_host_1") && other.message.contains("https://evil.example.net"));
        for url in [
            "https://2130706433/",
            "https://0x7f.1/",
            "https://0177.0.0.1/",
            "https://127.1/",
            "https://localhost./",
            "https://hooks.example.com?x=1",
            "ftp://hooks.example.com/",
            "https://user:pw@hooks.example.com/",
            "https://hooks.example.com/#x",
            "hooks.example.com",
            "https://hooks.example.com:0/",
            "https:///x",
        ] {
            assert_eq!(check(url).unwrap_err().code, "invalid_url", "{url}");
        }
    }

    #[test]
    fn events_are_known_types_or_families() {
        let raw = |events: serde_json::Value| -> RawSubscription {
            serde_json::from_value(serde_json::json!({"url": "https://hooks.example.com/x", "events": events})).unwrap()
        };
        let name = || WebhookName::parse("x").unwrap();
        assert!(
            raw(serde_json::json!(["request.*", "grant.expired", "*"])).check(name(), &settings(), at(0), None).is_ok()
        );
        for bad in [serde_json::json!([]), serde_json::json!(["request.exploded"]), serde_json::json!(["req*"])] {
            assert_eq!(
                raw(bad.clone()).check(name(), &settings(), at(0), None).unwrap_err().code,
                "invalid_events",
                "{bad}"
            );
        }
        let sub = raw(serde_json::json!(["request.*"])).check(name(), &settings(), at(0), None).unwrap();
        assert!(sub.wants("request.created", Some("p")) && !sub.wants("grant.activated", Some("p")));
    }
}
