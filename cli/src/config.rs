//! Where the CLI finds portcullis and its credential: `--url`/`--token`, else
//! `PORTCULLIS_URL`/`PORTCULLIS_TOKEN` (clap reads both), else the file `portcullis login`
//! wrote in the user's configuration directory (readable by the user alone).

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// What `portcullis login` keeps.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Saved {
    /// portcullis's base URL.
    pub url: Option<String>,
    /// An API key or bearer token.
    pub token: Option<String>,
}

/// `$PORTCULLIS_CONFIG`, else `<config dir>/portcullis/config.json`.
pub fn path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PORTCULLIS_CONFIG") {
        return Some(path.into());
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("APPDATA").map(PathBuf::from))
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(base.join("portcullis").join("config.json"))
}

/// The saved settings, or none.
pub fn load() -> Saved {
    path().and_then(|p| std::fs::read(p).ok()).and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default()
}

/// Saves the settings, readable and writable by the user alone.
pub fn save(saved: &Saved) -> Result<PathBuf> {
    let path = path().context("no configuration directory: set PORTCULLIS_CONFIG or HOME")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).with_context(|| format!("writing {}", path.display()))?;
    // A file made before with other permissions is narrowed too.
    #[cfg(unix)]
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    std::io::Write::write_all(&mut file, serde_json::to_string_pretty(saved)?.as_bytes())?;
    Ok(path)
}
