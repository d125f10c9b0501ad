//! Verifies an exported audit trail offline: `portcullis-audit verify trail.jsonl` (JSON Lines
//! or CloudEvents lines, as `GET /api/audit/export` writes them).
//! Prints what it checked as JSON and exits 1 at the first broken link (or a failed
//! checkpoint), naming its sequence number.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use shared::audit::export::parse_line;
use shared::audit::{AuditEvent, Checkpoint, verify};

/// Tools for portcullis's audit trail.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Walks a JSON Lines export and reports the first broken link.
    Verify {
        /// The export (one event per line).
        file: PathBuf,
        /// A checkpoint (JSON) the trail must reach; needs the key in PORTCULLIS_AUDIT_KEY.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
}

fn main() -> Result<ExitCode> {
    let Command::Verify { file, checkpoint } = Args::parse().command;
    let reader =
        std::io::BufReader::new(std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?);
    let mut events = Vec::new();
    for (number, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let event: AuditEvent =
            parse_line(&line).with_context(|| format!("line {} is not an audit event", number + 1))?;
        events.push(event);
    }
    let mut report = serde_json::to_value(verify(events.clone(), None))?;
    if let (Some(path), true) = (checkpoint, report["broken"].is_null()) {
        let key =
            std::env::var("PORTCULLIS_AUDIT_KEY").context("a checkpoint needs its key in PORTCULLIS_AUDIT_KEY")?;
        let checkpoint: Checkpoint =
            serde_json::from_slice(&std::fs::read(&path)?).context("reading the checkpoint")?;
        if let Err(broken) = checkpoint.check(key.as_bytes(), &events) {
            report["broken"] = serde_json::to_value(broken)?;
        }
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(if report["broken"].is_null() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
