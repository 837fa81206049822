//! Durations and sizes as people write them in the file: "58s", "500ms", "64KiB", "10m".

use std::time::Duration;

use super::Problem;

/// Longest duration the file may give.
///
/// Other modules compute deadlines as `Instant + duration`, which panics on overflow; a year is
/// far beyond any useful timeout and far below that overflow.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Parses a humantime duration ("58s", "500ms", "1m", "1h 30m").
///
/// `zero_hint` is `None` when zero is a meaningful value for this key; otherwise zero is
/// rejected and the hint (what to write instead, or "") ends the message.
pub(crate) fn parse_duration(
    text: &str,
    zero_hint: Option<&'static str>,
) -> Result<Duration, Problem> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|_| Problem::InvalidDuration(text.to_owned()))?;
    if duration.is_zero()
        && let Some(hint) = zero_hint
    {
        return Err(Problem::ZeroDuration { hint });
    }
    if duration > MAX_DURATION {
        return Err(Problem::DurationTooLong(text.to_owned()));
    }
    Ok(duration)
}

/// Formats a duration so that [`parse_duration`] reads back exactly the same value.
pub(crate) fn format_duration(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Parses a size: digits, then an optional unit.
///
/// Every unit is a power of 1024, whatever its spelling (k, K, KB, KiB; m, MB, MiB; g, GB, GiB;
/// case-insensitive), because nginx reads `10m` as 10 MiB and people copy values from nginx
/// configs; one meaning per letter avoids a config that is 5 % off depending on spelling.
pub(crate) fn parse_size(text: &str) -> Result<u64, Problem> {
    let invalid = || Problem::InvalidSize(text.to_owned());
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(invalid());
    }
    let multiplier = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        _ => return Err(invalid()),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| Problem::SizeTooLarge(text.to_owned()))
}

/// Formats a size in the largest unit that divides it exactly, so the round trip is exact.
pub(crate) fn format_size(bytes: u64) -> String {
    match bytes {
        0 => "0".to_owned(),
        b if b % GIB == 0 => format!("{}GiB", b / GIB),
        b if b % MIB == 0 => format!("{}MiB", b / MIB),
        b if b % KIB == 0 => format!("{}KiB", b / KIB),
        b => b.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_units_are_all_1024_based_and_case_insensitive() {
        for (text, bytes) in [
            ("0", 0),
            ("512", 512),
            ("512b", 512),
            ("64k", 64 * 1024),
            ("64K", 64 * 1024),
            ("64KB", 64 * 1024),
            ("64KiB", 64 * 1024),
            ("64 KiB", 64 * 1024),
            ("1MiB", 1 << 20),
            ("10MB", 10 << 20),
            ("10m", 10 << 20),
            ("1GiB", 1 << 30),
            ("2g", 2 << 30),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn size_without_digits_or_with_unknown_unit_is_rejected() {
        for text in ["", "KiB", "1.5MiB", "10XB", "-1", "1TiB", "1 0"] {
            assert_eq!(
                parse_size(text),
                Err(Problem::InvalidSize(text.to_owned())),
                "{text}"
            );
        }
    }

    #[test]
    fn size_that_overflows_u64_is_rejected() {
        assert_eq!(
            parse_size("99999999999999GiB"),
            Err(Problem::SizeTooLarge("99999999999999GiB".to_owned()))
        );
    }

    #[test]
    fn size_formats_in_the_largest_exact_unit_and_reads_back() {
        for bytes in [0, 1, 1000, 8192, 32 * 1024, 1 << 20, 3 << 30, (1 << 30) + 1] {
            assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
        }
        assert_eq!(format_size(32 * 1024), "32KiB");
        assert_eq!(format_size(1000), "1000");
    }

    #[test]
    fn duration_zero_is_rejected_only_where_a_hint_is_given() {
        assert_eq!(parse_duration("0s", None), Ok(Duration::ZERO));
        assert_eq!(
            parse_duration("0s", Some("")),
            Err(Problem::ZeroDuration { hint: "" })
        );
    }

    #[test]
    fn duration_longer_than_a_year_is_rejected() {
        assert!(parse_duration("365days", None).is_ok());
        assert_eq!(
            parse_duration("400days", None),
            Err(Problem::DurationTooLong("400days".to_owned()))
        );
    }

    #[test]
    fn duration_round_trips_through_format() {
        for d in [
            Duration::from_millis(500),
            Duration::from_secs(620),
            Duration::from_secs(3600),
            Duration::from_millis(1_234_567),
        ] {
            assert_eq!(parse_duration(&format_duration(d), None), Ok(d));
        }
    }
}
