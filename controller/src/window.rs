//! Maintenance windows: when a rollout may start new devices.
//!
//! A window is a daily span of local time in an IANA time zone, e.g.
//! `{"start": "01:00", "end": "04:00", "tz": "Europe/Paris"}`; it may cross
//! midnight (`22:00`–`02:00`). Local times are turned into instants day by
//! day with jiff's compatible disambiguation, so a window follows the
//! city's clocks across DST changes: a start that does not exist that day
//! (in the spring gap) opens when the clocks jump past it, and a start that
//! happens twice (in the autumn fold) opens at the first one.
//!
//! Pure: time is an argument (milliseconds since the Unix epoch, the
//! controller's [`Millis`]); only the time zone database is read (by jiff,
//! from the system's `/usr/share/zoneinfo`).

use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::model::Millis;
use crate::reconcile::fnv1a;

/// A daily maintenance window in a time zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Local time it opens, `HH:MM` or `HH:MM:SS`.
    pub start: String,
    /// Local time it closes (excluded); earlier than `start` crosses midnight.
    pub end: String,
    /// IANA time zone name, e.g. `Europe/Paris` or `UTC`.
    pub tz: String,
}

/// A window's fields, parsed.
struct Parsed {
    start: Time,
    end: Time,
    tz: TimeZone,
}

/// One day's opening, as instants: `[open, close)`.
type Span = (i64, i64);

impl Window {
    /// Why the window cannot be used, if it cannot.
    pub fn validate(&self) -> Result<(), String> {
        self.parse().map(|_| ())
    }

    /// Whether a rollout may start devices at `now_ms`. A window that does
    /// not validate never opens: a typo must hold a rollout back, not let
    /// it run at any hour.
    pub fn is_open(&self, now_ms: Millis) -> bool {
        self.open_span(now_ms).is_some()
    }

    /// When the opening `now_ms` is in began, if the window is open: a
    /// rollout spreads its start times from there, not from when its wave
    /// began (hours before, perhaps, which would start everyone at once).
    pub fn opened_at(&self, now_ms: Millis) -> Option<Millis> {
        self.open_span(now_ms).and_then(|(open, _)| to_millis(open))
    }

    /// When the window closes, if it is open at `now_ms`.
    pub fn closes_at(&self, now_ms: Millis) -> Option<Millis> {
        self.open_span(now_ms).and_then(|(_, end)| to_millis(end))
    }

    /// `now_ms` if the window is open, otherwise when it next opens;
    /// `u64::MAX` (never) for a window that does not validate.
    pub fn next_open(&self, now_ms: Millis) -> Millis {
        if self.is_open(now_ms) {
            return now_ms;
        }
        let next = (|| {
            let p = self.parse().ok()?;
            let now = i64::try_from(now_ms).ok()?;
            p.spans_from(now)?
                .into_iter()
                .map(|(open, _)| open)
                .find(|open| *open > now)
        })();
        next.and_then(to_millis).unwrap_or(u64::MAX)
    }

    /// `01:00–04:00 Europe/Paris`.
    pub fn describe(&self) -> String {
        format!("{}–{} {}", self.start, self.end, self.tz)
    }

    fn parse(&self) -> Result<Parsed, String> {
        let start = parse_time("start", &self.start)?;
        let end = parse_time("end", &self.end)?;
        if start == end {
            return Err(format!(
                "start and end are both {}: a window must have a length",
                self.start
            ));
        }
        let tz = TimeZone::get(&self.tz).map_err(|e| {
            format!(
                "unknown time zone {:?}: use an IANA name such as Europe/Paris or UTC ({e})",
                self.tz
            )
        })?;
        Ok(Parsed { start, end, tz })
    }

    fn open_span(&self, now_ms: Millis) -> Option<Span> {
        let p = self.parse().ok()?;
        let now = i64::try_from(now_ms).ok()?;
        p.spans_from(now)?
            .into_iter()
            .find(|(open, close)| *open <= now && now < *close)
    }
}

impl Parsed {
    /// The openings from the local day before `now` on, over a week, with
    /// overlapping or touching ones merged. A window is under a day long,
    /// so the day before is the earliest that can still be open; a week
    /// always holds a next opening (DST empties at most one day's).
    fn spans_from(&self, now: i64) -> Option<Vec<Span>> {
        let now = Timestamp::from_millisecond(now).ok()?;
        let mut day = self.tz.to_datetime(now).date().yesterday().ok()?;
        let mut merged: Vec<Span> = Vec::new();
        for _ in 0..8 {
            if let Some((open, close)) = self.span_on(day) {
                match merged.last_mut() {
                    // A spring gap can push one day's close past the next
                    // day's open: the window is then open throughout.
                    Some(last) if open <= last.1 => last.1 = last.1.max(close),
                    _ => merged.push((open, close)),
                }
            }
            day = day.tomorrow().ok()?;
        }
        Some(merged)
    }

    /// The opening that starts on local date `day`; `None` when DST leaves
    /// nothing of it (e.g. 02:15–03:00 on a spring-forward day in Paris,
    /// where both map to 03:00 or later with the close first).
    fn span_on(&self, day: Date) -> Option<Span> {
        let close_day = if self.end > self.start {
            day
        } else {
            day.tomorrow().ok()?
        };
        let instant = |date: Date, time: Time| {
            self.tz
                .to_ambiguous_timestamp(date.to_datetime(time))
                .compatible()
                .ok()
                .map(Timestamp::as_millisecond)
        };
        let open = instant(day, self.start)?;
        let close = instant(close_day, self.end)?;
        (open < close).then_some((open, close))
    }
}

fn to_millis(ms: i64) -> Option<Millis> {
    u64::try_from(ms).ok()
}

/// `HH:MM` or `HH:MM:SS`, two digits each, 00:00 to 23:59:59.
fn parse_time(field: &str, text: &str) -> Result<Time, String> {
    let bad = || {
        format!(
            "{field} {text:?} is not a time of day: use HH:MM or HH:MM:SS, from 00:00 to 23:59:59"
        )
    };
    let parts: Vec<&str> = text.split(':').collect();
    if !(2..=3).contains(&parts.len()) {
        return Err(bad());
    }
    let mut numbers = [0i8; 3];
    for (n, part) in numbers.iter_mut().zip(&parts) {
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        *n = part.parse().map_err(|_| bad())?;
    }
    let [h, m, s] = numbers;
    Time::new(h, m, s, 0).map_err(|_| bad())
}

/// A deterministic delay in `[0, spread_ms)` for `device_id`, so thousands
/// of devices told to start in the same window do not all start at its
/// first instant. Stable (FNV-1a and a fixed finaliser), so a restarted
/// or upgraded controller keeps each device's slot; `salt` (e.g. the
/// rollout's generation) reshuffles the order from one rollout to the next.
pub fn jitter_ms(device_id: &str, salt: u64, spread_ms: u64) -> u64 {
    if spread_ms == 0 {
        return 0;
    }
    let mut hash = fnv1a(salt.to_le_bytes().into_iter().chain(device_id.bytes()));
    // FNV's low bits barely change between ids that differ in their last
    // character (dev0001, dev0002): splitmix64's finaliser spreads them
    // before the modulo keeps only those low bits.
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^= hash >> 31;
    hash % spread_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start: &str, end: &str, tz: &str) -> Window {
        Window {
            start: start.into(),
            end: end.into(),
            tz: tz.into(),
        }
    }

    /// Milliseconds of an RFC 3339 instant, e.g. `2026-03-29T01:00:00Z`.
    fn ms(instant: &str) -> u64 {
        let ts: Timestamp = instant.parse().expect("instant");
        u64::try_from(ts.as_millisecond()).expect("after 1970")
    }

    #[test]
    fn open_and_closed_around_the_edges() {
        let paris = window("01:00", "04:00", "Europe/Paris");
        let late = window("22:00", "02:00", "Europe/Paris");
        let utc = window("09:30:15", "10:00", "UTC");
        // Paris is UTC+1 in January, UTC+2 in July. Each row: the window,
        // now, and either "open until CLOSE" or "closed until NEXT".
        #[rustfmt::skip] // one row a line reads as a table
        let table: &[(&Window, &str, &str)] = &[
            (&paris, "2026-01-15T23:59:59.999Z", "closed until 2026-01-16T00:00:00Z"),
            (&paris, "2026-01-16T00:00:00Z", "open until 2026-01-16T03:00:00Z"),
            (&paris, "2026-01-16T02:59:59.999Z", "open until 2026-01-16T03:00:00Z"),
            (&paris, "2026-01-16T03:00:00Z", "closed until 2026-01-17T00:00:00Z"),
            (&paris, "2026-07-15T23:00:00Z", "open until 2026-07-16T02:00:00Z"),
            (&paris, "2026-07-16T02:00:00Z", "closed until 2026-07-16T23:00:00Z"),
            // Crossing midnight: open late on one day and early on the next.
            (&late, "2026-01-15T20:59:59Z", "closed until 2026-01-15T21:00:00Z"),
            (&late, "2026-01-15T21:00:00Z", "open until 2026-01-16T01:00:00Z"),
            (&late, "2026-01-15T23:30:00Z", "open until 2026-01-16T01:00:00Z"),
            (&late, "2026-01-16T00:59:59Z", "open until 2026-01-16T01:00:00Z"),
            (&late, "2026-01-16T01:00:00Z", "closed until 2026-01-16T21:00:00Z"),
            (&utc, "2026-01-16T09:30:14.999Z", "closed until 2026-01-16T09:30:15Z"),
            (&utc, "2026-01-16T09:30:15Z", "open until 2026-01-16T10:00:00Z"),
            (&utc, "2026-01-16T10:00:00Z", "closed until 2026-01-17T09:30:15Z"),
        ];
        for (w, now, expect) in table {
            let now_ms = ms(now);
            let what = format!("{} at {now}", w.describe());
            if let Some(close) = expect.strip_prefix("open until ") {
                assert!(w.is_open(now_ms), "{what}: open");
                assert_eq!(w.closes_at(now_ms), Some(ms(close)), "{what}: closes");
                assert_eq!(w.next_open(now_ms), now_ms, "{what}: open now");
            } else {
                let next = expect.strip_prefix("closed until ").expect("row");
                assert!(!w.is_open(now_ms), "{what}: closed");
                assert_eq!(w.closes_at(now_ms), None, "{what}: closes");
                assert_eq!(w.next_open(now_ms), ms(next), "{what}: next open");
            }
        }
    }

    #[test]
    fn next_open_follows_the_local_clock_across_dst() {
        // Europe/Paris: 2026-03-29 02:00 CET jumps to 03:00 CEST (01:00Z);
        // 2026-10-25 03:00 CEST falls back to 02:00 CET (01:00Z).
        #[rustfmt::skip] // one row a line reads as a table
        let table: &[(&str, &str, &str, &str)] = &[
            // (start, end, now, next opening)
            ("01:00", "04:00", "2026-03-28T12:00:00Z", "2026-03-29T00:00:00Z"),
            // After the change the same local 01:00 is an hour earlier in UTC.
            ("01:00", "04:00", "2026-03-29T12:00:00Z", "2026-03-29T23:00:00Z"),
            // 02:30 does not exist on 2026-03-29: it opens after the jump,
            // at 03:30 CEST (compatible disambiguation).
            ("02:30", "05:00", "2026-03-28T12:00:00Z", "2026-03-29T01:30:00Z"),
            ("03:00", "05:00", "2026-03-28T12:00:00Z", "2026-03-29T01:00:00Z"),
            // 02:30 happens twice on 2026-10-25: the first one, in CEST.
            ("02:30", "05:00", "2026-10-24T12:00:00Z", "2026-10-25T00:30:00Z"),
            ("01:00", "04:00", "2026-10-24T12:00:00Z", "2026-10-24T23:00:00Z"),
            ("01:00", "04:00", "2026-10-25T12:00:00Z", "2026-10-26T00:00:00Z"),
            // Crossing midnight on the night of a change.
            ("22:00", "02:00", "2026-03-28T12:00:00Z", "2026-03-28T21:00:00Z"),
            ("22:00", "02:00", "2026-10-25T12:00:00Z", "2026-10-25T21:00:00Z"),
        ];
        for (start, end, now, next) in table {
            let w = window(start, end, "Europe/Paris");
            assert!(!w.is_open(ms(now)), "{} at {now}", w.describe());
            assert_eq!(
                w.next_open(ms(now)),
                ms(next),
                "{} from {now}",
                w.describe()
            );
            assert!(w.is_open(ms(next)), "{} at {next}", w.describe());
        }
        // Opening in the spring gap: 02:30 "is" 03:30 that day, and the
        // window still closes at the local 04:00 (02:00Z).
        let w = window("02:30", "04:00", "Europe/Paris");
        let opened = ms("2026-03-29T01:30:00Z");
        assert!(!w.is_open(opened - 1));
        assert_eq!(w.closes_at(opened), Some(ms("2026-03-29T02:00:00Z")));
        // 03:15–02:30 the night of the jump: the close (02:30, in the gap,
        // so 03:30 CEST) comes after the next day's 03:15 opening, so the
        // window stays open until the following night's close.
        let w = window("03:15", "02:30", "Europe/Paris");
        assert_eq!(
            w.closes_at(ms("2026-03-29T01:20:00Z")),
            Some(ms("2026-03-30T00:30:00Z"))
        );
        // Nothing of 02:15–03:00 is left that day: the next is the day after.
        let w = window("02:15", "03:00", "Europe/Paris");
        assert_eq!(
            w.next_open(ms("2026-03-28T12:00:00Z")),
            ms("2026-03-30T00:15:00Z")
        );
    }

    #[test]
    fn bad_windows_are_refused_and_never_open() {
        let table: &[(Window, &str)] = &[
            (
                window("01:00", "04:00", "Mars/Olympus_Mons"),
                "\"Mars/Olympus_Mons\"",
            ),
            (window("01:00", "01:00", "UTC"), "both 01:00"),
            (window("1:00", "04:00", "UTC"), "start \"1:00\""),
            (window("24:00", "04:00", "UTC"), "start \"24:00\""),
            (window("01:00", "04:60", "UTC"), "end \"04:60\""),
            (window("01:00", "04:00:00:00", "UTC"), "end \"04:00:00:00\""),
            (window("01:00", "", "UTC"), "end \"\""),
        ];
        for (w, says) in table {
            let err = w.validate().expect_err(says);
            assert!(err.contains(says), "{err:?} should name {says}");
            assert!(!w.is_open(ms("2026-01-16T02:00:00Z")), "{}", w.describe());
            assert_eq!(w.next_open(0), u64::MAX);
        }
        assert!(window("23:59:59", "00:00", "UTC").validate().is_ok());
        let json = r#"{"start":"01:00","end":"04:00","tz":"UTC","days":"mon"}"#;
        assert!(serde_json::from_str::<Window>(json).is_err());
    }

    #[test]
    fn describe_reads_like_the_document() {
        assert_eq!(
            window("01:00", "04:00", "Europe/Paris").describe(),
            "01:00–04:00 Europe/Paris"
        );
    }

    #[test]
    fn jitter_is_spread_within_bounds_and_stable() {
        let spread = 600_000;
        let mut slots = std::collections::BTreeSet::new();
        for n in 0..1000 {
            let id = format!("dev{n:04}");
            let j = jitter_ms(&id, 7, spread);
            assert!(j < spread);
            assert_eq!(j, jitter_ms(&id, 7, spread), "stable for {id}");
            slots.insert(j / 60_000);
        }
        // 1,000 devices over ten minutes land in every minute.
        assert_eq!(slots.len(), 10);
        assert_ne!(
            jitter_ms("dev0001", 7, spread),
            jitter_ms("dev0001", 8, spread)
        );
        assert_eq!(jitter_ms("dev0001", 7, 0), 0);
        assert_eq!(jitter_ms("dev0001", 7, 1), 0);
        // Pinned (checked against an independent FNV-1a + splitmix64): a
        // controller upgrade must not move every device's slot.
        assert_eq!(
            jitter_ms("lamp0042", 1, u64::MAX),
            9_176_292_095_330_594_658
        );
    }
}
