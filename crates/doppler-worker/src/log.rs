//! The worker's log: one JSON object per line on stdout, for a log collector (k8s, journald).
//! Fields keep the order they were added in (`ts`, `level`, `event` first), so a person reading
//! the raw stream sees the same shape on every line. A log line never stops the worker: a closed
//! stdout is ignored.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// How serious a line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Info,
    Warning,
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

/// One log line being built: `log::info("batch").field("rows", 32).emit()`.
#[must_use = "a line is written by emit()"]
pub struct Line {
    fields: Vec<(&'static str, Value)>,
}

pub fn info(event: &str) -> Line {
    Line::new(Level::Info, event)
}

pub fn warning(event: &str) -> Line {
    Line::new(Level::Warning, event)
}

pub fn error(event: &str) -> Line {
    Line::new(Level::Error, event)
}

impl Line {
    fn new(level: Level, event: &str) -> Line {
        Line {
            fields: vec![
                ("ts", Value::from(rfc3339(SystemTime::now()))),
                ("level", Value::from(level.as_str())),
                ("event", Value::from(event)),
            ],
        }
    }

    pub fn field(mut self, key: &'static str, value: impl Into<Value>) -> Line {
        self.fields.push((key, value.into()));
        self
    }

    /// A duration in seconds, rounded to the millisecond.
    pub fn seconds(self, key: &'static str, d: std::time::Duration) -> Line {
        self.field(key, round3(d.as_secs_f64()))
    }

    /// The line as JSON text (no newline).
    pub fn render(&self) -> String {
        let mut out = String::from("{");
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&Value::from(*k).to_string());
            out.push(':');
            out.push_str(&v.to_string());
        }
        out.push('}');
        out
    }

    pub fn emit(self) {
        let mut line = self.render();
        line.push('\n');
        let mut out = std::io::stdout().lock();
        // (a closed stdout must not stop the worker)
        let _ = out.write_all(line.as_bytes()).and_then(|_| out.flush());
    }
}

/// `x` rounded to three decimals (NaN and infinities as 0: JSON has no such numbers).
pub fn round3(x: f64) -> f64 {
    if x.is_finite() {
        (x * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

/// `t` as RFC 3339 in UTC with milliseconds, e.g. `2026-05-01T12:34:56.789Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_123); // 2000-02-29
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_777_638_896);
        assert_eq!(rfc3339(t), "2026-05-01T12:34:56.000Z");
    }

    #[test]
    fn lines_keep_their_order_and_escape() {
        let line = error("batch_failed")
            .field("error", "a \"quoted\"\nline")
            .field("sqlstate", Value::Null)
            .seconds("seconds", Duration::from_micros(1_234_567));
        let s = line.render();
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["event"], "batch_failed");
        assert_eq!(v["error"], "a \"quoted\"\nline");
        assert_eq!(v["seconds"], 1.235);
        assert!(s.starts_with("{\"ts\":"));
        assert!(s.find("\"level\"").unwrap() < s.find("\"event\"").unwrap());
        assert!(!s.contains('\n'));
    }

    #[test]
    fn non_finite_numbers_are_zero() {
        assert_eq!(round3(f64::NAN), 0.0);
        assert_eq!(round3(f64::INFINITY), 0.0);
    }
}
