//! The request state machine: every legal transition, and nothing else.
//!
//! ```text
//! pending -> approved -> active -> revoking -> expired | revoked
//! pending -> denied | cancelled | timed_out
//! approved -> failed                  (ARM refused the rule: nothing was opened)
//! approved -> revoking -> failed      (the rule could not be confirmed: make sure it is gone)
//! ```

use serde::{Deserialize, Serialize};

/// Where a request is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Waiting for approvals.
    Pending,
    /// Approved; the allow rule is being put on the NSG.
    Approved,
    /// The allow rule is in place until `ends_at`.
    Active,
    /// The allow rule is being removed; retried every sweep until it is gone.
    Revoking {
        /// The final state once the rule is gone.
        closing: CloseReason,
    },
    /// Ran to its end; the rule is gone.
    Expired,
    /// Ended early by someone; the rule is gone.
    Revoked,
    /// An approver refused it.
    Denied,
    /// The requester withdrew it before a decision.
    Cancelled,
    /// No decision came in time.
    TimedOut,
    /// The rule could not be applied; nothing is left open.
    Failed,
}

/// Why a rule is being removed, which decides the final state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// `ends_at` passed.
    Expired,
    /// Someone ended it early.
    Revoked,
    /// Opening never completed.
    Failed,
}

/// Something that happens to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Approved (automatically, or the last required approval arrived).
    Approve,
    /// An approver refused.
    Deny,
    /// The requester withdrew.
    Cancel,
    /// The pending timeout passed.
    TimeOut,
    /// ARM confirmed the allow rule.
    RuleOpened,
    /// ARM refused the rule outright, so nothing exists on the NSG.
    OpenRefused,
    /// Opening kept failing in ways that may have left a rule behind.
    OpenAbandoned,
    /// `ends_at` passed.
    Due,
    /// Someone ends it early.
    Revoke,
    /// ARM confirmed the rule is gone.
    RuleClosed,
}

impl Event {
    /// Every event, for the tests and fuzz targets that drive the state machine.
    pub const ALL: [Event; 10] = [
        Event::Approve,
        Event::Deny,
        Event::Cancel,
        Event::TimeOut,
        Event::RuleOpened,
        Event::OpenRefused,
        Event::OpenAbandoned,
        Event::Due,
        Event::Revoke,
        Event::RuleClosed,
    ];
}

/// Drives a request from `Pending` through `events` (those that do not apply are refused and
/// change nothing) and checks the machine's promises: a final state never moves, a rule is
/// opened and closed at most once, and a request that opened a rule ends only after it was
/// closed. Answers the state reached, or the promise broken.
pub fn check_sequence(events: impl IntoIterator<Item = Event>) -> Result<State, String> {
    let mut state = State::Pending;
    let (mut opened, mut closed) = (0, 0);
    for event in events {
        let before = state;
        match state.apply(event) {
            Ok(next) if before.is_final() => return Err(format!("{before:?} moved on {event:?} to {next:?}")),
            Ok(next) => {
                opened += usize::from(event == Event::RuleOpened);
                closed += usize::from(event == Event::RuleClosed);
                state = next;
            }
            Err(_) => {}
        }
    }
    if opened > 1 || closed > 1 {
        return Err(format!("opened {opened} and closed {closed} times"));
    }
    if opened == 1 && state.is_final() && closed != 1 {
        return Err(format!("ended {state:?} without its rule closed"));
    }
    Ok(state)
}

/// An event that does not apply in the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {event:?} a request that is {}", state.name())]
pub struct TransitionError {
    /// The state the request was in.
    pub state: State,
    /// The event refused.
    pub event: Event,
}

impl State {
    /// The state's name as the API shows it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Active => "active",
            Self::Revoking { .. } => "revoking",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::Denied => "denied",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
            Self::Failed => "failed",
        }
    }

    /// Whether nothing more can happen to the request.
    pub fn is_final(self) -> bool {
        match self {
            Self::Expired | Self::Revoked | Self::Denied | Self::Cancelled | Self::TimedOut | Self::Failed => true,
            Self::Pending | Self::Approved | Self::Active | Self::Revoking { .. } => false,
        }
    }

    /// Whether the sweep has ARM work to finish for it (open or close a rule).
    pub fn needs_arm_work(self) -> bool {
        match self {
            Self::Approved | Self::Revoking { .. } => true,
            Self::Pending
            | Self::Active
            | Self::Expired
            | Self::Revoked
            | Self::Denied
            | Self::Cancelled
            | Self::TimedOut
            | Self::Failed => false,
        }
    }

    /// The state after `event`, or why it does not apply.
    pub fn apply(self, event: Event) -> Result<State, TransitionError> {
        use {CloseReason as R, Event as E, State as S};
        let next = match (self, event) {
            (S::Pending, E::Approve) => S::Approved,
            (S::Pending, E::Deny) => S::Denied,
            (S::Pending, E::Cancel) => S::Cancelled,
            (S::Pending, E::TimeOut) => S::TimedOut,
            (S::Approved, E::RuleOpened) => S::Active,
            (S::Approved, E::OpenRefused) => S::Failed,
            (S::Approved, E::OpenAbandoned) => S::Revoking { closing: R::Failed },
            (S::Approved, E::Revoke) => S::Revoking { closing: R::Revoked },
            (S::Active, E::Due) => S::Revoking { closing: R::Expired },
            (S::Active, E::Revoke) => S::Revoking { closing: R::Revoked },
            (S::Revoking { closing }, E::RuleClosed) => match closing {
                R::Expired => S::Expired,
                R::Revoked => S::Revoked,
                R::Failed => S::Failed,
            },
            (
                S::Pending
                | S::Approved
                | S::Active
                | S::Revoking { .. }
                | S::Expired
                | S::Revoked
                | S::Denied
                | S::Cancelled
                | S::TimedOut
                | S::Failed,
                E::Approve
                | E::Deny
                | E::Cancel
                | E::TimeOut
                | E::RuleOpened
                | E::OpenRefused
                | E::OpenAbandoned
                | E::Due
                | E::Revoke
                | E::RuleClosed,
            ) => return Err(TransitionError { state: self, event }),
        };
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use {CloseReason as R, Event as E, State as S};

    const ALL_STATES: [State; 12] = [
        S::Pending,
        S::Approved,
        S::Active,
        S::Revoking { closing: R::Expired },
        S::Revoking { closing: R::Revoked },
        S::Revoking { closing: R::Failed },
        S::Expired,
        S::Revoked,
        S::Denied,
        S::Cancelled,
        S::TimedOut,
        S::Failed,
    ];
    const ALL_EVENTS: [Event; 10] = [
        E::Approve,
        E::Deny,
        E::Cancel,
        E::TimeOut,
        E::RuleOpened,
        E::OpenRefused,
        E::OpenAbandoned,
        E::Due,
        E::Revoke,
        E::RuleClosed,
    ];

    /// Every legal transition; anything absent from this table must be refused.
    const LEGAL: [(State, Event, State); 13] = [
        (S::Pending, E::Approve, S::Approved),
        (S::Pending, E::Deny, S::Denied),
        (S::Pending, E::Cancel, S::Cancelled),
        (S::Pending, E::TimeOut, S::TimedOut),
        (S::Approved, E::RuleOpened, S::Active),
        (S::Approved, E::OpenRefused, S::Failed),
        (S::Approved, E::OpenAbandoned, S::Revoking { closing: R::Failed }),
        (S::Approved, E::Revoke, S::Revoking { closing: R::Revoked }),
        (S::Active, E::Due, S::Revoking { closing: R::Expired }),
        (S::Active, E::Revoke, S::Revoking { closing: R::Revoked }),
        (S::Revoking { closing: R::Expired }, E::RuleClosed, S::Expired),
        (S::Revoking { closing: R::Revoked }, E::RuleClosed, S::Revoked),
        (S::Revoking { closing: R::Failed }, E::RuleClosed, S::Failed),
    ];

    #[test]
    fn every_state_event_pair_matches_the_table() {
        for state in ALL_STATES {
            for event in ALL_EVENTS {
                let expected = LEGAL.iter().find(|(s, e, _)| *s == state && *e == event).map(|(_, _, next)| *next);
                match expected {
                    Some(next) => assert_eq!(state.apply(event), Ok(next), "{state:?} + {event:?}"),
                    None => {
                        assert_eq!(state.apply(event), Err(TransitionError { state, event }), "{state:?} + {event:?}")
                    }
                }
            }
        }
    }

    #[test]
    fn final_states_accept_nothing() {
        for state in ALL_STATES.into_iter().filter(|s| s.is_final()) {
            assert!(ALL_EVENTS.iter().all(|e| state.apply(*e).is_err()), "{state:?}");
        }
    }

    #[test]
    fn revoking_serialises_with_its_reason_beside_the_state() {
        let json = serde_json::to_value(S::Revoking { closing: R::Expired }).unwrap();
        assert_eq!(json, serde_json::json!({"state": "revoking", "closing": "expired"}));
        assert_eq!(serde_json::to_value(S::TimedOut).unwrap(), serde_json::json!({"state": "timed_out"}));
    }
}
