//! The hostile-input corpus (`tests/corpus/hostile.jsonl`, one request a line): oversized and
//! deeply nested bodies, invalid UTF-8, wrong shapes, absurd numbers, durations and prefixes,
//! control characters, path tricks, wrong methods and content types, forged headers and
//! malformed credentials. Each gets its 4xx with a JSON error body, never a 5xx, a hang or a
//! dropped connection, and the whole corpus changes nothing: the store (the audit trail of
//! the refusals aside) and the NSG are the same before and after.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use crate::support::*;

fn body_of(case: &Value) -> Vec<u8> {
    if let Some(body) = case["body"].as_str() {
        return body.as_bytes().to_vec();
    }
    if let Some(encoded) = case["body_b64"].as_str() {
        return base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
    }
    if let Some(repeat) = case.get("repeat") {
        let fill = repeat["fill"].as_str().unwrap();
        let count = repeat["count"].as_u64().unwrap() as usize;
        let mut body = repeat["prefix"].as_str().unwrap().to_owned();
        body.push_str(&fill.repeat(count));
        body.push_str(repeat["suffix"].as_str().unwrap());
        return body.into_bytes();
    }
    Vec::new()
}

/// The store as it matters: what refusals legitimately add (their audit events, the count of
/// failed logins) and caches left out.
fn state(world: &World) -> Vec<(String, String)> {
    world
        .local
        .host
        .dump_store()
        .into_iter()
        .filter(|(key, _)| !["audit:", "authfail:", "tally:", "cache:"].iter().any(|p| key.starts_with(p)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_hostile_request_gets_its_4xx_and_changes_nothing() {
    let world = World::start().await;
    world.auto_policy().await;
    let corpus = include_str!("../../corpus/hostile.jsonl");
    let cases: Vec<Value> = corpus.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(cases.len() >= 80, "{} cases", cases.len());
    let (store_before, rules_before) = (state(&world), world.rules());
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let mut codes: BTreeMap<(u16, String), usize> = BTreeMap::new();
    let mut mismatches = Vec::new();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let url = format!("{}{}", world.local.host.url(), case["path"].as_str().unwrap());
        let mut request = client.request(case["method"].as_str().unwrap().parse().unwrap(), url);
        if let Some(key) = case["key"].as_str() {
            request = request.bearer_auth(match key {
                "alice" => ALICE,
                "bob" => BOB,
                "admin" => ADMIN,
                other => panic!("unknown key {other}"),
            });
        }
        for (header, value) in case["headers"].as_object().into_iter().flatten() {
            request = request.header(header.as_str(), value.as_str().unwrap());
        }
        let response = request.body(body_of(case)).send().await.unwrap_or_else(|e| panic!("{name}: no answer: {e}"));
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_else(|e| panic!("{name}: the answer broke off: {e}"));
        let answer: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{name}: not JSON: {text:.200}"));
        let code = answer["error"]["code"].as_str().unwrap_or("(no error code)");
        if status != case["expect"].as_u64().unwrap() as u16
            || !(400..500).contains(&status)
            || code == "(no error code)"
        {
            mismatches.push(format!("{name}: expected {}, got {status} {answer}", case["expect"]));
        }
        *codes.entry((status, code.to_owned())).or_default() += 1;
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    assert_eq!(state(&world), store_before, "the corpus changed the store");
    assert_eq!(world.rules(), rules_before, "the corpus changed the NSG");
    let summary: Vec<String> = codes.iter().map(|((status, code), n)| format!("{status} {code} x{n}")).collect();
    println!("corpus: {} hostile requests: {}", cases.len(), summary.join(", "));
}
