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
    /// The `x-ms-request-id` answered.
    pub request_id: String,
}

/// What a fault does to a call.
#[derive(Clone, Debug, PartialEq)]
pub enum FaultKind {
    /// Answer this error instead.
    Error {
        /// HTTP status.
        status: u16,
        /// ARM error code.
        code: &'static str,
    },
    /// Answer for real, but only after this long.
    Slow(std::time::Duration),
    /// Send headers, then break the connection mid-body.
    Drop,
    /// Do the call for real (a PUT lands, a DELETE removes), then lose the answer: the
    /// connection breaks.
    LandThenDrop,
    /// Do the call for real, then answer this error anyway (a DELETE that worked but says 500).
    LandThenError {
        /// HTTP status.
        status: u16,
        /// ARM error code.
        code: &'static str,
    },
}

/// Trouble for the calls it matches: the next `times` of them, and of those only a `rate`
/// fraction (1.0: every one), spread evenly so tests stay deterministic.
#[derive(Clone, Debug)]
pub struct Fault {
    /// Only calls with this method (`None`: any).
    pub method: Option<&'static str>,
    /// Only paths containing this (`None`: any).
    pub path_contains: Option<String>,
    /// What happens.
    pub kind: FaultKind,
    /// `Retry-After` seconds on an error, if any.
    pub retry_after: Option<u64>,
    /// How many calls it may still hit.
    pub times: u32,
    /// The fraction of matching calls it hits.
    pub rate: f64,
    /// How many calls it has hit so far.
    pub hits: u32,
    accumulated: f64,
}

impl Fault {
    /// `times` calls with `method` answered with `status` and `code`.
    pub fn new(method: &'static str, status: u16, code: &'static str, times: u32) -> Self {
        Self::of(Some(method), FaultKind::Error { status, code }, times)
    }

    /// `times` matching calls suffer `kind`.
    pub fn of(method: Option<&'static str>, kind: FaultKind, times: u32) -> Self {
        Self { method, path_contains: None, kind, retry_after: None, times, rate: 1.0, hits: 0, accumulated: 0.0 }
    }
}

/// What the HTTP layer must do besides answering.
pub enum Delivery {
    /// Answer now.
    Now,
    /// Wait, then answer.
    After(std::time::Duration),
    /// Break the connection.
    Drop,
}

struct Nsg {
    id: String,
    location: String,
    rules: BTreeMap<String, Value>,
}

#[derive(PartialEq, Eq)]
enum OperationKind {
    Put,
    Delete,
    /// An update of a whole Azure Firewall (`nsg` holds the firewall's id).
    Firewall,
}

/// An Azure Firewall: its document, its etag's number, and whether an update is running.
struct Firewall {
    doc: Value,
    etag: u64,
    updating: bool,
}

struct Operation {
    nsg: String,
    rule: String,
    kind: OperationKind,
    polls_left: u32,
}

pub(super) type Answer = (u16, Vec<(String, String)>, String);

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
    /// Other resources (VMs, NICs, subnets) by lower-cased id.
    resources: HashMap<String, Value>,
    /// Entries a list answers per page (ARM's pages are larger; small ones exercise paging).
    pub page_size: usize,
    /// Azure Firewalls by lower-cased id.
    firewalls: HashMap<String, Firewall>,
    tokens: HashMap<String, ()>,
    /// Tokens issued, by endpoint (`client_credentials`, `imds`, `app_service`).
    pub tokens_issued: HashMap<&'static str, u32>,
    operations: HashMap<String, Operation>,
    /// Faults still to fire.
    pub faults: Vec<Fault>,
    /// Every call, in order.
    pub calls: Vec<Call>,
    /// The OIDC issuer.
    pub oidc: super::oidc::Issuer,
}

impl EmulatorState {
    pub(super) fn new(base_url: String, polls: u32, retry_after: u64) -> Self {
        Self {
            base_url,
            polls,
            retry_after,
            nsgs: HashMap::new(),
            resources: HashMap::new(),
            page_size: 100,
            firewalls: HashMap::new(),
            tokens: HashMap::new(),
            tokens_issued: HashMap::new(),
            operations: HashMap::new(),
            faults: Vec::new(),
            calls: Vec::new(),
            oidc: super::oidc::Issuer::new(),
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

    pub(super) fn add_resource(&mut self, id: &str, document: Value) {
        self.resources.insert(id.to_lowercase(), document);
    }

    /// Replaces a resource's tags; answers whether it exists.
    pub(super) fn set_tags(&mut self, id: &str, tags: Value) -> bool {
        self.resources.get_mut(&id.to_lowercase()).map(|resource| resource["tags"] = tags).is_some()
    }

    /// The fault that hits this call, if any, with the error to answer for error faults.
    fn take_fault(&mut self, method: &Method, path: &str) -> Option<(Fault, Option<Answer>)> {
        let mut hit = None;
        for (index, f) in self.faults.iter_mut().enumerate() {
            let matches = f.times > 0
                && f.method.is_none_or(|m| m == method.as_str())
                && f.path_contains.as_deref().is_none_or(|p| path.contains(p));
            if matches {
                f.accumulated += f.rate;
                if f.accumulated >= 1.0 {
                    hit = Some(index);
                    break;
                }
            }
        }
        let fault = &mut self.faults[hit?];
        fault.accumulated -= 1.0;
        fault.times -= 1;
        fault.hits += 1;
        let fault = fault.clone();
        let FaultKind::Error { status, code } = fault.kind else { return Some((fault, None)) };
        let mut answer = arm_error(status, code, "injected fault");
        if code == "RetryableError" {
            answer.2 = json!({"error": {"code": "RetryableError", "message": "injected fault", "details": [{"code": "RetryableErrorDueToAnotherOperation", "message": "Another operation on this or dependent resource is in progress."}]}}).to_string();
        }
        if let Some(seconds) = fault.retry_after {
            answer.1.push(("retry-after".into(), seconds.to_string()));
        }
        Some((fault, Some(answer)))
    }

    pub(super) fn handle(
        &mut self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> (Answer, Delivery) {
        match self.take_fault(method, uri.path()) {
            Some((_, Some(answer))) => (answer, Delivery::Now),
            Some((Fault { kind: FaultKind::Slow(delay), .. }, None)) => {
                (self.answer(method, uri, headers, body), Delivery::After(delay))
            }
            Some((Fault { kind: FaultKind::LandThenDrop, .. }, None)) => {
                self.land(method, uri, headers, body);
                ((200, vec![], "{}".into()), Delivery::Drop)
            }
            Some((Fault { kind: FaultKind::LandThenError { status, code }, .. }, None)) => {
                self.land(method, uri, headers, body);
                (arm_error(status, code, "injected fault after the call took effect"), Delivery::Now)
            }
            Some((_, None)) => ((200, vec![], "{}".into()), Delivery::Drop),
            None => (self.answer(method, uri, headers, body), Delivery::Now),
        }
    }

    /// Does a call whose answer will be lost, and lets its operation finish on its own, as
    /// ARM's would with nobody polling it.
    fn land(&mut self, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) {
        self.answer(method, uri, headers, body);
        let rule = uri.path().rsplit('/').next().unwrap_or_default().to_lowercase();
        let firewall = uri.path().to_lowercase();
        let pending: Vec<String> = self
            .operations
            .iter()
            .filter(|(_, op)| match op.kind {
                OperationKind::Firewall => op.nsg == firewall,
                OperationKind::Put | OperationKind::Delete => op.rule == rule,
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in pending {
            while self.advance(&id) == Some(false) {}
        }
    }

    /// Removes a rule directly, as someone in the portal would.
    pub(super) fn remove_rule(&mut self, nsg: &str, name: &str) -> bool {
        self.nsgs.get_mut(&nsg.to_lowercase()).is_some_and(|n| n.rules.remove(&name.to_lowercase()).is_some())
    }

    fn answer(&mut self, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Answer {
        let path = uri.path();
        if path.ends_with("/oauth2/v2.0/token") && method == Method::POST {
            return self.token(path, body);
        }
        if path == "/metadata/identity/oauth2/token" && method == Method::GET {
            return self.imds_token(uri, headers);
        }
        if path == "/msi/token" && method == Method::GET {
            return self.app_service_token(uri, headers);
        }
        if path == "/oidc/keys" && method == Method::GET {
            return (200, vec![], serde_json::to_string(&self.oidc.jwks()).expect("a JWKS serialises"));
        }
        if path == "/oidc/authorize" && method == Method::GET {
            return self.oidc.authorize(uri.query().unwrap_or_default());
        }
        if path == "/oidc/token" && method == Method::POST {
            return self.oidc.redeem(body);
        }
        if path == "/oidc/.well-known/openid-configuration" && method == Method::GET {
            let issuer = format!("{}/oidc", self.base_url);
            return (200, vec![], json!({"issuer": issuer, "jwks_uri": format!("{issuer}/keys"), "authorization_endpoint": format!("{issuer}/authorize"), "token_endpoint": format!("{issuer}/token"), "code_challenge_methods_supported": ["S256"]}).to_string());
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
        if method == Method::GET
            && let Some(answer) = self.list(&lower, uri.query().unwrap_or_default())
        {
            return answer;
        }
        if self.firewalls.contains_key(&lower) {
            return match *method {
                Method::GET => self.get_firewall(&lower),
                Method::PUT => self.put_firewall(&lower, headers, body),
                _ => arm_error(405, "MethodNotAllowed", "The requested method is not supported on this resource."),
            };
        }
        if let Some(resource) = self.resources.get(&lower) {
            return if method == Method::GET {
                (200, vec![], resource.to_string())
            } else {
                arm_error(405, "MethodNotAllowed", "read-only in the emulator")
            };
        }
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

    /// The VM lists of a subscription or resource group: Compute's
    /// (`.../providers/Microsoft.Compute/virtualMachines`) and the Resources API's
    /// (`.../resources`, with `$filter=tagName eq '<n>' and tagValue eq '<v>'` only, whose
    /// answers leave tags out, as ARM's do). Paged by `$skiptoken`, with ARM's `nextLink`.
    fn list(&self, lower: &str, query: &str) -> Option<Answer> {
        let (scope, resources_api) =
            if let Some(scope) = lower.strip_suffix("/providers/microsoft.compute/virtualmachines") {
                (scope, false)
            } else {
                (lower.strip_suffix("/resources")?, true)
            };
        let parts: Vec<&str> = scope.split('/').collect();
        let scoped =
            matches!(parts.as_slice(), ["", "subscriptions", _] | ["", "subscriptions", _, "resourcegroups", _]);
        if !scoped {
            return None;
        }
        let parameter = |name: &str| {
            query.split('&').find_map(|pair| pair.strip_prefix(name).and_then(|v| v.strip_prefix('='))).map(decode)
        };
        let filter = match (resources_api, parameter("$filter")) {
            (false, Some(_)) => {
                return Some(arm_error(400, "InvalidFilterInQueryString", "Compute lists take no tag filter."));
            }
            (true, Some(filter)) => match parse_tag_filter(&filter) {
                Some(tag) => Some(tag),
                None => return Some(arm_error(400, "InvalidFilterInQueryString", "Invalid $filter.")),
            },
            (_, None) => None,
        };
        let mut found: Vec<&Value> = self
            .resources
            .iter()
            .filter(|(id, _)| id.starts_with(&format!("{scope}/")))
            .map(|(_, resource)| resource)
            .filter(|resource| {
                let vm = resource["type"]
                    .as_str()
                    .is_some_and(|t| t.eq_ignore_ascii_case("Microsoft.Compute/virtualMachines"));
                // The Resources list holds top-level resources (a subnet is a VNet's child).
                (vm || resources_api && resource["type"].is_string())
                    // Tag names compare without case, values with.
                    && filter.as_ref().is_none_or(|(name, value)| {
                        resource["tags"].as_object().is_some_and(|tags| {
                            tags.iter().any(|(k, v)| k.eq_ignore_ascii_case(name) && v.as_str() == Some(value))
                        })
                    })
            })
            .collect();
        found.sort_by_key(|resource| resource["id"].as_str().map(str::to_lowercase));
        let skip: usize = parameter("$skiptoken").and_then(|token| token.parse().ok()).unwrap_or(0);
        let page: Vec<Value> = found
            .iter()
            .skip(skip)
            .take(self.page_size.max(1))
            .map(|resource| {
                let mut resource = (*resource).clone();
                if filter.is_some()
                    && let Some(fields) = resource.as_object_mut()
                {
                    fields.remove("tags");
                }
                resource
            })
            .collect();
        let mut body = json!({ "value": page });
        if skip + self.page_size.max(1) < found.len() {
            let kept: Vec<&str> = query.split('&').filter(|pair| !pair.starts_with("$skiptoken=")).collect();
            let next = skip + self.page_size.max(1);
            body["nextLink"] = json!(format!(
                "{}{scope}{}?{}&$skiptoken={next}",
                self.base_url,
                &lower[scope.len()..],
                kept.join("&")
            ));
        }
        Some((200, vec![], body.to_string()))
    }

    /// Adds an Azure Firewall (`doc` is its whole resource document).
    pub(super) fn add_firewall(&mut self, id: &str, mut doc: Value) {
        doc["properties"]["provisioningState"] = json!("Succeeded");
        self.firewalls.insert(id.to_lowercase(), Firewall { doc, etag: 1, updating: false });
    }

    /// A firewall's document as stored (for assertions).
    pub(super) fn firewall(&self, id: &str) -> Option<Value> {
        self.firewalls.get(&id.to_lowercase()).map(|f| f.doc.clone())
    }

    /// Changes a firewall's document directly (a new etag), as the portal would.
    pub(super) fn change_firewall(&mut self, id: &str, change: impl FnOnce(&mut Value)) {
        let firewall = self.firewalls.get_mut(&id.to_lowercase()).expect("a known firewall");
        change(&mut firewall.doc);
        firewall.etag += 1;
    }

    fn get_firewall(&self, id: &str) -> Answer {
        let firewall = &self.firewalls[id];
        let etag = format!("W/\"{}\"", firewall.etag);
        let mut doc = firewall.doc.clone();
        doc["etag"] = json!(etag);
        (200, vec![("etag".into(), etag)], doc.to_string())
    }

    /// A PUT of the whole firewall: `If-Match` honoured (412 when stale), one update at a
    /// time (409 `AnotherOperationInProgress`), classic rules checked as ARM checks them, and
    /// `Updating` until its operation has been polled to the end.
    fn put_firewall(&mut self, id: &str, headers: &HeaderMap, body: &[u8]) -> Answer {
        let Ok(mut doc) = serde_json::from_slice::<Value>(body) else {
            return arm_error(
                400,
                "InvalidRequestContent",
                "The request content was invalid and could not be deserialized.",
            );
        };
        let firewall = &self.firewalls[id];
        let etag = format!("W/\"{}\"", firewall.etag);
        if let Some(expected) = headers.get("if-match").and_then(|v| v.to_str().ok())
            && expected != etag
            && expected != "*"
        {
            return arm_error(
                412,
                "PreconditionFailed",
                "The condition specified using HTTP conditional header(s) is not met.",
            );
        }
        if firewall.updating {
            return arm_error(
                409,
                "AnotherOperationInProgress",
                "Another operation on this or dependent resource is in progress.",
            );
        }
        if let Err(message) = check_classic_rules(&doc["properties"]) {
            return arm_error(400, "AzureFirewallRuleInvalid", &message);
        }
        let stored = &firewall.doc;
        for field in ["id", "name", "type", "location"] {
            doc[field] = stored[field].clone();
        }
        if let Some(fields) = doc.as_object_mut() {
            fields.remove("etag");
        }
        doc["properties"]["provisioningState"] = json!("Updating");
        let subscription = id.split('/').nth(2).unwrap_or_default().to_owned();
        let location = stored["location"].as_str().unwrap_or("westeurope").to_owned();
        let firewall = self.firewalls.get_mut(id).expect("checked above");
        firewall.doc = doc.clone();
        firewall.etag += 1;
        firewall.updating = true;
        let operation = uuid::Uuid::new_v4().to_string();
        self.operations.insert(
            operation.clone(),
            Operation {
                nsg: id.to_owned(),
                rule: String::new(),
                kind: OperationKind::Firewall,
                polls_left: self.polls,
            },
        );
        let url = format!(
            "{}/subscriptions/{subscription}/providers/Microsoft.Network/locations/{location}/operations/{operation}?api-version=2024-05-01",
            self.base_url
        );
        let headers = vec![("azure-asyncoperation".into(), url), ("retry-after".into(), self.retry_after.to_string())];
        (200, headers, doc.to_string())
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
        let token = self.issue("client_credentials");
        (
            200,
            vec![],
            json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token})
                .to_string(),
        )
    }

    fn issue(&mut self, endpoint: &'static str) -> String {
        let token = format!("emu-{}", uuid::Uuid::new_v4().simple());
        self.tokens.insert(token.clone(), ());
        *self.tokens_issued.entry(endpoint).or_default() += 1;
        token
    }

    /// The VM's managed identity (IMDS): `Metadata: true`, numbers as strings.
    fn imds_token(&mut self, uri: &Uri, headers: &HeaderMap) -> Answer {
        let query: HashMap<String, String> =
            url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes()).into_owned().collect();
        if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
            let body =
                json!({"error": "invalid_request", "error_description": "Required metadata header not specified"});
            return (400, vec![], body.to_string());
        }
        if !query.contains_key("resource") || query.get("api-version").map(String::as_str) != Some("2018-02-01") {
            let body = json!({"error": "invalid_request", "error_description": "Required query variable 'resource' or 'api-version' is missing"});
            return (400, vec![], body.to_string());
        }
        let token = self.issue("imds");
        let expires_on = chrono::Utc::now().timestamp() + 3599;
        let body = json!({"access_token": token, "expires_in": "3599", "expires_on": expires_on.to_string(), "resource": query["resource"], "token_type": "Bearer"});
        (200, vec![], body.to_string())
    }

    /// App Service / container managed identity: `X-IDENTITY-HEADER`, `expires_on` as epoch.
    fn app_service_token(&mut self, uri: &Uri, headers: &HeaderMap) -> Answer {
        if headers.get("x-identity-header").and_then(|v| v.to_str().ok()) != Some(super::IDENTITY_HEADER) {
            return (401, vec![], json!({"statusCode": 401, "message": "Unauthorized request"}).to_string());
        }
        if !uri.query().unwrap_or_default().contains("resource=") {
            return (400, vec![], json!({"statusCode": 400, "message": "resource is required"}).to_string());
        }
        let token = self.issue("app_service");
        let expires_on = chrono::Utc::now().timestamp() + 3599;
        let body = json!({"access_token": token, "expires_on": expires_on.to_string(), "resource": "https://management.azure.com/", "token_type": "Bearer"});
        (200, vec![], body.to_string())
    }

    fn operation_headers(&mut self, nsg: &str, rule: &str, kind: OperationKind) -> Vec<(String, String)> {
        let id = uuid::Uuid::new_v4().to_string();
        let location = &self.nsgs[nsg].location;
        let subscription = nsg.split('/').nth(2).unwrap_or_default();
        let base =
            format!("{}/subscriptions/{subscription}/providers/Microsoft.Network/locations/{location}", self.base_url);
        let headers = match kind {
            OperationKind::Put | OperationKind::Firewall => {
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
        if operation.kind == OperationKind::Firewall {
            if let Some(firewall) = self.firewalls.get_mut(&operation.nsg) {
                firewall.doc["properties"]["provisioningState"] = json!("Succeeded");
                firewall.updating = false;
            }
            return Some(true);
        }
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
                OperationKind::Firewall => {}
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

/// Percent-decodes a query value.
fn decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3)) {
            (b'%', Some(hex)) if let Ok(byte) = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("zz"), 16) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `tagName eq '<n>' and tagValue eq '<v>'`, the one tag filter ARM's Resources list takes
/// (quotes doubled inside a value, as OData writes them).
fn parse_tag_filter(filter: &str) -> Option<(String, String)> {
    let rest = filter.trim().strip_prefix("tagName eq '")?;
    let (name, rest) = rest.split_once("' and tagValue eq '")?;
    let value = rest.strip_suffix('\'')?;
    Some((name.replace("''", "'"), value.replace("''", "'")))
}

/// What ARM checks of a firewall's classic rule collections: names of at most 80 characters,
/// priorities 100..=65000 unique per kind, known protocols, and NAT ports below 64000.
fn check_classic_rules(properties: &Value) -> Result<(), String> {
    for kind in ["natRuleCollections", "networkRuleCollections", "applicationRuleCollections"] {
        let mut priorities = Vec::new();
        for collection in properties[kind].as_array().into_iter().flatten() {
            let name = collection["name"].as_str().unwrap_or_default();
            if name.is_empty() || name.len() > 80 {
                return Err(format!("collection name '{name}' must be 1 to 80 characters"));
            }
            let priority = collection["properties"]["priority"].as_u64().unwrap_or(0);
            if !(100..=65000).contains(&priority) || priorities.contains(&priority) {
                return Err(format!("collection '{name}': priority {priority} is outside 100..65000 or taken"));
            }
            priorities.push(priority);
            for rule in collection["properties"]["rules"].as_array().into_iter().flatten() {
                let protocols_ok = rule["protocols"].as_array().is_some_and(|protocols| {
                    !protocols.is_empty()
                        && protocols.iter().all(|p| matches!(p.as_str(), Some("TCP" | "UDP" | "Any" | "ICMP")))
                });
                if kind != "applicationRuleCollections" && !protocols_ok {
                    return Err(format!("collection '{name}': a rule has no valid protocols"));
                }
                if kind == "natRuleCollections" {
                    let ports =
                        rule["destinationPorts"].as_array().into_iter().flatten().chain([&rule["translatedPort"]]);
                    for port in ports {
                        let number = port.as_str().and_then(|p| p.parse::<u32>().ok()).unwrap_or(0);
                        if !(1..64000).contains(&number) {
                            return Err(format!("collection '{name}': NAT ports must be 1 to 63999, not {port}"));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
