//! Runtime configuration, read once per invocation from the component's variables.

use anyhow::{Context, Result, bail};
use ipnet::IpNet;

use crate::auth::ApiKeys;
use crate::auth::oidc::OidcSettings;
use crate::auth::signin::SignInSettings;
use crate::domain::AccessDuration;
use crate::domain::policy::PolicyLimits;

/// Where configuration values come from (Spin variables in a component, a map in tests).
pub trait Variables {
    /// The value of a variable, `None` when it is not defined.
    fn get(&self, name: &str) -> Option<String>;
}

/// How the ARM client gets its tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// An app registration's client id and secret (Entra ID client credentials).
    ClientSecret,
    /// The VM's managed identity through IMDS (`Metadata: true`).
    ManagedIdentity,
    /// App Service / container hosts: `IDENTITY_ENDPOINT` with `X-IDENTITY-HEADER`.
    AppService {
        /// The `X-IDENTITY-HEADER` value.
        header: Secret,
    },
}

/// Settings for the Azure Resource Manager client.
#[derive(Clone, Debug)]
pub struct ArmSettings {
    /// Where tokens come from.
    pub identity: Identity,
    /// The managed identity token endpoint (IMDS or `IDENTITY_ENDPOINT`).
    pub identity_endpoint: String,
    /// Timeout of one ARM or token call.
    pub timeout: std::time::Duration,
    /// ARM's base URL (`https://management.azure.com`, or an emulator).
    pub arm_base_url: String,
    /// The identity platform's base URL (`https://login.microsoftonline.com`).
    pub login_base_url: String,
    /// The Entra tenant.
    pub tenant_id: String,
    /// The app registration's client id.
    pub client_id: String,
    /// Its secret. Never logged: [`ArmSettings`]'s `Debug` is derived, so keep it out of logs.
    pub client_secret: Secret,
    /// Seals the cached ARM token in the store, when `token_encryption_key` is set.
    pub token_key: Option<crate::seal::SealingKey>,
}

/// A secret string whose `Debug` output is redacted.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The JIT priority band: allow rules take priorities in `min..=max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PriorityBand {
    /// Lowest number (highest precedence).
    pub min: u16,
    /// Highest number.
    pub max: u16,
}

/// Everything a component needs to know from configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// ARM client settings.
    pub arm: ArmSettings,
    /// API keys.
    pub api_keys: ApiKeys,
    /// OIDC bearer tokens, when an issuer is configured.
    pub oidc: Option<OidcSettings>,
    /// Browser sign-in on decision links, when a client is registered with that issuer.
    pub sign_in: Option<SignInSettings>,
    /// The shared secret of `POST /internal/sweep`.
    pub sweep_secret: Option<Secret>,
    /// Priority band for allow rules.
    pub priorities: PriorityBand,
    /// Priority band for the policies' baseline deny rules (below every allow rule).
    pub deny_priorities: PriorityBand,
    /// Limits on policies.
    pub limits: PolicyLimits,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// The audit trail's checkpoints.
    pub audit: AuditSettings,
    /// The reconciler and the health check.
    pub drift: DriftSettings,
    /// The largest request body accepted (413 above it).
    pub max_body_bytes: usize,
    /// How fast one principal or address may act.
    pub rate_limits: RateLimits,
    /// Where webhooks may be sent.
    pub webhooks: crate::webhooks::WebhookSettings,
    /// Systems that send decisions (`POST /webhooks/decision`), each with its signing secret.
    pub integrations: Vec<Integration>,
    /// Where state is kept.
    pub store: StoreChoice,
}

/// Where the components keep their state (variable `store`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreChoice {
    /// Spin's key-value store `default`, as the runtime configuration sets it up (SQLite on
    /// one instance; Azure Cosmos DB for several).
    KeyValue,
    /// A Redis server through Spin's outbound Redis interface, with compare-and-swap as a Lua
    /// script (several instances). Not Spin's `type = "redis"` key-value backend, whose
    /// compare-and-swap is broken.
    Redis {
        /// `redis://[:password@]host:port[/db]` or `rediss://...`; a secret when it holds a
        /// password.
        url: Secret,
    },
}

/// A system that may send decisions, signed as Standard Webhooks specify.
#[derive(Clone, Debug)]
pub struct Integration {
    /// Its name; it decides as `integration:<name>`.
    pub name: crate::domain::WebhookName,
    /// The secret its requests are signed with.
    pub secret: crate::webhooks::sign::SigningSecret,
}

/// Parses `decision_integrations`: `[{"name": "servicenow", "secret": "whsec_..."}]`.
fn integrations(json: &str) -> Result<Vec<Integration>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        name: String,
        secret: String,
    }
    let raw: Vec<Raw> = serde_json::from_str(json).context("decision_integrations is not a JSON list")?;
    raw.into_iter()
        .map(|r| {
            let name = crate::domain::WebhookName::parse(&r.name).context("decision_integrations: a name")?;
            let secret = crate::webhooks::sign::SigningSecret::parse(&r.secret).with_context(|| {
                format!("decision_integrations: the secret of '{name}' must be whsec_ and 24 to 64 bytes of base64")
            })?;
            Ok(Integration { name, secret })
        })
        .collect()
}

/// Calls allowed per minute (UTC, refilled at each minute boundary); `None`: no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimits {
    /// Changes (anything but reads) by one principal.
    pub changes_per_principal: Option<u32>,
    /// Changes from one address (an IPv6 caller's /64).
    pub changes_per_address: Option<u32>,
    /// Failed logins from one address; past it, the address is refused before its
    /// credential is looked at, until the minute ends.
    pub failed_logins_per_address: Option<u32>,
}

/// What the reconciler does with a grant whose rule is missing from its NSG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissingRule {
    /// Record it (`drift.rule_missing`) and leave the grant as it is.
    Report,
    /// Put the rule back for the rest of the grant.
    Reput,
    /// End the grant as `revoked`.
    Revoke,
}

/// How the sweep checks that the NSGs match what portcullis believes.
#[derive(Clone, Copy, Debug)]
pub struct DriftSettings {
    /// How often each policy's NSG is listed (its rules compared) and its grants re-checked.
    pub every: chrono::TimeDelta,
    /// What to do with a grant whose rule is missing.
    pub missing_rule: MissingRule,
    /// The health check fails when the last sweep is older than this, or a grant has been
    /// open longer than this past its end.
    pub max_sweep_age: chrono::TimeDelta,
}

impl Default for DriftSettings {
    fn default() -> Self {
        Self {
            every: chrono::TimeDelta::minutes(5),
            missing_rule: MissingRule::Report,
            max_sweep_age: chrono::TimeDelta::minutes(3),
        }
    }
}

/// How the audit trail signs its head.
#[derive(Clone, Debug, Default)]
pub struct AuditSettings {
    /// The HMAC key of checkpoints; `None`: no checkpoints.
    pub checkpoint_key: Option<Secret>,
    /// A checkpoint every this many events.
    pub checkpoint_every: u64,
}

impl Config {
    /// Reads and checks every variable; a bad value is an error naming the variable.
    pub fn load(vars: &dyn Variables) -> Result<Self> {
        let required = |name: &str| -> Result<String> {
            vars.get(name).filter(|v| !v.is_empty()).with_context(|| format!("variable '{name}' is not set"))
        };
        let optional =
            |name: &str, default: &str| vars.get(name).filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_owned());
        let number = |name: &str, default: &str| -> Result<u16> {
            optional(name, default).parse().with_context(|| format!("variable '{name}' must be a number"))
        };
        let priorities =
            PriorityBand { min: number("jit_priority_min", "100")?, max: number("jit_priority_max", "3999")? };
        let deny_priorities =
            PriorityBand { min: number("deny_priority_min", "4000")?, max: number("deny_priority_max", "4096")? };
        for (band, names) in [
            (priorities, "jit_priority_min..jit_priority_max"),
            (deny_priorities, "deny_priority_min..deny_priority_max"),
        ] {
            if !(100..=4096).contains(&band.min) || band.max > 4096 || band.min > band.max {
                bail!("{names} must be a range inside 100..4096");
            }
        }
        if deny_priorities.min <= priorities.max {
            bail!("deny rules must sit below every allow rule: deny_priority_min must be above jit_priority_max");
        }
        let identity = match optional("arm_identity", "client_secret").as_str() {
            "client_secret" => Identity::ClientSecret,
            "managed_identity" => Identity::ManagedIdentity,
            "app_service" => Identity::AppService { header: Secret::new(required("identity_header")?) },
            other => bail!("arm_identity '{other}' is not one of client_secret, managed_identity, app_service"),
        };
        if identity == Identity::ClientSecret {
            for name in ["arm_tenant_id", "arm_client_id", "arm_client_secret"] {
                required(name)?;
            }
        }
        let timeout = AccessDuration::parse(&optional("arm_timeout", "PT10S")).context("variable 'arm_timeout'")?;
        if timeout.as_secs() > 30 {
            // A grant's PUT lease assumes no ARM call outlives its invocation by much.
            bail!("variable 'arm_timeout' must be at most PT30S");
        }
        let oidc = match optional("oidc_issuer", "") {
            issuer if issuer.is_empty() => None,
            issuer => {
                let principal_claim = optional("oidc_principal_claim", "preferred_username");
                if !["oid", "preferred_username", "upn", "email"].contains(&principal_claim.as_str()) {
                    bail!("oidc_principal_claim must be oid, preferred_username, upn or email");
                }
                let groups_claim = optional("oidc_groups_claim", "groups");
                if !["groups", "roles"].contains(&groups_claim.as_str()) {
                    bail!("oidc_groups_claim must be groups or roles");
                }
                Some(OidcSettings {
                    issuer,
                    audience: required("oidc_audience")?,
                    jwks_url: required("oidc_jwks_url")?,
                    principal_claim,
                    groups_claim,
                })
            }
        };
        let max_duration =
            AccessDuration::parse(&optional("max_duration", "PT24H")).context("variable 'max_duration'")?;
        let trusted_proxies = optional("trusted_proxies", "")
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| p.parse::<IpNet>().with_context(|| format!("trusted_proxies: '{p}' is not a CIDR prefix")))
            .collect::<Result<_>>()?;
        let audit = AuditSettings {
            checkpoint_key: vars.get("audit_checkpoint_key").filter(|k| !k.is_empty()).map(Secret::new),
            checkpoint_every: optional("audit_checkpoint_every", "1000")
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .context("variable 'audit_checkpoint_every' must be a positive number")?,
        };
        let delta = |name: &str, default: &str| -> Result<chrono::TimeDelta> {
            let value =
                AccessDuration::parse(&optional(name, default)).with_context(|| format!("variable '{name}'"))?;
            Ok(value.as_delta())
        };
        let drift = DriftSettings {
            every: delta("reconcile_every", "PT5M")?,
            missing_rule: match optional("drift_missing_rule", "report").as_str() {
                "report" => MissingRule::Report,
                "reput" => MissingRule::Reput,
                "revoke" => MissingRule::Revoke,
                other => bail!("drift_missing_rule '{other}' is not one of report, reput, revoke"),
            },
            max_sweep_age: delta("health_max_sweep_age", "PT3M")?,
        };
        let max_body_bytes = optional("max_body_bytes", "65536")
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .context("variable 'max_body_bytes' must be a positive number")?;
        let limit = |name: &str, default: &str| -> Result<Option<u32>> {
            let value: u32 =
                optional(name, default).parse().with_context(|| format!("variable '{name}' must be a number"))?;
            Ok((value > 0).then_some(value))
        };
        let rate_limits = match optional("rate_limits", "on").as_str() {
            "on" => RateLimits {
                changes_per_principal: limit("rate_limit_changes_per_principal", "60")?,
                changes_per_address: limit("rate_limit_changes_per_address", "300")?,
                failed_logins_per_address: limit("rate_limit_failed_logins_per_address", "30")?,
            },
            "off" => RateLimits::default(),
            other => bail!("rate_limits '{other}' is not one of on, off"),
        };
        let list = |value: String| -> Vec<String> {
            value.split(',').map(str::trim).filter(|h| !h.is_empty()).map(str::to_owned).collect()
        };
        let webhooks = crate::webhooks::WebhookSettings {
            // Each is one `allowed_outbound_hosts` entry of the components (never empty there).
            allowed_hosts: (1..=4).flat_map(|n| list(optional(&format!("webhook_host_{n}"), ""))).collect(),
            dev_hosts: list(optional("webhook_dev_hosts", "")),
            public_url: optional("public_url", "http://127.0.0.1:3000").trim_end_matches('/').to_owned(),
            reminder_after: match optional("reminder_after", "PT15M").as_str() {
                "off" => None,
                _ => Some(delta("reminder_after", "PT15M")?),
            },
            notice_lead: match optional("notice_lead", "PT10M").as_str() {
                "off" => None,
                _ => Some(delta("notice_lead", "PT10M")?),
            },
            link_secret: match optional("decision_link_secret", "") {
                secret if secret.is_empty() => None,
                secret if secret.len() < 32 => bail!("variable 'decision_link_secret' must be at least 32 characters"),
                secret => Some(Secret::new(secret)),
            },
            link_ttl: delta("decision_link_ttl", "PT15M")?,
            slack: crate::webhooks::slack::SlackSettings {
                bot_token: vars.get("slack_bot_token").filter(|v| !v.is_empty()).map(Secret::new),
                signing_secret: vars.get("slack_signing_secret").filter(|v| !v.is_empty()).map(Secret::new),
                team_id: vars.get("slack_team_id").filter(|v| !v.is_empty()),
                users: serde_json::from_str(&optional("slack_users", "{}")).context(
                    "variable 'slack_users' must map Slack user ids to {\"principal\", \"groups\", \"roles\"}",
                )?,
                api_url: optional("slack_api_url", "https://slack.com").trim_end_matches('/').to_owned(),
                email_lookup: optional("slack_email_lookup", "off") == "on",
            },
        };
        let sign_in = match optional("oidc_client_id", "") {
            client_id if client_id.is_empty() => None,
            _ if oidc.is_none() => {
                bail!("variable 'oidc_client_id' needs oidc_issuer: the decision page verifies the ID tokens it gets")
            }
            // Entra puts in an ID token the app roles assigned on the client it is for: roles
            // assigned on another registration than the API's would grant API powers.
            client_id if oidc.as_ref().is_some_and(|o| o.audience != client_id) => bail!(
                "variable 'oidc_client_id' must be the API's own registration (oidc_audience): an ID token's roles are those assigned on the client it is for"
            ),
            _ if !is_https_or_loopback(&webhooks.public_url) => {
                bail!("variable 'oidc_client_id' needs an https public_url: the sign-in cookie is Secure")
            }
            client_id => Some(SignInSettings {
                client_id,
                client_secret: vars.get("oidc_client_secret").filter(|v| !v.is_empty()).map(Secret::new),
                authorize_url: required("oidc_authorize_url")?,
                token_url: required("oidc_token_url")?,
                redirect_uri: format!("{}{}", webhooks.public_url, crate::auth::signin::CALLBACK_PATH),
            }),
        };
        let store = match optional("store", "key_value").as_str() {
            "key_value" => StoreChoice::KeyValue,
            "redis" => {
                let url = required("redis_url")?;
                let Some(rest) = url.strip_prefix("redis://").or_else(|| url.strip_prefix("rediss://")) else {
                    bail!("variable 'redis_url' must start with redis:// or rediss://");
                };
                // A password with a raw '/', '?' or '#' cuts the URL short, and Spin logs an
                // address it cannot parse whole: the password would be in the log.
                let authority = rest.rsplit_once('@').map_or("", |(userinfo, _)| userinfo);
                if authority.contains(['/', '?', '#', '@']) {
                    bail!("variable 'redis_url': percent-encode '/', '?', '#' and '@' in the user name and password");
                }
                StoreChoice::Redis { url: Secret::new(url) }
            }
            other => bail!("store '{other}' is not one of key_value, redis"),
        };
        Ok(Self {
            store,
            sign_in,
            integrations: integrations(&optional("decision_integrations", "[]"))?,
            max_body_bytes,
            rate_limits,
            webhooks,
            drift,
            arm: ArmSettings {
                identity,
                identity_endpoint: optional(
                    "identity_endpoint",
                    "http://169.254.169.254/metadata/identity/oauth2/token",
                ),
                timeout: std::time::Duration::from_secs(u64::from(timeout.as_secs())),
                arm_base_url: optional("arm_base_url", "https://management.azure.com").trim_end_matches('/').to_owned(),
                login_base_url: optional("login_base_url", "https://login.microsoftonline.com")
                    .trim_end_matches('/')
                    .to_owned(),
                tenant_id: optional("arm_tenant_id", ""),
                client_id: optional("arm_client_id", ""),
                client_secret: Secret::new(optional("arm_client_secret", "")),
                token_key: match optional("token_encryption_key", "") {
                    key if key.is_empty() => None,
                    key if key.len() < 32 => bail!("variable 'token_encryption_key' must be at least 32 characters"),
                    key => Some(crate::seal::SealingKey::from_secret(&key)),
                },
            },
            api_keys: ApiKeys::parse(&optional("api_keys", "[]"))?,
            oidc,
            sweep_secret: vars.get("sweep_secret").filter(|s| !s.is_empty()).map(Secret::new),
            priorities,
            deny_priorities,
            limits: PolicyLimits { max_duration },
            trusted_proxies,
            audit,
        })
    }
}

/// Whether a URL is https, or plain http to this machine (local development).
fn is_https_or_loopback(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else { return url.starts_with("https://") };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once(':').filter(|(_, port)| port.parse::<u16>().is_ok()).map_or(authority, |(h, _)| h);
    matches!(host, "localhost" | "127.0.0.1" | "[::1]")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct Vars(HashMap<&'static str, &'static str>);

    impl Variables for Vars {
        fn get(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
    }

    fn vars(extra: &[(&'static str, &'static str)]) -> Vars {
        let mut map = HashMap::from([
            ("api_keys", "[]"),
            ("arm_tenant_id", "t"),
            ("arm_client_id", "c"),
            ("arm_client_secret", "s"),
        ]);
        map.extend(extra.iter().copied());
        Vars(map)
    }

    #[test]
    fn defaults_are_client_credentials_and_azures_bands() {
        let config = Config::load(&vars(&[])).unwrap();
        assert_eq!(config.arm.identity, Identity::ClientSecret);
        assert_eq!((config.priorities.min, config.priorities.max, config.deny_priorities.min), (100, 3999, 4000));
        assert_eq!(config.arm.timeout, std::time::Duration::from_secs(10));
        let limits = config.rate_limits;
        assert_eq!(
            (limits.changes_per_principal, limits.changes_per_address, limits.failed_logins_per_address),
            (Some(60), Some(300), Some(30))
        );
    }

    #[test]
    fn rate_limits_have_an_off_switch_and_zero_lifts_one_limit() {
        let off = Config::load(&vars(&[("rate_limits", "off")])).unwrap();
        assert_eq!(off.rate_limits, RateLimits::default());
        let one = Config::load(&vars(&[("rate_limit_changes_per_address", "0")])).unwrap();
        assert_eq!(one.rate_limits.changes_per_address, None);
        assert_eq!(one.rate_limits.changes_per_principal, Some(60));
        assert!(Config::load(&vars(&[("rate_limits", "maybe")])).is_err());
    }

    #[test]
    fn inconsistent_settings_are_refused_by_name() {
        let cases: [(&[(&'static str, &'static str)], &str); 4] = [
            (&[("deny_priority_min", "3000")], "deny_priority_min"),
            (&[("arm_identity", "app_service")], "identity_header"),
            (&[("arm_identity", "magic")], "arm_identity"),
            (&[("arm_client_secret", "")], "arm_client_secret"),
        ];
        for (extra, named) in cases {
            let error = format!("{:#}", Config::load(&vars(extra)).unwrap_err());
            assert!(error.contains(named), "{error}");
        }
        let short = Config::load(&vars(&[("token_encryption_key", "too short")])).unwrap_err();
        assert!(format!("{short:#}").contains("token_encryption_key"), "{short:#}");
        let error = format!("{:#}", Config::load(&vars(&[("rate_limit_changes_per_principal", "-1")])).unwrap_err());
        assert!(error.contains("rate_limit_changes_per_principal"), "{error}");
        let managed = Config::load(&vars(&[("arm_identity", "managed_identity"), ("arm_client_secret", "")])).unwrap();
        assert_eq!(managed.arm.identity, Identity::ManagedIdentity);
    }

    #[test]
    fn the_store_is_spins_key_value_unless_redis_is_named_with_its_url() {
        assert_eq!(Config::load(&vars(&[])).unwrap().store, StoreChoice::KeyValue);
        let redis = Config::load(&vars(&[("store", "redis"), ("redis_url", "redis://:pw@10.0.0.9:6379")])).unwrap();
        assert_eq!(redis.store, StoreChoice::Redis { url: Secret::new("redis://:pw@10.0.0.9:6379".into()) });
        assert!(!format!("{:?}", redis.store).contains("pw"), "the password stays out of logs");
        for (extra, named) in [
            (&[("store", "redis")][..], "redis_url"),
            (&[("store", "redis"), ("redis_url", "http://10.0.0.9")][..], "redis_url"),
            (&[("store", "cosmos")][..], "store"),
            (&[("store", "redis"), ("redis_url", "redis://:pa/ss@10.0.0.9:6379")][..], "percent-encode"),
        ] {
            let error = format!("{:#}", Config::load(&vars(extra)).unwrap_err());
            assert!(error.contains(named), "{error}");
        }
    }

    #[test]
    fn sign_in_needs_an_issuer_and_both_endpoints_and_comes_back_under_public_url() {
        let client = [("oidc_client_id", "portcullis-web")];
        let error = format!("{:#}", Config::load(&vars(&client)).unwrap_err());
        assert!(error.contains("oidc_issuer"), "{error}");
        let issuer: [(&'static str, &'static str); 5] = [
            ("oidc_client_id", "4f1c-client"),
            ("oidc_issuer", "https://login.example.com/t/v2.0"),
            ("oidc_audience", "4f1c-client"),
            ("oidc_jwks_url", "https://login.example.com/t/keys"),
            ("decision_link_secret", "a-long-random-decision-link-secret-value"),
        ];
        let error = format!("{:#}", Config::load(&vars(&issuer)).unwrap_err());
        assert!(error.contains("oidc_authorize_url"), "{error}");
        let mut all = issuer.to_vec();
        all.extend([
            ("oidc_authorize_url", "https://login.example.com/t/authorize"),
            ("oidc_token_url", "https://login.example.com/t/token"),
            ("public_url", "https://jit.example.com/"),
        ]);
        // Another registration than the API's, or a public plain-HTTP URL: refused.
        for (name, value, named) in [
            ("oidc_audience", "api://another-registration", "oidc_audience"),
            ("public_url", "http://jit.example.com", "https public_url"),
        ] {
            let mut changed = all.clone();
            changed.retain(|(k, _)| *k != name);
            changed.push((name, value));
            let error = format!("{:#}", Config::load(&vars(&changed)).unwrap_err());
            assert!(error.contains(named), "{error}");
        }
        assert!(Config::load(&vars(&[&all[..], &[("public_url", "http://127.0.0.1:3000")]].concat())).is_ok());
        let sign_in = Config::load(&vars(&all)).unwrap().sign_in.unwrap();
        assert_eq!(sign_in.redirect_uri, "https://jit.example.com/decide/signed-in");
        assert!(sign_in.client_secret.is_none());
        assert!(Config::load(&vars(&[])).unwrap().sign_in.is_none(), "off by default");
    }
}
