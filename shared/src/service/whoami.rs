//! `GET /api/whoami`: who the credential names, as portcullis sees it, and the address a
//! request from this caller would be opened for (the CLI and the page prefill the source
//! with it).

use std::net::IpAddr;

use serde_json::json;

use crate::api::Reply;
use crate::auth::Caller;

/// The caller's principal, name, roles and groups, and their address.
pub fn whoami(caller: &Caller, address: Option<IpAddr>) -> Reply {
    let mut body = json!({
        "principal": caller.principal,
        "roles": caller.roles,
        "groups": caller.groups,
        "address": address.map(|a| a.to_string()),
    });
    if let Some(name) = &caller.display_name {
        body["display_name"] = json!(name);
    }
    Reply::ok(body)
}
