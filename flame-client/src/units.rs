//! The size and time-limit formats that users type, one parser each for the whole client
//! side (flags, the client config, application files), with Slurm's meanings.
//!
//! Sizes: a number of bytes (`65536`), or a number and a unit (`512M`, `4G`, `1.5GiB`,
//! `100 KiB`). Every unit is binary, as in Slurm's `--mem=4G` (4 GiB): `K`, `KB` and `KiB`
//! all mean 1024 bytes, `M`/`MB`/`MiB` 1024², and so on to `P`; units are case-insensitive.
//! A decimal `GB` meaning 10⁹ is deliberately not offered: one spelling would then mean two
//! amounts depending on the tool.
//!
//! Time limits: Slurm's `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM` and `D-HH:MM:SS` (a
//! bare number is minutes, as in `srun --time 30`), or a duration with units such as `90s`,
//! `10m` or `1h 30m`.

use std::time::Duration;

/// A size or time limit that could not be read; the message names the text and what was
/// expected, for a person.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnitError(String);

/// Units of [`parse_size`], lower-case, each with its power of 1024.
const SIZE_UNITS: [(&[&str], u32); 6] = [
    (&["", "b"], 0),
    (&["k", "kb", "kib"], 1),
    (&["m", "mb", "mib"], 2),
    (&["g", "gb", "gib"], 3),
    (&["t", "tb", "tib"], 4),
    (&["p", "pb", "pib"], 5),
];

/// Reads a size in bytes; see the module documentation for the format.
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let bad = |why: &str| {
        UnitError(format!(
            "`{}` is not a size{why}: use a number of bytes, or a number and a unit such as \
             512M, 4G or 1.5GiB (units are binary: 1K = 1024 bytes)",
            shorten(text)
        ))
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    if number.is_empty() {
        return Err(bad(""));
    }
    let unit = unit.trim().to_ascii_lowercase();
    let Some(&(_, power)) = SIZE_UNITS
        .iter()
        .find(|(names, _)| names.contains(&unit.as_str()))
    else {
        return Err(bad(&format!(" (unknown unit `{}`)", shorten(&unit))));
    };
    let scale = 1024u64.pow(power);
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(scale).ok_or_else(|| bad(" (too large)"));
    }
    let value: f64 = number.parse().map_err(|_| bad(""))?;
    let bytes = (value * scale as f64).round();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad(" (too large)"));
    }
    Ok(bytes as u64)
}

/// Reads a time limit; see the module documentation for the formats. Zero is refused: no
/// job can run in no time, and Slurm's 0 ("no limit") is what leaving the flag out means.
pub fn parse_time_limit(text: &str) -> Result<Duration, UnitError> {
    let trimmed = text.trim();
    let slurm_like = !trimmed.is_empty()
        && trimmed
            .chars()
            .all(|c| c.is_ascii_digit() || c == ':' || c == '-');
    let parsed = if slurm_like {
        parse_slurm_time(trimmed)
    } else {
        humantime::parse_duration(trimmed).ok()
    };
    match parsed {
        Some(d) if d.is_zero() => Err(UnitError(format!(
            "`{}` is no time at all: leave the limit out for none",
            shorten(text)
        ))),
        Some(d) => Ok(d),
        None => Err(UnitError(format!(
            "`{}` is not a time limit: use minutes (30), MM:SS, HH:MM:SS, D-HH, D-HH:MM, \
             D-HH:MM:SS (as Slurm's --time), or units such as 90s, 10m or 1h30m",
            shorten(text)
        ))),
    }
}

/// Slurm's `[D-]HH[:MM[:SS]]` when a day is given, else `MM[:SS]` or `HH:MM:SS`.
fn parse_slurm_time(text: &str) -> Option<Duration> {
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || s.len() > 9 {
            return None;
        }
        s.parse().ok()
    };
    let (days, clock) = match text.split_once('-') {
        Some((d, rest)) => (Some(number(d)?), rest),
        None => (None, text),
    };
    let parts: Vec<u64> = clock.split(':').map(number).collect::<Option<_>>()?;
    let (h, m, s) = match (days.is_some(), parts.as_slice()) {
        (false, [m]) => (0, *m, 0),
        (false, [m, s]) => (0, *m, *s),
        (_, [h, m, s]) => (*h, *m, *s),
        (true, [h]) => (*h, 0, 0),
        (true, [h, m]) => (*h, *m, 0),
        _ => return None,
    };
    let secs = days
        .unwrap_or(0)
        .checked_mul(86_400)?
        .checked_add(h.checked_mul(3600)?)?
        .checked_add(m.checked_mul(60)?)?
        .checked_add(s)?;
    Some(Duration::from_secs(secs))
}

/// At most 80 characters of what the user typed, for a message.
fn shorten(text: &str) -> String {
    text.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const GIB: u64 = 1024 * 1024 * 1024;

    #[test]
    fn sizes_are_binary_like_slurm() {
        assert_eq!(parse_size("65536"), Ok(65_536));
        assert_eq!(parse_size("4G"), Ok(4 * GIB));
        assert_eq!(parse_size("4g"), Ok(4 * GIB));
        assert_eq!(parse_size("4GB"), Ok(4 * GIB));
        assert_eq!(parse_size("4GiB"), Ok(4 * GIB));
        assert_eq!(parse_size("100 KiB"), Ok(100 * KIB));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("512M"), Ok(512 * KIB * KIB));
        assert_eq!(parse_size("2T"), Ok(2 * GIB * KIB));
        assert_eq!(parse_size("7b"), Ok(7));
    }

    #[test]
    fn bad_sizes_say_what_a_size_is() {
        for bad in [
            "lots",
            "",
            "G",
            "4X",
            "4 gigs",
            "1.2.3G",
            "99999999999999999999P",
        ] {
            let e = parse_size(bad).expect_err(bad).to_string();
            assert!(
                e.contains("is not a size") && e.contains("4G"),
                "{bad}: {e}"
            );
            assert!(!e.contains("float"), "{bad}: {e}");
        }
        assert!(parse_size("4X")
            .unwrap_err()
            .to_string()
            .contains("unknown unit `x`"));
    }

    #[test]
    fn slurm_time_formats() {
        let secs = |s: u64| Ok(Duration::from_secs(s));
        assert_eq!(parse_time_limit("30"), secs(30 * 60));
        assert_eq!(parse_time_limit("30:15"), secs(30 * 60 + 15));
        assert_eq!(parse_time_limit("1:00:00"), secs(3600));
        assert_eq!(parse_time_limit("2-12"), secs(2 * 86_400 + 12 * 3600));
        assert_eq!(
            parse_time_limit("2-12:30"),
            secs(2 * 86_400 + 12 * 3600 + 30 * 60)
        );
        assert_eq!(parse_time_limit("1-00:00:05"), secs(86_400 + 5));
        assert_eq!(parse_time_limit("10m"), secs(600));
        assert_eq!(parse_time_limit("1h 30m"), secs(5400));
    }

    #[test]
    fn bad_time_limits_name_the_formats() {
        for bad in [
            "",
            "soon",
            "1:2:3:4",
            "-5",
            "1-",
            "1-2:3:4:5",
            ":",
            "99999999999:00",
        ] {
            let e = parse_time_limit(bad).expect_err(bad).to_string();
            assert!(e.contains("HH:MM:SS"), "{bad}: {e}");
        }
        assert!(parse_time_limit("0")
            .unwrap_err()
            .to_string()
            .contains("no time"));
    }
}
