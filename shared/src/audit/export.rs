//! Export formats: JSON Lines of events as stored, or one CloudEvents 1.0 JSON envelope per
//! line with the event as its `data`. Either verifies offline: [`parse_line`] reads both.

use serde_json::json;

use super::chain::AuditEvent;

/// The CloudEvents `source` of every exported event.
pub const CLOUDEVENTS_SOURCE: &str = "/portcullis/audit";
/// The prefix of the CloudEvents `type` (`io.portcullis.audit.request.created`).
pub const CLOUDEVENTS_TYPE_PREFIX: &str = "io.portcullis.audit.";

/// How an export renders events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One event per line, as stored.
    JsonLines,
    /// One CloudEvents 1.0 structured-mode JSON event per line.
    CloudEvents,
}

impl Format {
    /// The `format` query parameter: absent or `jsonl`, or `cloudevents`.
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value {
            None | Some("jsonl") => Ok(Self::JsonLines),
            Some("cloudevents") => Ok(Self::CloudEvents),
            Some(other) => Err(format!("unknown export format '{other}'; use jsonl or cloudevents")),
        }
    }

    /// The response's content type.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::JsonLines => "application/jsonl",
            Self::CloudEvents => "application/cloudevents-batch+jsonl",
        }
    }
}

/// One event as a line (with its newline).
pub fn line(event: &AuditEvent, format: Format) -> String {
    let value = match format {
        Format::JsonLines => serde_json::to_value(event),
        Format::CloudEvents => serde_json::to_value(event).map(|data| {
            let subject = event.subject.request.as_ref().or(event.subject.policy.as_ref());
            let mut envelope = json!({
                "specversion": "1.0",
                "id": event.hash,
                "source": CLOUDEVENTS_SOURCE,
                "type": format!("{CLOUDEVENTS_TYPE_PREFIX}{}", event.action),
                "time": event.at,
                "datacontenttype": "application/json",
                "data": data,
            });
            if let Some(subject) = subject {
                envelope["subject"] = json!(subject);
            }
            envelope
        }),
    };
    value.expect("an audit event always serialises").to_string() + "\n"
}

/// Reads an exported line of either format back into its event.
pub fn parse_line(line: &str) -> Result<AuditEvent, serde_json::Error> {
    let value: serde_json::Value = serde_json::from_str(line)?;
    match value.get("specversion") {
        Some(_) => serde_json::from_value(value.get("data").cloned().unwrap_or_default()),
        None => serde_json::from_value(value),
    }
}

/// Verifies an export offline (JSON Lines or CloudEvents lines, as `GET /api/audit/export`
/// writes them): the chain, and where given, that it reaches a checkpoint signed with `key`.
/// Answers the verification as JSON; `broken` is null when everything holds.
pub fn verify_export(
    reader: impl std::io::BufRead,
    checkpoint: Option<(&super::Checkpoint, &[u8])>,
) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context;
    let mut events = Vec::new();
    for (number, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        events.push(parse_line(&line).with_context(|| format!("line {} is not an audit event", number + 1))?);
    }
    let mut report = serde_json::to_value(super::verify(events.clone(), None))?;
    if let (Some((checkpoint, key)), true) = (checkpoint, report["broken"].is_null())
        && let Err(broken) = checkpoint.check(key, &events)
    {
        report["broken"] = serde_json::to_value(broken)?;
    }
    Ok(report)
}
