//! The emulator's resources, operations, faults and call log, and its request handling.

use std::collections::{BTreeMap, HashMap};

use axum::http::{HeaderMap, Method, Uri};
use serde_json::{Value, json};

use super::rules;
use super::{CLIENT_ID, CLIENT_SECRET, TENANT};

/// One call the emulator answered.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// HTTP method.
    pub method: String,
    /// Path, without the query.
    pub path: String,
    /// The status answered.
    pub status: u16,
}

/// An error to answer instead of the real thing, for the next `times` matching calls.
#[derive(Clone, Debug)]
pub struct Fault {
    /// Only calls with this method (`None`: any).
    pub method: Option<&'static str>,
    /// Only paths containing this (`None`: any).
    pub path_contains: Option<String>,
    /// Status to answer.
    pub status: u16,
    /// ARM error code in the body.
    pub code: &'static str,
    /// `Retry-After` seconds, if any.
    pub retry_after: Option<u64>,
    /// How many calls it hits.
    pub times: u32,
}

impl Fault {
    /// `times` calls with `method` answered with `status` and `code`.
    pub fn new(method: &'static str, status: u16, code: &'static str, times: u32) -> Self {
        Self { method: Some(method), path_contains: None, status, code, retry_after: None, times }
    }
}

struct Nsg {
    id: String,
    location: String,
    rules: BTreeMap<String, Value>,
}

enum OperationKind {
    Put,
    Delete,
}

struct Operation {
    nsg: String,
    rule: String,
    kind: OperationKind,
    polls_left: u32,
}

type Answer = (u16, Vec<(String, String)>, String);

fn arm_error(status: u16, code: &str, message: &str) -> Answer {
    (
        status,
        vec![("x-ms-request-id".into(), uuid::Uuid::new_v4().to_string())],
        json!({"error": {"code": code, "message": message}}).to_string(),
    )
}

/// Everything the emulator knows.
pub struct EmulatorState {
    base_url: String,
    polls: u32,
    retry_after: u64,
    nsgs: HashMap<String, Nsg>,
    tokens: HashMap<String, ()>,
    operations: HashMap<String, Operation>,
    /// Faults still to fire.
    pub faults: Vec<Fault>,
    /// Every call, in order.
    pub calls: Vec<Call>,
}

impl EmulatorState {
    pub(super) fn new(base_url: String, polls: u32, retry_after: u64) -> Self {
        Self {
            base_url,
            polls,
            retry_after,
            nsgs: HashMap::new(),
            tokens: HashMap::new(),
            operations: HashMap::new(),
            faults: Vec::new(),
            calls: Vec::new(),
        }
    }

    pub(super) fn add_nsg(&mut self, id: &str, location: &str) {
        self.nsgs.insert(
            id.to_lowercase(),
            Nsg { id: id.to_owned(), location: location.to_owned(), rules: BTreeMap::new() },
        );
    }

    pub(super) fn seed_rule(&mut self, nsg: &str, name: &str, properties: Value) {
        let nsg = self.nsgs.get_mut(&nsg.to_lowercase()).expect("seeding a rule on an unknown NSG");
        let rule = rule_document(&nsg.id, name, properties, "Succeeded");
        nsg.rules.insert(name.to_lowercase(), rule);
    }

    pub(super) fn rules(&self, nsg: &str) -> Vec<Value> {
        self.nsgs.get(&nsg.to_lowercase()).map(|n| n.rules.values().cloned().collect()).unwrap_or_default()
    }

    fn take_fault(&mut self, method: &Method, path: &str) -> Option<Answer> {
        let index = self.faults.iter().position(|f| {
            f.times > 0
                && f.method.is_none_or(|m| m == method.as_str())
                && f.path_contains.as_deref().is_none_or(|p| path.contains(p))
        })?;
        let fault = &mut self.faults[index];
        fault.times -= 1;
        let mut answer = arm_error(fault.status, fault.code, "injected fault");
        if fault.code == "RetryableError" {
            answer.2 = json!({"error": {"code": "RetryableError", "message": "injected fault", "details": [{"code": "RetryableErrorDueToAnotherOperation", "message": "Another operation on this or dependent resource is in progress."}]}}).to_string();
        }
        if let Some(seconds) = fault.retry_after {
            answer.1.push(("retry-after".into(), seconds.to_string()));
        }
        Some(answer)
    }

    pub(super) fn handle(&mut self, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Answer {
        let path = uri.path();
        if let Some(answer) = self.take_fault(method, path) {
            return answer;
        }
        if path.ends_with("/oauth2/v2.0/token") && method == Method::POST {
            return self.token(path, body);
        }
        let authorized = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|token| self.tokens.contains_key(token));
        if !authorized {
            return arm_error(401, "InvalidAuthenticationToken", "The access token is missing or invalid.");
        }
        if !uri.query().unwrap_or_default().split('&').any(|pair| pair.starts_with("api-version=")) {
            return arm_error(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            );
        }
        if let Some(id) =
            path.split("/operations/").nth(1).filter(|_| path.contains("/providers/Microsoft.Network/locations/"))
        {
            return self.poll_async(id);
        }
        if let Some(id) = path.split("/operationResults/").nth(1) {
            return self.poll_location(id);
        }
        let lower = path.to_lowercase();
        let Some((nsg_path, rest)) = split_nsg(&lower) else {
            return arm_error(404, "ResourceNotFound", &format!("The resource '{path}' was not found."));
        };
        let nsg_id = &path[..nsg_path.len()];
        if !self.nsgs.contains_key(nsg_path) {
            return arm_error(
                404,
                "ResourceNotFound",
                &format!(
                    "The Resource 'Microsoft.Network/networkSecurityGroups/{}' was not found.",
                    nsg_id.rsplit('/').next().unwrap_or_default()
                ),
            );
        }
        let rule_name = rest.strip_prefix("/securityrules/").map(|_| &path[nsg_path.len() + "/securityRules/".len()..]);
        match (method.clone(), rest, rule_name) {
            (Method::GET, "", None) => {
                let nsg = &self.nsgs[nsg_path];
                let rules: Vec<Value> = nsg.rules.values().cloned().collect();
                (200, vec![], json!({"id": nsg.id, "name": nsg.id.rsplit('/').next(), "location": nsg.location, "type": "Microsoft.Network/networkSecurityGroups", "properties": {"provisioningState": "Succeeded", "securityRules": rules}}).to_string())
            }
            (Method::GET, "/securityrules", None) => (200, vec![], json!({"value": self.rules(nsg_path)}).to_string()),
            (Method::GET, _, Some(name)) => match self.nsgs[nsg_path].rules.get(&name.to_lowercase()) {
                Some(rule) => (200, vec![], rule.to_string()),
                None => arm_error(404, "NotFound", &format!("Resource {name} not found.")),
            },
            (Method::PUT, _, Some(name)) => self.put_rule(nsg_path, name, body),
            (Method::DELETE, _, Some(name)) => self.delete_rule(nsg_path, name),
            _ => arm_error(405, "MethodNotAllowed", "The requested method is not supported on this resource."),
        }
    }

    fn token(&mut self, path: &str, body: &[u8]) -> Answer {
        let tenant = path.trim_start_matches('/').split('/').next().unwrap_or_default();
        let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
        let field = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
        let invalid = |code: &str, description: &str| {
            (
                400,
                vec![],
                json!({"error": code, "error_description": description, "error_codes": [7000215]}).to_string(),
            )
        };
        if tenant != TENANT {
            return invalid("invalid_request", "AADSTS90002: Tenant not found.");
        }
        if field("grant_type") != "client_credentials" {
            return invalid("unsupported_grant_type", "AADSTS70003: The app requested an unsupported grant type.");
        }
        if field("client_id") != CLIENT_ID || field("client_secret") != CLIENT_SECRET {
            return invalid("invalid_client", "AADSTS7000215: Invalid client secret provided.");
        }
        let token = format!("emu-{}", uuid::Uuid::new_v4().simple());
        self.tokens.insert(token.clone(), ());
        (
            200,
            vec![],
            json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token})
                .to_string(),
        )
    }

    fn operation_headers(&mut self, nsg: &str, rule: &str, kind: OperationKind) -> Vec<(String, String)> {
        let id = uuid::Uuid::new_v4().to_string();
        let location = &self.nsgs[nsg].location;
        let subscription = nsg.split('/').nth(2).unwrap_or_default();
        let base =
            format!("{}/subscriptions/{subscription}/providers/Microsoft.Network/locations/{location}", self.base_url);
        let headers = match kind {
            OperationKind::Put => {
                vec![("azure-asyncoperation".to_owned(), format!("{base}/operations/{id}?api-version=2024-05-01"))]
            }
            OperationKind::Delete => vec![
                ("location".to_owned(), format!("{base}/operationResults/{id}?api-version=2024-05-01")),
                ("azure-asyncoperation".to_owned(), String::new()),
            ],
        };
        self.operations
            .insert(id, Operation { nsg: nsg.to_owned(), rule: rule.to_lowercase(), kind, polls_left: self.polls });
        let mut headers: Vec<_> = headers.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        headers.push(("retry-after".into(), self.retry_after.to_string()));
        headers
    }

    fn put_rule(&mut self, nsg: &str, name: &str, body: &[u8]) -> Answer {
        let body: Value = match serde_json::from_slice(body) {
            Ok(body) => body,
            Err(e) => return arm_error(400, "InvalidRequestFormat", &format!("Cannot parse the request: {e}")),
        };
        if let Err((code, message)) = rules::validate(name, &body) {
            return arm_error(400, code, &message);
        }
        let properties = body["properties"].clone();
        let clash = self.nsgs[nsg].rules.iter().find(|(other, rule)| {
            **other != name.to_lowercase()
                && rule["properties"]["priority"] == properties["priority"]
                && rule["properties"]["direction"] == properties["direction"]
        });
        if let Some((other, _)) = clash {
            let message = format!(
                "Security rule {other} conflicts with rule {name}. Rules cannot have the same Priority and Direction."
            );
            return arm_error(400, "SecurityRuleConflict", &message);
        }
        let existed = self.nsgs[nsg].rules.contains_key(&name.to_lowercase());
        let id = self.nsgs[nsg].id.clone();
        let rule = rule_document(&id, name, properties, "Updating");
        self.nsgs.get_mut(nsg).unwrap().rules.insert(name.to_lowercase(), rule.clone());
        let headers = self.operation_headers(nsg, name, OperationKind::Put);
        (if existed { 200 } else { 201 }, headers, rule.to_string())
    }

    fn delete_rule(&mut self, nsg: &str, name: &str) -> Answer {
        let Some(rule) = self.nsgs.get_mut(nsg).unwrap().rules.get_mut(&name.to_lowercase()) else {
            return (204, vec![], String::new());
        };
        rule["properties"]["provisioningState"] = json!("Deleting");
        let headers = self.operation_headers(nsg, name, OperationKind::Delete);
        (202, headers, String::new())
    }

    /// Advances an operation by one poll; true when it has completed.
    fn advance(&mut self, id: &str) -> Option<bool> {
        let operation = self.operations.get_mut(id)?;
        if operation.polls_left > 0 {
            operation.polls_left -= 1;
            return Some(false);
        }
        let operation = self.operations.remove(id)?;
        if let Some(nsg) = self.nsgs.get_mut(&operation.nsg) {
            match operation.kind {
                OperationKind::Put => {
                    if let Some(rule) = nsg.rules.get_mut(&operation.rule) {
                        rule["properties"]["provisioningState"] = json!("Succeeded");
                    }
                }
                OperationKind::Delete => {
                    nsg.rules.remove(&operation.rule);
                }
            }
        }
        Some(true)
    }

    fn poll_async(&mut self, id: &str) -> Answer {
        match self.advance(id) {
            Some(false) => (
                200,
                vec![("retry-after".into(), self.retry_after.to_string())],
                json!({"status": "InProgress"}).to_string(),
            ),
            Some(true) => (200, vec![], json!({"status": "Succeeded"}).to_string()),
            None => arm_error(404, "OperationNotFound", "The operation was not found."),
        }
    }

    fn poll_location(&mut self, id: &str) -> Answer {
        match self.advance(id) {
            Some(false) => (202, vec![("retry-after".into(), self.retry_after.to_string())], String::new()),
            Some(true) => (204, vec![], String::new()),
            None => arm_error(404, "OperationNotFound", "The operation was not found."),
        }
    }
}

/// Splits a lower-cased path into the NSG id and what follows it.
fn split_nsg(lower: &str) -> Option<(&str, &str)> {
    let marker = "/providers/microsoft.network/networksecuritygroups/";
    let start = lower.find(marker)? + marker.len();
    let end = lower[start..].find('/').map_or(lower.len(), |i| start + i);
    Some((&lower[..end], &lower[end..]))
}

fn rule_document(nsg_id: &str, name: &str, mut properties: Value, provisioning: &str) -> Value {
    properties["provisioningState"] = json!(provisioning);
    json!({
        "id": format!("{nsg_id}/securityRules/{name}"),
        "name": name,
        "etag": format!("W/\"{}\"", uuid::Uuid::new_v4()),
        "type": "Microsoft.Network/networkSecurityGroups/securityRules",
        "properties": properties,
    })
}
