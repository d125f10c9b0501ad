//! Spin's runtime configuration file (`spin up --runtime-config-file F`), as far as the
//! components use it: the `default` key-value store.
//!
//! - `type = "spin"`: SQLite at `path` (relative to the file), or in memory without one.
//! - `type = "redis"`: Spin's Redis key-value backend. Its swaps are broken on Spin 3.6 and
//!   4.0 (a swap that lands reports `cas-failed`, a lost race reports success); the host
//!   reproduces exactly that behaviour over its SQLite store, in memory, so a test can show
//!   that the components refuse such a store. For Redis, use the components' `store = "redis"`
//!   (outbound Redis) instead.
//! - `type = "azure_cosmos"`, `"aws_dynamo"`: not emulated; refused with a clear error.
//!
//! Like Spin, other tables and unknown keys are ignored, but the host says so.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The default key-value store a runtime configuration asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum KeyValueConfig {
    /// Spin's SQLite store, in a file or (`None`) in memory.
    Sqlite(Option<PathBuf>),
    /// Spin's Redis key-value backend, with its broken swaps.
    SpinRedis {
        /// The `url` it names (not connected to: see the module's documentation).
        url: String,
    },
}

/// What the host takes from a runtime configuration file.
#[derive(Clone, Debug, PartialEq)]
pub struct RuntimeConfig {
    /// The `default` store; `None` when the file does not set one (Spin's default applies).
    pub default_store: Option<KeyValueConfig>,
    /// Tables and keys the host ignores, as Spin would, for a warning.
    pub ignored: Vec<String>,
}

impl RuntimeConfig {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).with_context(|| format!("runtime config {}", path.display()))
    }

    /// Parses a file's text; relative paths are relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        let table: toml::Table = toml::from_str(text)?;
        let mut ignored = Vec::new();
        let mut default_store = None;
        for (name, value) in &table {
            if name != "key_value_store" {
                ignored.push(name.clone());
                continue;
            }
            let stores = value.as_table().context("key_value_store must be a table of stores")?;
            for (label, store) in stores {
                if label != "default" {
                    ignored.push(format!("key_value_store.{label} (the components use only 'default')"));
                    continue;
                }
                let store = store.as_table().context("key_value_store.default must be a table")?;
                let text = |key: &str| store.get(key).and_then(toml::Value::as_str).map(str::to_owned);
                let kind = text("type").context("key_value_store.default needs a type")?;
                default_store = Some(match kind.as_str() {
                    "spin" => KeyValueConfig::Sqlite(text("path").map(|p| base.join(p))),
                    "redis" => KeyValueConfig::SpinRedis {
                        url: text("url").context("key_value_store.default of type redis needs a url")?,
                    },
                    "azure_cosmos" | "aws_dynamo" => bail!(
                        "key_value_store.default type '{kind}' is not emulated by this host (it runs 'spin' and 'redis')"
                    ),
                    other => bail!("key_value_store.default type '{other}' is unknown"),
                });
                let known: &[&str] = match kind.as_str() {
                    "spin" => &["type", "path"],
                    _ => &["type", "url"],
                };
                ignored.extend(
                    store
                        .keys()
                        .filter(|k| !known.contains(&k.as_str()))
                        .map(|k| format!("key_value_store.default.{k}")),
                );
            }
        }
        Ok(Self { default_store, ignored })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_store_is_read_and_the_rest_reported_as_ignored() {
        let base = Path::new("/etc/portcullis");
        let sqlite =
            RuntimeConfig::parse("[key_value_store.default]\ntype = \"spin\"\npath = \"kv.db\"\n", base).unwrap();
        assert_eq!(sqlite.default_store, Some(KeyValueConfig::Sqlite(Some(base.join("kv.db")))));
        assert!(sqlite.ignored.is_empty());
        let memory = RuntimeConfig::parse("[key_value_store.default]\ntype = \"spin\"\n", base).unwrap();
        assert_eq!(memory.default_store, Some(KeyValueConfig::Sqlite(None)));
        let redis = RuntimeConfig::parse(
            "[key_value_store.default]\ntype = \"redis\"\nurl = \"redis://localhost\"\ncolour = 1\n[llm_compute]\ntype = \"x\"\n",
            base,
        )
        .unwrap();
        assert_eq!(redis.default_store, Some(KeyValueConfig::SpinRedis { url: "redis://localhost".into() }));
        assert_eq!(redis.ignored, vec!["key_value_store.default.colour".to_owned(), "llm_compute".to_owned()]);
        assert_eq!(RuntimeConfig::parse("", base).unwrap().default_store, None);
        for bad in ["[key_value_store.default]\ntype = \"azure_cosmos\"\n", "[key_value_store.default]\npath = \"x\"\n"]
        {
            assert!(RuntimeConfig::parse(bad, base).is_err(), "{bad}");
        }
    }
}
