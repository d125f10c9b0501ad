//! The audit trail from a terminal: `export` (streamed to stdout), `verify` (offline, the
//! chain and a checkpoint) and `tail` (follow new events).

use std::io::{BufReader, Write};
use std::time::Duration;

use serde_json::Value;
use shared::audit::Checkpoint;

use crate::api::{Api, Failure, encode};
use crate::show::{self, Format};

/// Streams the trail (or what follows `from`, or the first event at or after `since`).
pub fn export(api: &Api, from: Option<u64>, since: Option<&str>, cloudevents: bool) -> Result<(), Failure> {
    let from = match (from, since) {
        (Some(from), _) => Some(from),
        (None, Some(since)) => {
            let page = api.call("GET", &format!("/api/audit?since={}&limit=1", encode(since)), None)?;
            match page["events"][0]["seq"].as_u64() {
                Some(seq) => Some(seq),
                None => return Ok(()), // nothing since then
            }
        }
        (None, None) => None,
    };
    let mut query = vec![format!("format={}", if cloudevents { "cloudevents" } else { "jsonl" })];
    if let Some(from) = from {
        query.push(format!("from={from}"));
    }
    let mut body = api.stream(&format!("/api/audit/export?{}", query.join("&")))?;
    let mut out = std::io::stdout().lock();
    match std::io::copy(&mut body, &mut out).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        // The reader went away (`| head`): done.
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(error) => Err(Failure::Network(format!("reading the export: {error}"))),
    }
}

/// Verifies an export offline; a checkpoint needs its key in `PORTCULLIS_AUDIT_KEY`. Exits 1
/// at the first broken link, naming its sequence number.
pub fn verify(format: Format, file: &std::path::Path, checkpoint: Option<&std::path::Path>) -> Result<(), Failure> {
    let reader = BufReader::new(
        std::fs::File::open(file).map_err(|e| Failure::Usage(format!("opening {}: {e}", file.display())))?,
    );
    let checkpoint = match checkpoint {
        Some(path) => {
            let key = std::env::var("PORTCULLIS_AUDIT_KEY")
                .map_err(|_| Failure::Usage("a checkpoint needs its key in PORTCULLIS_AUDIT_KEY".into()))?;
            let bytes = std::fs::read(path).map_err(|e| Failure::Usage(format!("reading {}: {e}", path.display())))?;
            let checkpoint: Checkpoint = serde_json::from_slice(&bytes)
                .map_err(|e| Failure::Usage(format!("{} is not a checkpoint: {e}", path.display())))?;
            Some((checkpoint, key))
        }
        None => None,
    };
    let report = shared::audit::export::verify_export(reader, checkpoint.as_ref().map(|(c, k)| (c, k.as_bytes())))
        .map_err(|e| Failure::Usage(format!("{e:#}")))?;
    if !show::machine(format, &report) {
        match report["broken"].as_object() {
            None => println!("valid: {} events checked", report["checked"]),
            Some(broken) => println!(
                "BROKEN at event {}: {}",
                broken.get("seq").map_or("?".into(), Value::to_string),
                broken.get("reason").and_then(Value::as_str).unwrap_or("see --output json")
            ),
        }
    }
    match report["broken"].is_null() {
        true => Ok(()),
        false => Err(Failure::Local("the trail does not verify".into())),
    }
}

/// Prints events written from now on, polling every `interval`; runs until interrupted.
pub fn tail(api: &Api, format: Format, interval: Duration, action: Option<&str>) -> Result<(), Failure> {
    let filter = action.map(|a| format!("&action={}", encode(a))).unwrap_or_default();
    let started = encode(&chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    // After the first event, the cursor (the last sequence number read) carries on from it.
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/api/audit?cursor={cursor}&limit=1000{filter}"),
            None => format!("/api/audit?since={started}&limit=1000{filter}"),
        };
        let page = match api.call("GET", &path, None) {
            Ok(page) => page,
            // A blip of the server or the network: the next poll carries on from the cursor.
            Err(failure) if failure.is_transient() => {
                eprintln!("{failure}; trying again");
                std::thread::sleep(interval);
                continue;
            }
            Err(failure) => return Err(failure),
        };
        let events = page["events"].as_array().cloned().unwrap_or_default();
        for event in &events {
            // The reader went away (`| head`): done.
            if let Err(error) = print_event(format, event) {
                return if error.kind() == std::io::ErrorKind::BrokenPipe { Ok(()) } else { Err(error.into()) };
            }
        }
        let last = events.last().and_then(|e| e["seq"].as_u64()).map(|s| s.to_string());
        cursor = page["next_cursor"].as_str().map(str::to_owned).or(last).or(cursor);
        if page["next_cursor"].is_null() {
            std::io::stdout().flush()?;
            std::thread::sleep(interval);
        }
    }
}

fn print_event(format: Format, event: &Value) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if format == Format::Table {
        let subject = event["subject"]["request"].as_str().or(event["subject"]["policy"].as_str()).unwrap_or("-");
        writeln!(
            out,
            "{:>6}  {}  {:<24} {:<20} {:<24} {}",
            event["seq"],
            event["at"].as_str().unwrap_or_default(),
            event["action"].as_str().unwrap_or_default(),
            event["actor"].as_str().unwrap_or_default(),
            subject,
            event["outcome"].as_str().unwrap_or_default()
        )
    } else {
        writeln!(out, "{event}")
    }
}
