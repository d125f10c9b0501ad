//! The events subscriptions receive: which audit actions they come from, when one took
//! effect, and how each format writes it.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::Format;
use crate::audit::AuditEvent;
use crate::domain::{AccessRequest, State};

/// Every event type a subscription can name.
pub const EVENT_TYPES: [&str; 17] = [
    "request.created",
    "request.reminder",
    "grant.expiring",
    "request.approved",
    "request.denied",
    "request.cancelled",
    "request.timed_out",
    "grant.activated",
    "grant.extended",
    "grant.expired",
    "grant.revoked",
    "grant.failed",
    "break_glass.used",
    "drift.rule_missing",
    "drift.rule_removed",
    "drift.baseline_restored",
    "drift.exposure",
];

/// The event type an audit action is announced as, if any.
pub fn kind_of(action: &str) -> Option<&'static str> {
    Some(match action {
        "request.created" => "request.created",
        "request.approved" => "request.approved",
        "request.denied" => "request.denied",
        "request.cancelled" => "request.cancelled",
        "request.timed_out" => "request.timed_out",
        "request.reminder" => "request.reminder",
        "grant.expiring" => "grant.expiring",
        "request.activated" => "grant.activated",
        "request.extended" => "grant.extended",
        "request.expired" => "grant.expired",
        "request.revoked" => "grant.revoked",
        // `request.abandoned` starts the close of a failed open; `request.failed` ends it.
        "request.failed" => "grant.failed",
        "break_glass.used" => "break_glass.used",
        "drift.rule_missing" => "drift.rule_missing",
        "drift.rule_removed" => "drift.rule_removed",
        "drift.baseline_restored" => "drift.baseline_restored",
        "drift.exposure" => "drift.exposure",
        _ => return None,
    })
}

/// Whether the request shows the change its event announced. An event is written before its
/// change is saved; a change that lost its save never shows, and is never announced.
pub fn took_effect(kind: &str, event: &AuditEvent, request: &AccessRequest) -> bool {
    let announced_end = || event.details["ends_at"].as_str().and_then(|t| t.parse::<DateTime<Utc>>().ok());
    // The ends the grant has had: when it opened plus its duration, then after each extension.
    let ends = || -> Vec<DateTime<Utc>> {
        let Some(opened) = request.activated_at else { return Vec::new() };
        let mut end = opened + request.duration.as_delta();
        let mut ends = vec![end];
        for extension in &request.extensions {
            end += extension.by_duration.as_delta();
            ends.push(end);
        }
        ends
    };
    match kind {
        "request.created" | "break_glass.used" => true,
        // The approval that counted is this actor's (two approvers racing: only the winner's).
        "request.approved" => {
            request.approved_at.is_some()
                && (request.approvals.is_empty() || request.approvals.iter().any(|a| a.by.as_str() == event.actor))
        }
        "request.denied" => request.state == State::Denied,
        "request.cancelled" => request.state == State::Cancelled,
        "request.timed_out" => request.state == State::TimedOut,
        // Two openers racing announce different ends: only the saved one is true.
        "grant.activated" => announced_end().is_some_and(|end| ends().first() == Some(&end)),
        "grant.extended" => announced_end().is_some_and(|end| ends().iter().skip(1).any(|e| *e == end)),
        "grant.expired" => request.state == State::Expired,
        "grant.revoked" => request.state == State::Revoked,
        "grant.failed" => request.state == State::Failed,
        "request.reminder" | "grant.expiring" => {
            event.details["notice"].as_str().is_some_and(|notice| request.notices.iter().any(|n| n == notice))
        }
        _ => true,
    }
}

/// The delivery id: the same for every attempt and every subscription (receivers deduplicate
/// on it), and traceable to the audit event it announces.
pub fn webhook_id(event: &AuditEvent) -> String {
    format!("evt_{}", &event.hash[..event.hash.len().min(32)])
}

/// What the event says, the same in every format.
pub fn data(
    kind: &str,
    event: &AuditEvent,
    request: Option<&AccessRequest>,
    vm: Option<&str>,
    public_url: &str,
) -> Value {
    let mut data = json!({
        "event_id": webhook_id(event),
        "audit_seq": event.seq,
        "actor": event.actor,
        "actor_name": event.actor_name,
        "policy": event.subject.policy,
        "vm": vm,
    });
    let fields = data.as_object_mut().expect("an object");
    if let Some(request) = request {
        let extra = json!({
            "request_id": request.id,
            "url": format!("{}/api/requests/{}", public_url.trim_end_matches('/'), request.id),
            "requester": request.requester,
            "requester_name": request.requester_name,
            "vms": request.vms,
            "ports": request.ports.iter().map(|p| format!("{p}/{}", request.protocol.arm_name().to_lowercase())).collect::<Vec<_>>(),
            "source": request.source.to_string(),
            "duration": request.duration.to_string(),
            "justification": request.justification,
            "break_glass": request.break_glass,
            "auto_approved": request.auto_approved,
            "state": request.state.name(),
            "created_at": request.created_at,
            "ends_at": request.ends_at,
            "approvals": request.approvals.iter().map(|a| json!({"by": a.by, "at": a.at})).collect::<Vec<_>>(),
        });
        fields.extend(extra.as_object().expect("an object").clone());
    }
    // Who ended a request early, and why (recorded when the close began).
    if let Some(ended) = request.and_then(|r| r.ended.as_ref()) {
        fields.insert("ended_by".into(), json!(ended.by));
        if let Some(reason) = &ended.reason {
            fields.insert("reason".into(), json!(reason));
        }
    }
    for key in
        ["reason", "ends_at", "by", "found", "repair", "notice", "times_out_at", "approvers_left", "minutes_left"]
    {
        if let Some(value) = event.details.get(key) {
            fields.insert(key.into(), value.clone());
        }
    }
    if !kind.starts_with("request.") && !kind.starts_with("grant.") && !kind.starts_with("break_glass") {
        fields.insert("details".into(), event.details.clone());
    }
    data
}

/// The body of a delivery in `format`.
/// Rendered when it is sent, for the subscription as it is then: a subscription changed to
/// another format gets what waits in its queue in the new one.
pub fn body(format: Format, kind: &str, id: &str, at: DateTime<Utc>, mut data: Value, source: &str) -> String {
    if matches!(format, Format::Standard | Format::Cloudevents)
        && let Some(fields) = data.as_object_mut()
    {
        // Links and buttons that decide are for chat messages, never for machines.
        fields.remove("decide");
        fields.remove("buttons");
    }
    match format {
        Format::Standard => json!({"type": kind, "timestamp": at, "data": data}),
        Format::Cloudevents => json!({
            "specversion": "1.0", "id": id, "source": source,
            "type": format!("io.portcullis.{kind}"), "subject": data["request_id"].as_str().or(data["policy"].as_str()),
            "time": at, "datacontenttype": "application/json", "data": data,
        }),
        Format::Slack => slack_message(kind, &data),
        Format::Teams => teams_card(kind, &data),
    }
    .to_string()
}

/// One line for people: `alice asks for 22/tcp on demo-vm for PT1H`.
fn summary(kind: &str, data: &Value) -> String {
    let who = data["requester_name"].as_str().or(data["requester"].as_str()).unwrap_or("someone");
    // The principal decides; a name beside it is only what a token or an integration said.
    let actor = match (data["actor"].as_str(), data["actor_name"].as_str()) {
        (Some(actor), Some(name)) => format!("{actor} ({name})"),
        (Some(actor), None) => actor.to_owned(),
        _ => "portcullis".to_owned(),
    };
    let ports = data["ports"]
        .as_array()
        .map(|p| p.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
        .unwrap_or_default();
    let policy = data["policy"].as_str().unwrap_or("?");
    match kind {
        "request.created" => {
            format!("{who} asks for {ports} on {policy} for {}", data["duration"].as_str().unwrap_or("?"))
        }
        "request.approved" => format!("{who}'s request for {ports} on {policy} was approved by {actor}"),
        "request.denied" => format!("{who}'s request for {ports} on {policy} was denied by {actor}"),
        "request.cancelled" => format!("{who}'s request for {ports} on {policy} was cancelled"),
        "request.timed_out" => format!("{who}'s request for {ports} on {policy} timed out without a decision"),
        "grant.activated" => {
            format!("{ports} on {policy} is open to {who} until {}", data["ends_at"].as_str().unwrap_or("?"))
        }
        "grant.extended" => {
            format!("{who}'s access to {ports} on {policy} now ends at {}", data["ends_at"].as_str().unwrap_or("?"))
        }
        "grant.expired" => format!("{who}'s access to {ports} on {policy} has ended; the port is closed"),
        "grant.revoked" => format!("{who}'s access to {ports} on {policy} was revoked by {actor}"),
        "grant.failed" => format!("{who}'s access to {ports} on {policy} could not be opened"),
        "break_glass.used" => format!("BREAK GLASS: {who} opened {ports} on {policy} without approval"),
        "request.reminder" if data["notice"] == "timing_out" => format!(
            "{who}'s request for {ports} on {policy} times out at {} without a decision",
            data["times_out_at"].as_str().unwrap_or("?")
        ),
        "request.reminder" => format!("{who}'s request for {ports} on {policy} is still waiting for approval"),
        "grant.expiring" => {
            format!("{who}'s access to {ports} on {policy} ends at {}", data["ends_at"].as_str().unwrap_or("?"))
        }
        other => format!("{other} on {policy}"),
    }
}

fn slack_message(kind: &str, data: &Value) -> Value {
    let text = slack_text(&summary(kind, data));
    let field = |label: &str, value: &Value| {
        let value = value.as_str().map(str::to_owned).unwrap_or_else(|| value.to_string());
        json!({"type": "mrkdwn", "text": format!("*{label}*\n{}", slack_text(&value))})
    };
    let mut fields = Vec::new();
    for (label, key) in [
        ("Requester", "requester"),
        ("Policy", "policy"),
        ("Source", "source"),
        ("Duration", "duration"),
        ("State", "state"),
    ] {
        if !data[key].is_null() {
            fields.push(field(label, &data[key]));
        }
    }
    let mut blocks = vec![json!({"type": "section", "text": {"type": "mrkdwn", "text": truncate(&text, 3000)}})];
    if !fields.is_empty() {
        blocks.push(json!({"type": "section", "fields": fields}));
    }
    if let Some(justification) = data["justification"].as_str() {
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": truncate(&format!("*Justification*\n{}", slack_text(justification)), 3000)}}));
    }
    if let Some(url) = data["url"].as_str() {
        blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": format!("<{url}|{}>", data["request_id"].as_str().unwrap_or("request"))}]}));
    }
    if let Some(buttons) = data["buttons"].as_array() {
        let request = data["request_id"].as_str().unwrap_or_default();
        let elements: Vec<Value> = buttons
            .iter()
            .filter_map(Value::as_str)
            .map(|action| {
                let (label, style) = match action {
                    "approve" => ("Approve", "primary"),
                    "deny" => ("Deny", "danger"),
                    _ => ("Extend", "primary"),
                };
                json!({"type": "button", "action_id": action, "value": request, "style": style, "text": {"type": "plain_text", "text": label}})
            })
            .collect();
        blocks.push(json!({"type": "actions", "block_id": format!("{request}.{kind}"), "elements": elements}));
    }
    if let (Some(approve), Some(deny)) = (data["decide"]["approve"].as_str(), data["decide"]["deny"].as_str()) {
        let block_id = format!("{}.decide", data["request_id"].as_str().unwrap_or("request"));
        blocks.push(json!({"type": "actions", "block_id": block_id, "elements": [
            {"type": "button", "action_id": "approve", "style": "primary", "url": approve, "text": {"type": "plain_text", "text": "Approve (sign in)"}},
            {"type": "button", "action_id": "deny", "style": "danger", "url": deny, "text": {"type": "plain_text", "text": "Deny (sign in)"}},
        ]}));
    }
    json!({"text": text, "blocks": blocks})
}

fn teams_card(kind: &str, data: &Value) -> Value {
    let mut facts = Vec::new();
    for (title, key) in [
        ("Requester", "requester"),
        ("Policy", "policy"),
        ("Ports", "ports"),
        ("Source", "source"),
        ("Duration", "duration"),
        ("Justification", "justification"),
        ("State", "state"),
    ] {
        let value = match &data[key] {
            Value::Null => continue,
            Value::String(s) => s.clone(),
            Value::Array(items) => items.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "),
            other => other.to_string(),
        };
        facts.push(json!({"title": title, "value": teams_text(&value)}));
    }
    let mut card = json!({
        "type": "AdaptiveCard", "version": "1.4",
        "body": [{"type": "TextBlock", "text": teams_text(&summary(kind, data)), "weight": "Bolder", "wrap": true},
                 {"type": "FactSet", "facts": facts}],
    });
    let mut actions = Vec::new();
    if let (Some(approve), Some(deny)) = (data["decide"]["approve"].as_str(), data["decide"]["deny"].as_str()) {
        actions.push(json!({"type": "Action.OpenUrl", "title": "Approve (sign in)", "url": approve}));
        actions.push(json!({"type": "Action.OpenUrl", "title": "Deny (sign in)", "url": deny}));
    }
    if let Some(url) = data["url"].as_str() {
        actions.push(json!({"type": "Action.OpenUrl", "title": "Open in portcullis", "url": url}));
    }
    if !actions.is_empty() {
        card["actions"] = json!(actions);
    }
    json!({"type": "message", "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": null, "content": card}]})
}

/// What people wrote, made inert in Slack's mrkdwn: no links, mentions (`<!channel>`) or
/// formatting of their own, so a justification cannot pose as a button.
fn slack_text(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// What people wrote, made inert in Teams' markdown.
fn teams_text(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped =
                matches!(c, '[' | ']' | '(' | ')' | '*' | '_' | '`' | '#' | '<' | '>' | '!' | '~' | '|' | '\\');
            escaped.then_some('\\').into_iter().chain(std::iter::once(c))
        })
        .collect()
}

fn truncate(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_people_wrote_cannot_pose_as_a_link_or_a_mention() {
        let data = json!({"requester": "mallory", "policy": "p", "ports": ["22/tcp"], "duration": "PT1H",
            "justification": "<https://evil.example/decide/x|Approve (sign in)> <!channel> [Approve](https://evil.example)"});
        let slack = slack_message("request.created", &data).to_string();
        assert!(!slack.contains("<https://evil") && !slack.contains("<!channel>"), "{slack}");
        let teams = teams_card("request.created", &data).to_string();
        assert!(!teams.contains("[Approve](https"), "{teams}");
    }
}
