//! What the CLI prints: JSON or YAML for scripts (`--output json|yaml`), aligned tables with
//! times relative to now for people.

use chrono::{DateTime, Utc};
use serde_json::Value;

/// How answers are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Tables and sentences, for people.
    Table,
    /// The API's JSON, for scripts.
    Json,
    /// The same as YAML.
    Yaml,
}

/// Prints a value as JSON or YAML; `false` when the format is for people.
pub fn machine(format: Format, value: &Value) -> bool {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(value).expect("JSON serialises")),
        Format::Yaml => print!("{}", serde_norway::to_string(value).expect("JSON is YAML")),
        Format::Table => return false,
    }
    true
}

/// `at` relative to `now`: "in 42 min", "3 h 5 min ago", "now".
pub fn relative(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let seconds = (at - now).num_seconds();
    let span = seconds.unsigned_abs();
    let text = match span {
        0..=59 => {
            return if span < 5 {
                "now".into()
            } else if seconds > 0 {
                format!("in {span} s")
            } else {
                format!("{span} s ago")
            };
        }
        60..=3599 => format!("{} min", span / 60),
        3600..=86_399 if span % 3600 / 60 == 0 => format!("{} h", span / 3600),
        3600..=86_399 => format!("{} h {} min", span / 3600, span % 3600 / 60),
        _ => format!("{} d {} h", span / 86_400, span % 86_400 / 3600),
    };
    if seconds > 0 { format!("in {text}") } else { format!("{text} ago") }
}

/// A timestamp field of a request, relative to now; `-` when absent.
pub fn when(value: &Value, now: DateTime<Utc>) -> String {
    value.as_str().and_then(|t| DateTime::parse_from_rfc3339(t).ok()).map_or("-".into(), |t| relative(t.into(), now))
}

/// Rows under headers, each column as wide as its widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).chain([headers[i].len()]).max().unwrap_or(0))
        .collect();
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(headers.to_vec())];
    out.extend(rows.iter().map(|r| line(r.iter().map(String::as_str).collect())));
    out.join("\n")
}

/// A request's ports, as `22,3389/tcp`.
pub fn ports(request: &Value) -> String {
    let ports: Vec<String> =
        request["ports"].as_array().into_iter().flatten().map(|p| p.to_string().trim_matches('"').to_owned()).collect();
    format!("{}/{}", ports.join(","), request["protocol"].as_str().unwrap_or("tcp"))
}

/// What matters about a request's timing in its state.
pub fn timing(request: &Value, now: DateTime<Utc>) -> String {
    match request["state"].as_str().unwrap_or_default() {
        "active" => format!("ends {}", when(&request["ends_at"], now)),
        "pending" => format!("waits until {}", when(&request["pending_until"], now).trim_start_matches("in ")),
        "approved" | "revoking" => "rule being changed".into(),
        _ => format!("created {}", when(&request["created_at"], now)),
    }
}

/// Requests as a table.
pub fn requests(list: &[Value], now: DateTime<Utc>) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            vec![
                r["id"].as_str().unwrap_or_default().to_owned(),
                r["state"].as_str().unwrap_or_default().to_owned(),
                r["policy"].as_str().unwrap_or_default().to_owned(),
                ports(r),
                r["requester"].as_str().unwrap_or_default().to_owned(),
                crate::duration::human(r["duration"].as_str().unwrap_or_default()),
                timing(r, now),
            ]
        })
        .collect();
    table(&["ID", "STATE", "POLICY", "PORTS", "REQUESTER", "FOR", "WHEN"], &rows)
}

/// One request, as label: value lines.
pub fn request(r: &Value, now: DateTime<Utc>) -> String {
    let mut lines = vec![
        ("id", r["id"].as_str().unwrap_or_default().to_owned()),
        ("state", r["state"].as_str().unwrap_or_default().to_owned()),
        ("policy", r["policy"].as_str().unwrap_or_default().to_owned()),
        ("ports", ports(r)),
        ("from", r["source"].as_str().unwrap_or_default().to_owned()),
        ("for", crate::duration::human(r["duration"].as_str().unwrap_or_default())),
        ("requester", r["requester"].as_str().unwrap_or_default().to_owned()),
        ("reason", r["justification"].as_str().unwrap_or_default().to_owned()),
        ("when", timing(r, now)),
    ];
    if let Some(approvals) = r["approvals"].as_array().filter(|a| !a.is_empty()) {
        let by: Vec<&str> = approvals.iter().filter_map(|a| a["by"].as_str()).collect();
        lines.push(("approved by", by.join(", ")));
    }
    if let Some(ended) = r["ended"].as_object() {
        let reason = ended.get("reason").and_then(Value::as_str).map(|r| format!(": {r}")).unwrap_or_default();
        lines.push(("ended by", format!("{}{reason}", ended.get("by").and_then(Value::as_str).unwrap_or("?"))));
    }
    if let Some(error) = r["last_error"].as_str() {
        lines.push(("last error", error.to_owned()));
    }
    lines.iter().map(|(k, v)| format!("{k:<12} {v}")).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    #[test]
    fn times_read_relative_to_now() {
        let now = Utc::now();
        let at = |secs: i64| now + TimeDelta::seconds(secs);
        assert_eq!(relative(at(42 * 60 + 5), now), "in 42 min");
        assert_eq!(relative(at(-(3 * 3600 + 5 * 60)), now), "3 h 5 min ago");
        assert_eq!(relative(at(2 * 3600), now), "in 2 h");
        assert_eq!(relative(at(2), now), "now");
        assert_eq!(relative(at(-30), now), "30 s ago");
    }

    #[test]
    fn tables_align_their_columns() {
        let out = table(&["ID", "STATE"], &[vec!["a".into(), "active".into()], vec!["bbbb".into(), "x".into()]]);
        assert_eq!(out, "ID    STATE\na     active\nbbbb  x");
    }
}
