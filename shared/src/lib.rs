//! Shared core of portcullis: the domain rules, the ports to the outside world, and the
//! services the three Spin components call.
//!
//! - [`domain`]: pure types and rules (policies, requests, the state machine, decisions).
//! - [`auth`]: who the caller is (API keys) and where they connect from.
//! - [`store`] and [`keys`]: the key-value port and the one place the key layout lives.
//! - [`arm`]: the Azure Resource Manager client for NSG security rules, over the [`http`] port.
//! - [`service`]: the operations the components expose (policies, requests, decisions, sweep).
//! - [`api`]: the JSON error contract shared by every HTTP answer.
//! - [`audit`]: the audit trail's hash chain, verification and checkpoints.
//! - [`webhooks`]: subscriptions, their events, signing and delivery.
//! - `spin` (feature `spin`): adapters that implement the ports with spin-sdk.
#![deny(missing_docs)]

pub mod api;
pub mod arm;
pub mod audit;
pub mod auth;
pub mod config;
pub mod domain;
pub mod http;
pub mod keys;
pub mod seal;
pub mod service;
pub mod store;
pub mod webhooks;

#[cfg(feature = "spin")]
pub mod spin;

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod properties;
