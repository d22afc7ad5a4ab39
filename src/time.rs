//! Time formatting without a calendar crate.
//!
//! Two formats cross the wire: ISO 8601 UTC (`2026-03-09T14:30:00Z`) for
//! timestamps, and OpenSSL's notAfter text (`Jun  7 16:28:00 2027 GMT`) for
//! certificate expiry. Both are produced and parsed here with the civil-date
//! algorithm (days from 1970-01-01), which is exact for the proleptic
//! Gregorian calendar.

use std::time::{SystemTime, UNIX_EPOCH};

const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Year, month (1-12), day of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Day count since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time.
pub fn iso_utc(t: i64) -> String {
    let (y, m, d) = civil_from_days(t.div_euclid(86_400));
    let s = t.rem_euclid(86_400);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// `YYYYMMDDHHMMSSZ` (ASN.1 GeneralizedTime) for a Unix time.
pub fn asn1_generalized(t: i64) -> String {
    let (y, m, d) = civil_from_days(t.div_euclid(86_400));
    let s = t.rem_euclid(86_400);
    format!("{y:04}{m:02}{d:02}{:02}{:02}{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// The current time as ISO 8601 UTC.
pub fn now_iso() -> String {
    iso_utc(unix_now())
}

/// Parse OpenSSL's notAfter text (`Feb 27 12:35:19 2029 GMT`) into Unix time.
pub fn parse_openssl_date(s: &str) -> Option<i64> {
    let mut it = s.split_whitespace();
    let mon = it.next()?;
    let day: u32 = it.next()?.parse().ok()?;
    let hms = it.next()?;
    let year: i64 = it.next()?.parse().ok()?;
    if it.next() != Some("GMT") {
        return None;
    }
    let m = MONTHS.iter().position(|x| *x == mon)? as u32 + 1;
    let mut p = hms.split(':').map(|v| v.parse::<i64>().ok());
    let (h, mi, sec) = (p.next()??, p.next()??, p.next()??);
    if !(1..=31).contains(&day) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    Some(days_from_civil(year, m, day) * 86_400 + h * 3600 + mi * 60 + sec)
}

/// Parse `YYYY-MM-DDTHH:MM:SSZ` (as [`iso_utc`] writes it) into Unix time.
pub fn parse_iso_utc(s: &str) -> Option<i64> {
    let s = s.trim().strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let (y, m, day) = (d.next()?.parse::<i64>().ok()?, d.next()?.parse::<u32>().ok()?, d.next()?.parse::<u32>().ok()?);
    let mut t = time.splitn(3, ':');
    let (h, mi, sec) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || !(0..24).contains(&h) || !(0..60).contains(&mi) {
        return None;
    }
    if !(0..=60).contains(&sec) {
        return None;
    }
    Some(days_from_civil(y, m, day) * 86_400 + h * 3600 + mi * 60 + sec)
}

/// Local wall-clock time as `Mmm dd hh:mm:ss` (the RFC 3164 timestamp).
pub fn syslog_stamp() -> String {
    let t = unix_now() as _;
    // SAFETY: localtime_r only writes into the tm we pass; a zeroed tm is valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return "Jan  1 00:00:00".into();
    }
    format!(
        "{} {:>2} {:02}:{:02}:{:02}",
        MONTHS[tm.tm_mon.clamp(0, 11) as usize],
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// Run `fut` for at most `d`; `None` if the time ran out first.
pub async fn timeout<T>(d: std::time::Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    smol::future::or(async { Some(fut.await) }, async {
        smol::Timer::after(d).await;
        None
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_round_trip() {
        for t in [0, 1_773_066_600, 1_798_202_433, 4_102_444_799] {
            assert_eq!(parse_iso_utc(&iso_utc(t)), Some(t));
        }
        assert_eq!(parse_iso_utc("2026-12-25T12:40:33Z"), Some(1_798_202_433));
        for bad in ["", "2026-12-25 12:40:33Z", "2026-13-01T00:00:00Z", "2026-12-25T12:40:33", "x"] {
            assert_eq!(parse_iso_utc(bad), None, "{bad}");
        }
    }

    #[test]
    fn iso_known_points() {
        assert_eq!(iso_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_utc(1_773_066_600), "2026-03-09T14:30:00Z");
        assert_eq!(iso_utc(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn asn1_times() {
        assert_eq!(asn1_generalized(1_773_066_600), "20260309143000Z");
        // beyond 2038: certificates signed on 32-bit routers must not wrap
        let t = openssl::asn1::Asn1Time::from_str_x509(&asn1_generalized(4_102_444_800)).unwrap();
        assert_eq!(t.to_string(), "Jan  1 00:00:00 2100 GMT");
    }

    #[test]
    fn openssl_date_round_trip() {
        let t = parse_openssl_date("Feb 27 12:35:19 2029 GMT").unwrap();
        assert_eq!(iso_utc(t), "2029-02-27T12:35:19Z");
        let t = parse_openssl_date("Jun  7 16:28:00 2028 GMT").unwrap();
        assert_eq!(iso_utc(t), "2028-06-07T16:28:00Z");
        assert!(parse_openssl_date("unknown").is_none());
        assert!(parse_openssl_date("Foo 7 16:28:00 2028 GMT").is_none());
    }

    proptest::proptest! {
        #[test]
        fn civil_round_trip(days in -1_000_000i64..1_000_000) {
            let (y, m, d) = civil_from_days(days);
            proptest::prop_assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
