//! Which VMs a fleet covers: a resource group or a subscription, optionally narrowed to the
//! VMs carrying one tag value, listed through ARM page by page (issue 15's first step; fleet
//! policies resolve their VMs with it).
//!
//! Without a tag, the Compute list (`.../providers/Microsoft.Compute/virtualMachines`) is
//! read; with one, the Resources list filtered by tag (Compute takes no tag filter), keeping
//! only VMs. Both answer `value` and `nextLink`; a caller reads as many pages as its budget
//! allows and resumes from the link it was left with. A `nextLink` is followed only when it
//! points back into ARM: the bearer token goes wherever the link says.

use serde::{Deserialize, Serialize};

use super::ArmError;
use crate::domain::VmId;

/// The Compute API's version (VM lists).
pub const COMPUTE_LIST_API_VERSION: &str = "2024-07-01";
/// The Resources API's version (lists filtered by tag).
pub const RESOURCES_API_VERSION: &str = "2021-04-01";
/// The resource type of a VM, as the Resources list names it.
const VM_TYPE: &str = "Microsoft.Compute/virtualMachines";

/// A set of VMs named by where they are and, optionally, one tag value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSelector {
    /// `/subscriptions/<id>` or `/subscriptions/<id>/resourceGroups/<name>`.
    pub scope: String,
    /// Only VMs whose tag `name` holds `value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<TagMatch>,
}

/// A tag name and the value it must hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagMatch {
    /// The tag's name.
    pub name: String,
    /// Its value.
    pub value: String,
}

/// One page of a listing, and where the next one is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmPage {
    /// The VMs on this page.
    pub vms: Vec<VmId>,
    /// The next page's address (ARM's `nextLink`), when there is one.
    pub next: Option<String>,
}

impl VmSelector {
    /// Checks a scope and a tag. Scope segments take what ARM allows in subscription ids and
    /// resource group names; tag names and values refuse `'`, control characters and what
    /// Azure itself refuses in tag names (`<>%&\?/`), so nothing can leave the `$filter`
    /// string they are quoted in.
    pub fn new(scope: &str, tag: Option<TagMatch>) -> Result<Self, String> {
        let parts: Vec<&str> = scope.trim_end_matches('/').split('/').collect();
        let segment = |s: &str| {
            !s.is_empty()
                && s.len() <= 90
                && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.()".contains(c))
                && s.chars().any(|c| c != '.')
        };
        let shaped = match parts.as_slice() {
            ["", subscriptions, id] => subscriptions.eq_ignore_ascii_case("subscriptions") && segment(id),
            ["", subscriptions, id, groups, group] => {
                subscriptions.eq_ignore_ascii_case("subscriptions")
                    && segment(id)
                    && groups.eq_ignore_ascii_case("resourceGroups")
                    && segment(group)
            }
            _ => false,
        };
        if !shaped {
            return Err(format!(
                "'{}' is neither /subscriptions/<id> nor /subscriptions/<id>/resourceGroups/<name>",
                scope.chars().take(200).collect::<String>()
            ));
        }
        if let Some(tag) = &tag {
            for (what, text, limit) in [("tag name", &tag.name, 512), ("tag value", &tag.value, 256)] {
                let refused = |c: char| c.is_control() || "'<>%&\\?/".contains(c);
                if text.is_empty() || text.chars().count() > limit || text.chars().any(refused) {
                    return Err(format!(
                        "the {what} must be 1 to {limit} characters, without ' < > % & \\ ? / or control characters"
                    ));
                }
            }
        }
        Ok(Self { scope: parts.join("/"), tag })
    }

    /// The first page's address under `base` (ARM's URL).
    pub fn first_page(&self, base: &str) -> String {
        match &self.tag {
            None => format!(
                "{base}{}/providers/Microsoft.Compute/virtualMachines?api-version={COMPUTE_LIST_API_VERSION}",
                self.scope
            ),
            Some(tag) => {
                let filter = format!("tagName eq '{}' and tagValue eq '{}'", tag.name, tag.value);
                format!(
                    "{base}{}/resources?api-version={RESOURCES_API_VERSION}&$filter={}",
                    self.scope,
                    percent_encode(&filter)
                )
            }
        }
    }
}

/// Reads one page of a listing (`value`, `nextLink`): the VMs under `scope` (other resource
/// types, and ids outside the scope, are left out). A `nextLink` outside `base` is refused.
pub fn parse_page(page: &serde_json::Value, selector: &VmSelector, base: &str) -> Result<VmPage, ArmError> {
    let inside = format!("{}/", selector.scope.to_ascii_lowercase());
    let vms = page["value"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|resource| resource["type"].as_str().is_none_or(|kind| kind.eq_ignore_ascii_case(VM_TYPE)))
        .filter_map(|resource| resource["id"].as_str())
        .filter(|id| id.to_ascii_lowercase().starts_with(&inside))
        .filter_map(|id| VmId::parse(id).ok())
        .collect();
    let next = match page["nextLink"].as_str().filter(|link| !link.is_empty()) {
        None => None,
        Some(link) if link.starts_with(&format!("{}/", base.trim_end_matches('/'))) => Some(link.to_owned()),
        Some(link) => {
            return Err(ArmError::Transient(format!(
                "ARM's nextLink points outside ARM ({}); not followed",
                link.chars().take(100).collect::<String>()
            )));
        }
    };
    Ok(VmPage { vms, next })
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What a listing found within its page budget.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// The VMs found, in ARM's order, each once.
    pub vms: Vec<VmId>,
    /// Where to go on, when the budget ran out before the last page.
    pub resume: Option<String>,
}

/// Lists the VMs of `selector`, from `resume` (or the first page), reading at most
/// `max_pages` pages.
pub fn list(
    arm: &dyn super::Arm,
    selector: &VmSelector,
    resume: Option<&str>,
    max_pages: usize,
) -> Result<Listing, ArmError> {
    let mut listing = Listing::default();
    let mut next = resume.map(str::to_owned);
    for read in 0..max_pages.max(1) {
        let page = arm.list_vms(selector, next.as_deref())?;
        for vm in page.vms {
            // ARM's ids compare without case.
            if !listing.vms.iter().any(|known| known.as_str().eq_ignore_ascii_case(vm.as_str())) {
                listing.vms.push(vm);
            }
        }
        next = page.next;
        if next.is_none() {
            return Ok(listing);
        }
        if read + 1 == max_pages.max(1) {
            break;
        }
    }
    listing.resume = next;
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const BASE: &str = "https://management.azure.com";
    const GROUP: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/fleet-rg";

    fn tag(name: &str, value: &str) -> Option<TagMatch> {
        Some(TagMatch { name: name.into(), value: value.into() })
    }

    #[test]
    fn scopes_are_a_subscription_or_a_resource_group_and_tags_cannot_leave_their_quotes() {
        assert!(VmSelector::new(GROUP, None).is_ok());
        assert!(VmSelector::new("/subscriptions/0000", tag("jit", "ssh")).is_ok());
        for bad in [
            "",
            "/subscriptions",
            "/subscriptions/a/resourceGroups",
            "/subscriptions/a b",
            "subscriptions/a",
            "/subscriptions/..",
            "/subscriptions/s/resourceGroups/.",
        ] {
            assert!(VmSelector::new(bad, None).is_err(), "{bad}");
        }
        let vm = format!("{GROUP}/providers/Microsoft.Compute/virtualMachines/vm1");
        assert!(VmSelector::new(&vm, None).is_err(), "a VM is not a scope");
        for (name, value) in [("jit", "x' or tagName eq 'y"), ("a/b", "x"), ("", "x"), ("jit", ""), ("jit", "a\nb")] {
            assert!(VmSelector::new(GROUP, tag(name, value)).is_err(), "{name:?} {value:?}");
        }
    }

    #[test]
    fn a_tag_lists_through_the_resources_api_with_its_filter_encoded() {
        let plain = VmSelector::new(GROUP, None).unwrap().first_page(BASE);
        assert_eq!(
            plain,
            format!("{BASE}{GROUP}/providers/Microsoft.Compute/virtualMachines?api-version={COMPUTE_LIST_API_VERSION}")
        );
        let tagged = VmSelector::new(GROUP, tag("jit", "on call")).unwrap().first_page(BASE);
        assert_eq!(
            tagged,
            format!(
                "{BASE}{GROUP}/resources?api-version={RESOURCES_API_VERSION}&$filter=tagName%20eq%20%27jit%27%20and%20tagValue%20eq%20%27on%20call%27"
            )
        );
    }

    #[test]
    fn a_page_keeps_only_vms_inside_the_scope_and_follows_links_only_into_arm() {
        let selector = VmSelector::new(GROUP, tag("jit", "ssh")).unwrap();
        let vm = |rg: &str, name: &str| {
            format!(
                "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}"
            )
        };
        let page = json!({"value": [
            {"id": vm("fleet-rg", "vm1"), "type": "Microsoft.Compute/virtualMachines"},
            {"id": vm("FLEET-RG", "vm2"), "type": "microsoft.compute/virtualmachines"},
            {"id": vm("other-rg", "vm3"), "type": "Microsoft.Compute/virtualMachines"},
            {"id": format!("{GROUP}/providers/Microsoft.Network/networkInterfaces/nic"), "type": "Microsoft.Network/networkInterfaces"},
        ], "nextLink": format!("{BASE}{GROUP}/resources?page=2")});
        let parsed = parse_page(&page, &selector, BASE).unwrap();
        let names: Vec<&str> = parsed.vms.iter().map(|v| v.as_str().rsplit('/').next().unwrap()).collect();
        assert_eq!(names, ["vm1", "vm2"]);
        assert!(parsed.next.is_some());
        let elsewhere = json!({"value": [], "nextLink": "https://attacker.example/steal?token"});
        assert!(parse_page(&elsewhere, &selector, BASE).is_err(), "the token never leaves ARM");
        let lookalike = json!({"value": [], "nextLink": format!("{BASE}.attacker.example/x")});
        assert!(parse_page(&lookalike, &selector, BASE).is_err());
    }
}
