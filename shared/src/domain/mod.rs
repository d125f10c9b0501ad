//! Domain types and rules: no I/O, no clock, no randomness; time and ids are passed in.

pub mod decide;
pub mod duration;
pub mod ids;
pub mod net;
pub mod policy;
pub mod ports;
pub mod request;
pub mod state;

pub use duration::AccessDuration;
pub use ids::{GroupName, Member, PolicyName, Principal, RequestId, WebhookName};
pub use net::{AllowedSource, SourcePrefix};
pub use policy::{Approval, FirewallId, NsgId, Policy, PortRule, ProtectedVm, RawPolicy, VmId};
pub use ports::{Port, PortSet, Protocol};
pub use request::{AccessRequest, RawRequest, RequestError};
pub use state::{CloseReason, Event, State, TransitionError};

/// Control, zero-width and bidirectional-override characters: they can make a text display
/// as another one (a name, or a justification an approver reads).
pub fn is_invisible(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}' | '\u{00AD}')
}
