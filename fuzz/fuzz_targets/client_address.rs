//! What callers and proxies put in address headers, and what sits in the store sealed: any
//! text is read or refused, never a panic; a caller's address never names a trusted proxy,
//! and the rate-limit subject made of it is short and fit for a store key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::auth::client_ip;
use shared::seal::SealingKey;
use shared::service::throttle::address_subject;

fuzz_target!(|text: &str| {
    let mut parts = text.splitn(2, '\n');
    let (peer, forwarded) = (parts.next(), parts.next());
    let proxies = ["10.0.0.0/8".parse().unwrap(), "2001:db8::/32".parse().unwrap()];
    if let Some(ip) = client_ip(peer, forwarded, &proxies) {
        // A forwarded hop is believed only past trusted proxies, and is never one of them.
        if Some(ip) != client_ip(peer, None, &[]) {
            assert!(!proxies.iter().any(|n| n.contains(&ip)), "a trusted proxy named as the caller: {text:?}");
        }
        let subject = address_subject(Some(ip));
        assert!(subject.len() <= 39 && !subject.contains(['/', '\\', '?', '#']), "{subject}");
    }
    let key = SealingKey::from_secret("fuzzing key, at least 32 characters long");
    assert_eq!(key.open("cache:arm-token", text), None, "only what was sealed opens");
});
