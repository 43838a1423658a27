//! Stored timestamps as RFC 3339 text, for [`Message::at_rfc3339`]. The
//! `clock` tool formats the current time with it too; it lives here rather
//! than with that tool so that the history does not depend on the tools.
//!
//! [`Message::at_rfc3339`]: super::Message::at_rfc3339

/// Formats milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub(crate) fn rfc3339_seconds(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's
/// `civil_from_days`), to avoid a date crate for one format.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use crate::history::{Message, Role};

    #[test]
    fn rfc3339_formatting() {
        let m = |at_ms| Message {
            role: Role::User,
            content: String::new(),
            at_ms,
            partial: false,
        };
        assert_eq!(m(0).at_rfc3339(), "1970-01-01T00:00:00Z");
        assert_eq!(m(1_795_420_800_999).at_rfc3339(), "2026-11-23T08:00:00Z");
        assert_eq!(m(951_782_400_000).at_rfc3339(), "2000-02-29T00:00:00Z");
        assert_eq!(m(-1).at_rfc3339(), "1969-12-31T23:59:59Z");
    }
}
