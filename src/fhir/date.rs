//! FHIR date, dateTime and instant values as UTC millisecond ranges, and
//! the date search prefixes (FHIR R4 §3.1.1.5.7, "date" search parameters).
//!
//! Every date-ish value denotes a *range*: `2025` is the whole year,
//! `2025-09` the whole month, `2025-09-14T10:00:00+02:00` one second. A
//! [`DateRange`] holds its inclusive bounds in Unix milliseconds, UTC.
//! Values without a time zone are taken as UTC (the appliance's zone for
//! search, per the spec's "server's time zone" rule). Invariant:
//! `low <= high` for every range this module builds.

use std::fmt;

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// An inclusive range of instants, in Unix milliseconds UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    /// First millisecond in the range.
    pub low: i64,
    /// Last millisecond in the range.
    pub high: i64,
}

/// A date search prefix. `sa`, `eb` and `ap` are not supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    /// `eq` (default): the value's range lies within the search range.
    Eq,
    /// `ne`: not `eq`.
    Ne,
    /// `gt`: the value's range reaches past the search range's end.
    Gt,
    /// `lt`: the value's range starts before the search range.
    Lt,
    /// `ge`: `gt` or overlapping.
    Ge,
    /// `le`: `lt` or overlapping.
    Le,
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Prefix::Eq => "eq",
            Prefix::Ne => "ne",
            Prefix::Gt => "gt",
            Prefix::Lt => "lt",
            Prefix::Ge => "ge",
            Prefix::Le => "le",
        })
    }
}

impl Prefix {
    /// True if a resource range `r` matches search range `s` under `self`.
    pub fn matches(self, s: DateRange, r: DateRange) -> bool {
        match self {
            Prefix::Eq => r.low >= s.low && r.high <= s.high,
            Prefix::Ne => !(r.low >= s.low && r.high <= s.high),
            Prefix::Gt => r.high > s.high,
            Prefix::Lt => r.low < s.low,
            Prefix::Ge => r.high >= s.low,
            Prefix::Le => r.low <= s.high,
        }
    }
}

/// Splits a search value like `ge2025-09` into prefix and range.
pub fn parse_search_value(v: &str) -> Result<(Prefix, DateRange), String> {
    let (prefix, rest) = match v.get(..2) {
        Some("eq") => (Prefix::Eq, &v[2..]),
        Some("ne") => (Prefix::Ne, &v[2..]),
        Some("gt") => (Prefix::Gt, &v[2..]),
        Some("lt") => (Prefix::Lt, &v[2..]),
        Some("ge") => (Prefix::Ge, &v[2..]),
        Some("le") => (Prefix::Le, &v[2..]),
        Some(p @ ("sa" | "eb" | "ap")) => {
            return Err(format!(
                "date prefix {p:?} is not supported (eq ne gt lt ge le)"
            ));
        }
        Some(p) if p.chars().all(|c| c.is_ascii_alphabetic()) => {
            return Err(format!("unknown date prefix {p:?} (eq ne gt lt ge le)"));
        }
        _ => (Prefix::Eq, v),
    };
    Ok((prefix, parse(rest)?))
}

/// Parses a FHIR `date`, `dateTime` or `instant` into the range it denotes.
pub fn parse(s: &str) -> Result<DateRange, String> {
    let bad = |why: &str| format!("{s:?} is not a FHIR date/dateTime: {why}");
    let (date_part, time_part) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let mut it = date_part.split('-');
    let year: i32 = num(it.next(), 4).ok_or_else(|| bad("year must be 4 digits"))?;
    let month = it
        .next()
        .map(|m| num::<u8>(Some(m), 2).ok_or(()))
        .transpose();
    let day = it
        .next()
        .map(|d| num::<u8>(Some(d), 2).ok_or(()))
        .transpose();
    if it.next().is_some() {
        return Err(bad("too many '-' parts"));
    }
    let (Ok(month), Ok(day)) = (month, day) else {
        return Err(bad("month and day must be 2 digits"));
    };
    let month = month
        .map(|m| Month::try_from(m).map_err(|_| bad("month out of range")))
        .transpose()?;
    match (month, day, time_part) {
        (None, None, None) => {
            let start = ymd(year, Month::January, 1).ok_or_else(|| bad("year out of range"))?;
            let end = ymd(year + 1, Month::January, 1).ok_or_else(|| bad("year out of range"))?;
            Ok(range(start, end))
        }
        (Some(m), None, None) => {
            let start = ymd(year, m, 1).ok_or_else(|| bad("out of range"))?;
            let (ny, nm) = if m == Month::December {
                (year + 1, Month::January)
            } else {
                (year, m.next())
            };
            let end = ymd(ny, nm, 1).ok_or_else(|| bad("out of range"))?;
            Ok(range(start, end))
        }
        (Some(m), Some(d), None) => {
            let date = Date::from_calendar_date(year, m, d).map_err(|_| bad("no such day"))?;
            let start = date.midnight().assume_utc();
            Ok(range(start, start + time::Duration::DAY))
        }
        (Some(m), Some(d), Some(t)) => {
            let date = Date::from_calendar_date(year, m, d).map_err(|_| bad("no such day"))?;
            parse_time_of_day(date, t).map_err(|why| bad(&why))
        }
        _ => Err(bad("a time needs a full date")),
    }
}

fn parse_time_of_day(date: Date, t: &str) -> Result<DateRange, String> {
    // Split off the zone: Z, +hh:mm or -hh:mm (absent = UTC).
    let (clock, offset) = if let Some(c) = t.strip_suffix('Z') {
        (c, UtcOffset::UTC)
    } else if let Some(pos) = t.rfind(['+', '-']) {
        let (c, z) = t.split_at(pos);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let (h, m) = z[1..].split_once(':').ok_or("zone must be +hh:mm")?;
        let h: i8 = num(Some(h), 2).ok_or("zone hours must be 2 digits")?;
        let m: i8 = num(Some(m), 2).ok_or("zone minutes must be 2 digits")?;
        let off = UtcOffset::from_hms(sign * h, sign * m, 0).map_err(|_| "zone out of range")?;
        (c, off)
    } else {
        (t, UtcOffset::UTC)
    };
    let mut parts = clock.split(':');
    let h: u8 = num(parts.next(), 2).ok_or("hours must be 2 digits")?;
    let m: u8 = num(parts.next(), 2).ok_or("minutes must be 2 digits")?;
    let sec_part = parts.next();
    if parts.next().is_some() {
        return Err("too many ':' parts".into());
    }
    let (s, frac_digits, frac): (u8, u32, u32) = match sec_part {
        None => (0, 0, 0),
        Some(sp) => {
            let (whole, frac) = match sp.split_once('.') {
                Some((w, f)) => (w, Some(f)),
                None => (sp, None),
            };
            let s: u8 = num(Some(whole), 2).ok_or("seconds must be 2 digits")?;
            match frac {
                None => (s, 0, 0),
                Some(f)
                    if !f.is_empty() && f.len() <= 9 && f.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    let digits = f.len().min(3) as u32;
                    let ms: u32 = f[..digits as usize].parse().map_err(|_| "bad fraction")?;
                    (s, digits, ms)
                }
                Some(_) => return Err("fraction of a second must be 1 to 9 digits".into()),
            }
        }
    };
    // A leap second (":60") is clamped to the last millisecond of its minute.
    let (s, leap) = if s == 60 { (59, true) } else { (s, false) };
    let tod = Time::from_hms(h, m, s).map_err(|_| "time of day out of range")?;
    let start = PrimitiveDateTime::new(date, tod).assume_offset(offset);
    let start_ms = millis(start) + i64::from(scale(frac, frac_digits));
    let width: i64 = match (sec_part, frac_digits) {
        (None, _) => 60_000,
        (Some(_), 0) => 1_000,
        (Some(_), d) => 10_i64.pow(3 - d),
    };
    let low = if leap { millis(start) + 999 } else { start_ms };
    let high = if leap { low } else { start_ms + width - 1 };
    Ok(DateRange { low, high })
}

fn scale(frac: u32, digits: u32) -> u32 {
    match digits {
        1 => frac * 100,
        2 => frac * 10,
        _ => frac,
    }
}

fn num<T: std::str::FromStr>(s: Option<&str>, len: usize) -> Option<T> {
    let s = s?;
    (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

fn ymd(y: i32, m: Month, d: u8) -> Option<OffsetDateTime> {
    Date::from_calendar_date(y, m, d)
        .ok()
        .map(|d| d.midnight().assume_utc())
}

fn millis(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn range(start: OffsetDateTime, end_exclusive: OffsetDateTime) -> DateRange {
    DateRange {
        low: millis(start),
        high: millis(end_exclusive) - 1,
    }
}

/// Formats Unix milliseconds as an RFC 3339 UTC instant.
pub fn format_millis(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        millis(OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap())
    }

    #[test]
    fn precision_ranges() {
        let y = parse("2025").unwrap();
        assert_eq!(
            (y.low, y.high),
            (ms("2025-01-01T00:00:00Z"), ms("2026-01-01T00:00:00Z") - 1)
        );
        let m = parse("2025-09").unwrap();
        assert_eq!(
            (m.low, m.high),
            (ms("2025-09-01T00:00:00Z"), ms("2025-10-01T00:00:00Z") - 1)
        );
        let dec = parse("2025-12").unwrap();
        assert_eq!(dec.high, ms("2026-01-01T00:00:00Z") - 1);
        let feb = parse("2024-02").unwrap();
        assert_eq!(
            feb.high,
            ms("2024-03-01T00:00:00Z") - 1,
            "leap year February"
        );
        let d = parse("2025-09-14").unwrap();
        assert_eq!(
            (d.low, d.high),
            (ms("2025-09-14T00:00:00Z"), ms("2025-09-15T00:00:00Z") - 1)
        );
        let s = parse("2025-09-14T10:00:00Z").unwrap();
        assert_eq!(
            (s.low, s.high),
            (ms("2025-09-14T10:00:00Z"), ms("2025-09-14T10:00:00Z") + 999)
        );
        let minute = parse("2025-09-14T10:00Z").unwrap();
        assert_eq!(minute.high - minute.low, 59_999);
        let frac = parse("2025-09-14T10:00:00.25Z").unwrap();
        assert_eq!((frac.low - s.low, frac.high - s.low), (250, 259));
    }

    #[test]
    fn offsets_are_normalised_to_utc() {
        let a = parse("2025-09-14T12:00:00+02:00").unwrap();
        let b = parse("2025-09-14T10:00:00Z").unwrap();
        let c = parse("2025-09-14T05:30:00-04:30").unwrap();
        assert_eq!(a, b);
        assert_eq!(b, c);
        // Across a date line: still the same instant.
        assert_eq!(
            parse("2025-09-15T00:30:00+14:00").unwrap().low,
            ms("2025-09-14T10:30:00Z")
        );
    }

    #[test]
    fn rejects_malformed_values_with_the_reason() {
        for (v, why) in [
            ("25", "year must be 4 digits"),
            ("2025-9", "2 digits"),
            ("2025-13", "month out of range"),
            ("2025-02-30", "no such day"),
            ("2025-09-14T25:00:00Z", "time of day out of range"),
            ("2025-09T10:00", "a time needs a full date"),
            ("2025-09-14T10:00:00.Z", "fraction"),
            ("2025-09-14T10:00:00+2:00", "zone hours"),
        ] {
            let err = parse(v).unwrap_err();
            assert!(err.contains(why), "{v}: {err}");
        }
    }

    #[test]
    fn prefixes_follow_the_r4_range_rules() {
        let sept = parse("2025-09").unwrap();
        let inside = parse("2025-09-14T10:00:00Z").unwrap();
        let straddle = DateRange {
            low: sept.low - 1000,
            high: sept.low + 1000,
        };
        let after = parse("2025-10-01").unwrap();
        let before = parse("2025-08-31").unwrap();
        use Prefix::*;
        let cases = [
            (Eq, inside, true),
            (Eq, straddle, false),
            (Eq, after, false),
            (Ne, inside, false),
            (Ne, straddle, true),
            (Gt, after, true),
            (Gt, inside, false),
            (Gt, before, false),
            (Lt, before, true),
            (Lt, straddle, true),
            (Lt, inside, false),
            (Ge, inside, true),
            (Ge, after, true),
            (Ge, before, false),
            (Le, inside, true),
            (Le, before, true),
            (Le, after, false),
        ];
        for (p, r, want) in cases {
            assert_eq!(p.matches(sept, r), want, "{p} {r:?}");
        }
    }

    #[test]
    fn search_values_with_prefixes() {
        assert_eq!(parse_search_value("ge2025-09").unwrap().0, Prefix::Ge);
        assert_eq!(parse_search_value("2025-09").unwrap().0, Prefix::Eq);
        assert!(
            parse_search_value("sa2025")
                .unwrap_err()
                .contains("not supported")
        );
        assert!(
            parse_search_value("xx2025")
                .unwrap_err()
                .contains("unknown date prefix")
        );
    }
}
