//! Decision links: the buttons of chat messages (Teams cards cannot decide, and a chat click
//! is weaker than a sign-in) are links to `GET /decide/{token}`, a page that shows the request
//! and asks the approver to sign in before the decision counts (`POST /decide/{token}`).
//!
//! A token is HMAC-signed with `decision_link_secret`, bound to one request and one
//! decision, valid until it expires (`decision_link_ttl`, at most the request's wait for
//! approval) and used once. A leaked link alone decides nothing: the approver's credential
//! does, under every rule of the API (self-approval included).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::domain::{AccessRequest, RequestId};

/// What a link decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkDecision {
    /// Approve the request.
    Approve,
    /// Deny it.
    Deny,
}

impl LinkDecision {
    fn code(self) -> &'static str {
        match self {
            Self::Approve => "approve",
            Self::Deny => "deny",
        }
    }

    /// The word on the page.
    pub fn verb(self) -> &'static str {
        match self {
            Self::Approve => "Approve",
            Self::Deny => "Deny",
        }
    }
}

/// A verified link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// The request it is for.
    pub request: RequestId,
    /// What it decides.
    pub decision: LinkDecision,
    /// Until when it is valid.
    pub expires: DateTime<Utc>,
    /// Its MAC, as hex: what marks it used.
    pub mark: String,
}

fn mac(key: &[u8], payload: &str) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"portcullis decision link v1\0");
    mac.update(payload.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// A link token for `decision` on `request`, valid until `expires`.
pub fn token(key: &[u8], request: &RequestId, decision: LinkDecision, expires: DateTime<Utc>) -> String {
    let payload = format!("{request}.{}.{}", decision.code(), expires.timestamp());
    format!("{}.{}", URL_SAFE_NO_PAD.encode(&payload), URL_SAFE_NO_PAD.encode(mac(key, &payload)))
}

/// Reads and checks a token: signed with `key`, not expired. Says nothing about why not.
pub fn verify(key: &[u8], token: &str, now: DateTime<Utc>) -> Option<Link> {
    if token.len() > 300 {
        return None;
    }
    let (payload, signature) = token.split_once('.')?;
    let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
    let expected = mac(key, &payload);
    if !bool::from(subtle::ConstantTimeEq::ct_eq(signature.as_slice(), expected.as_slice())) {
        return None;
    }
    let mut parts = payload.split('.');
    let request = RequestId::parse(parts.next()?).ok()?;
    let decision = match parts.next()? {
        "approve" => LinkDecision::Approve,
        "deny" => LinkDecision::Deny,
        _ => return None,
    };
    let expires = DateTime::from_timestamp(parts.next()?.parse().ok()?, 0)?;
    (parts.next().is_none() && expires > now).then(|| Link {
        request,
        decision,
        expires,
        mark: hex::encode(&expected[..16]),
    })
}

/// Escapes text for HTML.
pub fn escape(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '&' => "&amp;".into(),
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '"' => "&quot;".into(),
            '\'' => "&#39;".into(),
            c => c.to_string(),
        })
        .collect()
}

/// A whole page around `body`.
pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
         <meta name=\"referrer\" content=\"no-referrer\"><title>{t}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem}}\
         dt{{font-weight:600}}dd{{margin:0 0 .5rem}}input{{width:100%;padding:.4rem}}button{{margin-top:1rem;padding:.5rem 1.5rem}}</style>\
         </head><body><h1>{t}</h1>{body}</body></html>",
        t = escape(title)
    )
}

/// The page of a valid link: the request, and a form to sign in and decide. With `browser`
/// (sign-in through the identity provider is configured) the form offers it first, with the
/// browser's cookie as its CSRF token.
pub fn form(link: &Link, request: &AccessRequest, action: &str, browser: Option<&str>) -> String {
    let ports: Vec<String> = request.ports.iter().map(|p| p.to_string()).collect();
    let facts = [
        (
            "Requester",
            request
                .requester_name
                .clone()
                .map_or(request.requester.to_string(), |n| format!("{n} ({})", request.requester)),
        ),
        ("Policy", request.policy.to_string()),
        ("Ports", format!("{} ({})", ports.join(", "), request.protocol.arm_name())),
        ("From", request.source.to_string()),
        ("For", request.duration.to_string()),
        ("Justification", request.justification.clone()),
        ("Link valid until", link.expires.to_rfc3339()),
    ];
    let facts: String = facts.iter().map(|(k, v)| format!("<dt>{}</dt><dd>{}</dd>", escape(k), escape(v))).collect();
    let verb = link.decision.verb();
    let action = escape(action);
    let comment = "<label>Comment <input type=\"text\" name=\"comment\" maxlength=\"300\"></label>";
    let provider = browser.map_or(String::new(), |browser| {
        format!(
            "<form method=\"post\" action=\"{action}\"><input type=\"hidden\" name=\"sign_in\" value=\"provider\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">{comment}\
             <button type=\"submit\">Sign in and {}</button></form><p>Or use an API key:</p>",
            escape(browser),
            verb.to_lowercase()
        )
    });
    page(
        &format!("{verb} request {}", request.id),
        &format!(
            "<dl>{facts}</dl>{provider}<form method=\"post\" action=\"{action}\">\
             <label>Sign in with your API key or bearer token <input type=\"password\" name=\"credential\" autocomplete=\"off\" required></label>\
             {comment}<button type=\"submit\">{verb}</button></form>\
             <p>The decision counts as yours, under the same rules as the API.</p>"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::at;

    #[test]
    fn a_token_decides_only_what_it_names_until_it_expires() {
        let key = b"0123456789abcdef0123456789abcdef";
        let id = RequestId::parse("r1").unwrap();
        let token = token(key, &id, LinkDecision::Approve, at(15));
        let link = verify(key, &token, at(0)).unwrap();
        assert_eq!((link.request, link.decision, link.expires), (id.clone(), LinkDecision::Approve, at(15)));
        assert_eq!(verify(key, &token, at(15)), None, "expired");
        assert_eq!(verify(b"another key, of the same length!", &token, at(0)), None, "another key");
        // A token for one request or decision cannot be made into another.
        let (payload, signature) = token.split_once('.').unwrap();
        let other = URL_SAFE_NO_PAD.encode(format!("r2.approve.{}", at(15).timestamp()));
        assert_eq!(verify(key, &format!("{other}.{signature}"), at(0)), None);
        let deny = URL_SAFE_NO_PAD.encode(format!("r1.deny.{}", at(15).timestamp()));
        assert_eq!(verify(key, &format!("{deny}.{signature}"), at(0)), None);
        assert_eq!(verify(key, &format!("{payload}.{}", &signature[1..]), at(0)), None);
        assert_eq!(verify(key, "garbage", at(0)), None);
    }

    #[test]
    fn pages_escape_what_people_wrote() {
        assert_eq!(escape("<script>alert('x')</script>&"), "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;");
    }
}
