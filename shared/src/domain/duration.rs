//! ISO 8601 durations (`PT1H`, `PT30M`, `P1D`), as used for access lengths and policy limits.

use std::fmt;

use chrono::TimeDelta;
use serde::{Deserialize, Serialize};

/// A positive duration, whole seconds, written and read as ISO 8601 (`PT1H30M`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AccessDuration(u32);

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration '{input}': {reason} (use ISO 8601, e.g. PT30M, PT1H, PT1H30M, P1D)")]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

/// The longest duration anything may be: 7 days, far above any sensible access window.
const CEILING_SECS: u64 = 7 * 24 * 3600;

impl AccessDuration {
    /// Parses `P[nD][T[nH][nM][nS]]`; years, months and weeks are refused as ambiguous.
    pub fn parse(input: &str) -> Result<Self, DurationError> {
        let err = |reason| DurationError { input: input.to_owned(), reason };
        let rest = input.strip_prefix('P').ok_or_else(|| err("must start with 'P'"))?;
        let (date, time) = match rest.split_once('T') {
            Some((_, "")) => return Err(err("nothing after 'T'")),
            Some((date, time)) => (date, time),
            None => (rest, ""),
        };
        if date.is_empty() && time.is_empty() {
            return Err(err("no amount given"));
        }
        let mut total: u64 = 0;
        for (part, units) in [(date, &[('D', 86_400)][..]), (time, &[('H', 3600), ('M', 60), ('S', 1)][..])] {
            let mut digits = String::new();
            let mut next_unit = 0;
            for c in part.chars() {
                if c.is_ascii_digit() {
                    digits.push(c);
                    continue;
                }
                let position = units[next_unit..]
                    .iter()
                    .position(|(unit, _)| *unit == c)
                    .ok_or_else(|| err("unknown or out-of-order unit"))?;
                if digits.is_empty() {
                    return Err(err("a unit without a number"));
                }
                let amount: u64 = digits.parse().map_err(|_| err("number too large"))?;
                total = total.saturating_add(amount.saturating_mul(units[next_unit + position].1));
                next_unit += position + 1;
                digits.clear();
            }
            if !digits.is_empty() {
                return Err(err("a number without a unit"));
            }
        }
        if total == 0 {
            return Err(err("must be longer than zero"));
        }
        if total > CEILING_SECS {
            return Err(err("longer than 7 days"));
        }
        Ok(Self(total as u32))
    }

    /// A duration of whole minutes (for configuration and tests).
    pub fn minutes(minutes: u32) -> Self {
        Self(minutes.saturating_mul(60).max(1))
    }

    /// Length in seconds.
    pub fn as_secs(self) -> u32 {
        self.0
    }

    /// As a chrono delta, for arithmetic on timestamps.
    pub fn as_delta(self) -> TimeDelta {
        TimeDelta::seconds(i64::from(self.0))
    }
}

impl fmt::Display for AccessDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hours rather than days: people write PT24H, and PT36H reads better than P1DT12H.
        let (hours, minutes, seconds) = (self.0 / 3600, self.0 % 3600 / 60, self.0 % 60);
        f.write_str("PT")?;
        for (amount, unit) in [(hours, 'H'), (minutes, 'M'), (seconds, 'S')] {
            if amount > 0 {
                write!(f, "{amount}{unit}")?;
            }
        }
        Ok(())
    }
}

impl TryFrom<String> for AccessDuration {
    type Error = DurationError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<AccessDuration> for String {
    fn from(value: AccessDuration) -> Self {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_forms_parse_to_seconds() {
        for (text, secs) in [
            ("PT1M", 60),
            ("PT30M", 1800),
            ("PT1H", 3600),
            ("PT1H30M", 5400),
            ("PT90S", 90),
            ("P1D", 86_400),
            ("P1DT1H", 90_000),
            ("PT24H", 86_400),
        ] {
            assert_eq!(AccessDuration::parse(text).unwrap().as_secs(), secs, "{text}");
        }
    }

    #[test]
    fn display_round_trips() {
        for text in ["PT1M", "PT1H30M", "PT24H", "PT25H", "PT45S"] {
            assert_eq!(AccessDuration::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(AccessDuration::parse("PT60M").unwrap().to_string(), "PT1H");
        assert_eq!(AccessDuration::parse("P1DT1H").unwrap().to_string(), "PT25H");
    }

    #[test]
    fn malformed_durations_are_refused_with_the_input_named() {
        for text in [
            "",
            "P",
            "PT",
            "1H",
            "PT1",
            "PTH",
            "PT1M1H",
            "P1Y",
            "P1W",
            "PT0M",
            "pt1h",
            "PT-1H",
            "P8D",
            "PT1H ",
            "PT99999999999999999999H",
        ] {
            let err = AccessDuration::parse(text).unwrap_err();
            assert!(err.to_string().contains(&format!("'{text}'")), "{err}");
        }
    }
}
