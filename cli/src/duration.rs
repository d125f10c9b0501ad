//! Durations as people type them (`90m`, `1h30m`, `2h`, `1d`) and as the API takes them
//! (ISO 8601, `PT1H30M`; given as such, they pass through).

use shared::domain::AccessDuration;

/// `input` as the ISO 8601 duration the API takes.
pub fn to_iso(input: &str) -> Result<String, String> {
    let input = input.trim();
    let iso = if input.starts_with(['P', 'p']) { input.to_uppercase() } else { from_human(input)? };
    AccessDuration::parse(&iso).map(|d| d.to_string()).map_err(|e| format!("'{input}': {e}"))
}

fn from_human(input: &str) -> Result<String, String> {
    let bad = || format!("'{input}' is not a duration: write 90m, 1h30m, 2h, 1d or PT1H30M");
    let mut seconds: u64 = 0;
    let mut number = String::new();
    for c in input.chars() {
        match c {
            '0'..='9' => number.push(c),
            'd' | 'h' | 'm' | 's' if !number.is_empty() => {
                let amount: u64 = number.parse().map_err(|_| bad())?;
                let unit = match c {
                    'd' => 86_400,
                    'h' => 3_600,
                    'm' => 60,
                    _ => 1,
                };
                seconds = amount.checked_mul(unit).and_then(|s| seconds.checked_add(s)).ok_or_else(bad)?;
                number.clear();
            }
            _ => return Err(bad()),
        }
    }
    if !number.is_empty() || seconds == 0 {
        return Err(bad());
    }
    let (hours, minutes, secs) = (seconds / 3600, seconds % 3600 / 60, seconds % 60);
    let mut iso = "PT".to_owned();
    for (amount, unit) in [(hours, 'H'), (minutes, 'M'), (secs, 'S')] {
        if amount > 0 {
            iso.push_str(&format!("{amount}{unit}"));
        }
    }
    Ok(iso)
}

/// An ISO 8601 duration as people read it (`PT1H30M` -> `1h30m`).
pub fn human(iso: &str) -> String {
    iso.strip_prefix("PT").map_or_else(|| iso.to_owned(), str::to_lowercase)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn people_write_durations_the_api_reads_iso() {
        for (typed, iso) in
            [("90m", "PT1H30M"), ("1h30m", "PT1H30M"), ("2h", "PT2H"), ("1d", "PT24H"), ("PT45M", "PT45M")]
        {
            assert_eq!(to_iso(typed).as_deref(), Ok(iso), "{typed}");
        }
        for bad in ["", "h", "10", "1x", "-5m", "1h 30m", "0m"] {
            assert!(to_iso(bad).is_err(), "{bad}");
        }
        assert_eq!(human("PT1H30M"), "1h30m");
    }
}
