//! Runtime configuration, read once per invocation from the component's variables.

use anyhow::{Context, Result, bail};
use ipnet::IpNet;

use crate::auth::ApiKeys;
use crate::domain::AccessDuration;
use crate::domain::policy::PolicyLimits;

/// Where configuration values come from (Spin variables in a component, a map in tests).
pub trait Variables {
    /// The value of a variable, `None` when it is not defined.
    fn get(&self, name: &str) -> Option<String>;
}

/// Settings for the Azure Resource Manager client.
#[derive(Clone, Debug)]
pub struct ArmSettings {
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
}

/// A secret string whose `Debug` output is redacted.
#[derive(Clone, PartialEq, Eq)]
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
    /// The shared secret of `POST /internal/sweep`.
    pub sweep_secret: Option<Secret>,
    /// Priority band for allow rules.
    pub priorities: PriorityBand,
    /// Limits on policies.
    pub limits: PolicyLimits,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
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
        if !(100..=4096).contains(&priorities.min) || priorities.max > 4096 || priorities.min > priorities.max {
            bail!("jit_priority_min..jit_priority_max must be a range inside 100..4096");
        }
        let max_duration =
            AccessDuration::parse(&optional("max_duration", "PT24H")).context("variable 'max_duration'")?;
        let trusted_proxies = optional("trusted_proxies", "")
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| p.parse::<IpNet>().with_context(|| format!("trusted_proxies: '{p}' is not a CIDR prefix")))
            .collect::<Result<_>>()?;
        Ok(Self {
            arm: ArmSettings {
                arm_base_url: optional("arm_base_url", "https://management.azure.com").trim_end_matches('/').to_owned(),
                login_base_url: optional("login_base_url", "https://login.microsoftonline.com")
                    .trim_end_matches('/')
                    .to_owned(),
                tenant_id: optional("arm_tenant_id", ""),
                client_id: optional("arm_client_id", ""),
                client_secret: Secret::new(optional("arm_client_secret", "")),
            },
            api_keys: ApiKeys::parse(&required("api_keys")?)?,
            sweep_secret: vars.get("sweep_secret").filter(|s| !s.is_empty()).map(Secret::new),
            priorities,
            limits: PolicyLimits { max_duration },
            trusted_proxies,
        })
    }
}
