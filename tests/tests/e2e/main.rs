//! End-to-end tests: the real components in the Spin-compatible host, over HTTP, against
//! the ARM emulator.
//!
//! - `support`: the `World` harness (host + emulator + typed calls + failure report).
//! - `lifecycle`: the whole loop: request, approve, open, expire, close.
//! - `validation`: bad input gets a clear 4xx and changes nothing.
//! - `security`: authentication, self-approval, forged Spin headers, the sweep secret.
//! - `faults`: ARM failures are retried, never lost.

mod faults;
mod lifecycle;
mod security;
mod support;
mod validation;
