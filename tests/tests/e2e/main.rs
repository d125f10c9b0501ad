//! End-to-end tests: the real components in the Spin-compatible host, over HTTP, against
//! the ARM emulator.
//!
//! - `support`: the `World` harness (host + emulator + typed calls + failure report).
//! - `contract`: every answer `World::call` receives is checked against `openapi.json`;
//!   `openapi`: the description cannot drift from the routers and the error codes.
//! - `abuse`: a flood of bad credentials while grants expire.
//! - `corpus`: the hostile-input corpus in `tests/corpus/`, end to end.
//! - `audit`: the events every action leaves, tampering, concurrency, offline verification, no secrets.
//! - `lifecycle`: the whole loop: request, approve, open, expire, close.
//! - `validation`: bad input gets a clear 4xx and changes nothing.
//! - `security`: authentication, self-approval, forged Spin headers, the sweep secret.
//! - `identity`: OIDC bearer tokens, real signed ones, good and bad.
//! - `sign_in`: decision links signed in at the identity provider (authorization code + PKCE).
//! - `faults`: ARM failures are retried, never lost.
//! - `drift`: the reconciler (ownerless rules, missing rules, baselines, exposure) and the
//!   health check.
//! - `round_trips`: the store operations and ARM calls of the hot paths, held to ceilings.
//! - `races`: interleavings with ARM slowed down (revoke vs open, expiry vs extend, two sweeps).
//! - `workflow`: auto-approval rules, timeouts, revoke, extend, break-glass, quotas, dry runs.
//! - `stores`: the outbound-Redis store against a real redis-server, and Spin's redis
//!   key-value backend refused.
//! - `fleet`: policies over many VMs (a list, a resource group, a tag), one rule per NSG,
//!   requests for several VMs, failing closed.
//! - `azure`: parity with Azure's JIT: VM resolution, baseline deny rules, rules it does not
//!   own, identities, and the ARM cost of a grant.

mod abuse;
mod audit;
mod azure;
mod contract;
mod corpus;
mod drift;
mod faults;
mod fleet;
mod identity;
mod integrations;
mod lifecycle;
mod openapi;
mod races;
mod round_trips;
mod security;
mod sign_in;
mod slack;
mod stores;
mod support;
mod validation;
mod webhooks;
mod workflow;
