//! The tamper-evident audit trail: the hash chain and its verification ([`chain`]), the stored
//! trail that every audited step appends to ([`log`]), and the export formats ([`export`]).

pub mod chain;
pub mod export;
pub mod log;

pub use chain::{AuditEvent, Break, Checkpoint, GENESIS, Outcome, Subject, Verification, Verifier, verify};
pub use log::Record;
