//! Reading `spin.toml` (manifest version 2): components, triggers, variables, and the
//! `{{ variable }}` templates Spin expands in component variables and outbound hosts.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The parts of a Spin manifest the host acts on.
#[derive(Debug, Deserialize)]
pub struct Manifest {
    spin_manifest_version: u32,
    /// Application variables.
    #[serde(default)]
    pub variables: BTreeMap<String, VariableDef>,
    /// Triggers by type.
    #[serde(default)]
    pub trigger: Triggers,
    /// Components by id.
    #[serde(default)]
    pub component: BTreeMap<String, ComponentDef>,
}

/// An application variable.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariableDef {
    /// Default value.
    pub default: Option<String>,
    /// Must be given when there is no default.
    #[serde(default)]
    pub required: bool,
    /// Never printed.
    #[serde(default)]
    pub secret: bool,
}

/// The triggers.
#[derive(Debug, Default, Deserialize)]
pub struct Triggers {
    /// HTTP routes.
    #[serde(default)]
    pub http: Vec<HttpTrigger>,
    /// Cron schedules.
    #[serde(default)]
    pub cron: Vec<CronTrigger>,
}

/// `[[trigger.http]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTrigger {
    /// The route pattern.
    pub route: String,
    /// The component serving it.
    pub component: String,
}

/// `[[trigger.cron]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CronTrigger {
    /// The component whose `handle-cron-event` runs.
    pub component: String,
    /// Six fields, seconds first, UTC.
    pub cron_expression: String,
}

/// `[component.<id>]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentDef {
    /// The `.wasm` path, relative to the manifest.
    pub source: String,
    /// Description.
    pub description: Option<String>,
    /// Where it may connect (templates allowed).
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<String>,
    /// Key-value store labels it may open.
    #[serde(default)]
    pub key_value_stores: Vec<String>,
    /// Component variables (templates allowed).
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// Build settings (used by `spin build`; the host builds through cargo instead).
    pub build: Option<toml::Value>,
}

impl Manifest {
    /// Reads and checks a manifest.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let manifest: Manifest = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if manifest.spin_manifest_version != 2 {
            bail!("only spin_manifest_version = 2 is supported");
        }
        for trigger in
            manifest.trigger.http.iter().map(|t| &t.component).chain(manifest.trigger.cron.iter().map(|t| &t.component))
        {
            if !manifest.component.contains_key(trigger) {
                bail!("a trigger names component '{trigger}', which is not defined");
            }
        }
        for (name, def) in &manifest.variables {
            if def.default.is_none() && !def.required {
                bail!("variable '{name}' needs a default or required = true");
            }
        }
        Ok(manifest)
    }

    /// The `.wasm` file of a component: `guest_dir/<file name>` when the host built the
    /// guests itself, else `source` relative to the manifest.
    pub fn source_path(&self, manifest_dir: &Path, component: &str, guest_dir: Option<&Path>) -> PathBuf {
        let source = Path::new(&self.component[component].source);
        match guest_dir {
            Some(dir) => dir.join(source.file_name().expect("source names a file")),
            None => manifest_dir.join(source),
        }
    }

    /// Application variable values: overrides, then `SPIN_VARIABLE_<NAME>` from the
    /// environment, then defaults. A required variable with no value is an error.
    pub fn resolve_variables(&self, overrides: &HashMap<String, String>) -> Result<HashMap<String, String>> {
        let mut values = HashMap::new();
        for (name, def) in &self.variables {
            let value = overrides
                .get(name)
                .cloned()
                .or_else(|| std::env::var(format!("SPIN_VARIABLE_{}", name.to_uppercase())).ok())
                .or_else(|| def.default.clone());
            match value {
                Some(value) => values.insert(name.clone(), value),
                None => bail!("required variable '{name}' has no value (set SPIN_VARIABLE_{})", name.to_uppercase()),
            };
        }
        Ok(values)
    }
}

/// Expands `{{ name }}` with application variables.
pub fn expand(template: &str, values: &HashMap<String, String>) -> Result<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").with_context(|| format!("unclosed '{{{{' in '{template}'"))? + start;
        let name = rest[start + 2..end].trim();
        out.push_str(values.get(name).with_context(|| format!("'{template}' names unknown variable '{name}'"))?);
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_expand_and_unknown_names_fail() {
        let values = HashMap::from([("a".to_string(), "1".to_string())]);
        assert_eq!(expand("x{{ a }}y{{a}}", &values).unwrap(), "x1y1");
        assert!(expand("{{ b }}", &values).is_err());
        assert!(expand("{{ a", &values).is_err());
    }

    #[test]
    fn the_projects_manifest_loads_and_every_component_has_a_source() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../spin.toml");
        let manifest = Manifest::load(&path).unwrap();
        let names: Vec<&str> = manifest.component.keys().map(String::as_str).collect();
        assert_eq!(names, ["admin-fn", "approve-fn", "expire-fn", "request-fn", "web-fn"]);
        assert_eq!(manifest.trigger.cron.len(), 1);
    }
}
