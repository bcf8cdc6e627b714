//! Watching the data disk: how much room is left, how fast it is filling,
//! and a warning in the log while it is low.
//!
//! Nothing in the data directory is pruned (docs/operations.md, "Disk
//! growth"), so a busy box fills its disk; on a full disk device ingest
//! answers 503 and stores nothing. This is the warning before that:
//! - the daemon's `disk` thread reads the file system that holds the data
//!   directory every [`CHECK_EVERY`] and keeps the rate at which available
//!   space shrank since the previous reading;
//! - while available space is under `daemon.disk_warn_percent` of the file
//!   system, it logs a warning (journald) at the first reading under it and
//!   then every [`WARN_EVERY`], and one line when there is room again: at
//!   least [`RECOVER_MARGIN`] points above the threshold, so a disk that
//!   hovers at it does not log every minute;
//! - `/metrics` and `/status` read the figures at request time, so they
//!   are never stale, and add the last fill rate.
//!
//! Invariants: reading the figures writes nothing and takes no database
//! lock (file sizes come from `stat`); a failed reading is logged or
//! shown as an error and never stops the daemon.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::datadir::DataDir;

/// How often the `disk` thread reads the data disk.
pub const CHECK_EVERY: Duration = Duration::from_secs(60);
/// How often a warning is repeated while the disk stays low.
pub const WARN_EVERY: Duration = Duration::from_secs(600);
/// Percentage points above the threshold at which a low disk counts as
/// having room again.
pub const RECOVER_MARGIN: f64 = 1.0;

/// One reading of the data disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes the daemon's user may still write on the file system.
    pub available_bytes: u64,
    /// Size of the file system.
    pub size_bytes: u64,
    /// `fhir.db` with its WAL.
    pub fhir_db_bytes: u64,
    /// `audit.db` with its WAL.
    pub audit_db_bytes: u64,
}

impl Usage {
    /// Reads the file system holding `dir` and the sizes of its databases.
    /// A file system that reports a size of 0 is an error, not "all free".
    pub fn of(dir: &DataDir) -> Result<Usage> {
        let root = dir.root();
        let fs = rustix::fs::statvfs(root)
            .with_context(|| format!("cannot read the file system of {}", root.display()))?;
        let size_bytes = fs.f_blocks.saturating_mul(fs.f_frsize);
        if size_bytes == 0 {
            anyhow::bail!(
                "the file system of {} reports a size of 0 bytes",
                root.display()
            );
        }
        Ok(Usage {
            available_bytes: fs.f_bavail.saturating_mul(fs.f_frsize),
            size_bytes,
            fhir_db_bytes: with_wal(&dir.fhir_db())?,
            audit_db_bytes: with_wal(&dir.audit_db())?,
        })
    }

    /// Available space as a percentage of the file system.
    pub fn available_percent(&self) -> f64 {
        self.available_bytes as f64 * 100.0 / self.size_bytes.max(1) as f64
    }
}

/// A database file and its `-wal`, in bytes; a file that does not exist
/// (yet) counts 0, any other failure to read its size is an error.
fn with_wal(db: &std::path::Path) -> Result<u64> {
    let len = |p: &std::path::Path| match std::fs::metadata(p) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("cannot read the size of {}", p.display())),
    };
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    Ok(len(db)? + len(std::path::Path::new(&wal))?)
}

/// What the `disk` thread remembers between readings.
#[derive(Debug, Default)]
pub struct Watch {
    last: Option<(Instant, u64)>,
    /// Bytes per second by which available space shrank between the last
    /// two readings (negative: it grew).
    rate: Option<f64>,
    low: bool,
    warned: Option<Instant>,
}

/// What a reading calls for in the log.
#[derive(Debug, PartialEq)]
pub enum Say {
    /// Nothing new: the disk has room, or the last warning is recent.
    Nothing,
    /// A warning line: the disk is low.
    Warn(String),
    /// An info line: the disk was low and has room again (at least
    /// [`RECOVER_MARGIN`] points above the threshold).
    Recovered(String),
}

impl Watch {
    /// Takes a reading made at `now` and says what to log, given the
    /// warning threshold (percent of the file system).
    pub fn observe(&mut self, now: Instant, u: &Usage, warn_percent: u8) -> Say {
        if let Some((t, avail)) = self.last {
            let secs = now.saturating_duration_since(t).as_secs_f64();
            if secs > 0.0 {
                self.rate = Some((avail as f64 - u.available_bytes as f64) / secs);
            }
        }
        self.last = Some((now, u.available_bytes));
        let percent = u.available_percent();
        let threshold = f64::from(warn_percent);
        // Low under the threshold; a low disk stays low until it has
        // risen past the margin above it.
        let low = percent < threshold || (self.low && percent < threshold + RECOVER_MARGIN);
        let was_low = std::mem::replace(&mut self.low, low);
        if !low {
            self.warned = None;
            return if was_low {
                Say::Recovered(format!(
                    "data disk has room again: {} free of {} ({:.1} %)",
                    bytes(u.available_bytes),
                    bytes(u.size_bytes),
                    u.available_percent()
                ))
            } else {
                Say::Nothing
            };
        }
        if self
            .warned
            .is_some_and(|w| now.saturating_duration_since(w) < WARN_EVERY)
        {
            return Say::Nothing;
        }
        self.warned = Some(now);
        let eta = match (self.rate, self.full_in_hours(u)) {
            (Some(rate), Some(h)) => format!(
                "filling at {}/hour, full {}",
                bytes((rate * 3600.0) as u64),
                hours(h)
            ),
            (Some(_), None) => "not filling since the last reading".into(),
            (None, _) => "fill rate not known yet (first reading)".into(),
        };
        Say::Warn(format!(
            "data disk low: {} free of {} ({:.1} %, warning under {warn_percent} %); \
             fhir.db {}, audit.db {}; {eta}. Nothing is pruned and a full disk \
             refuses device ingest: free space or grow the disk \
             (docs/operations.md, \"Disk growth\")",
            bytes(u.available_bytes),
            bytes(u.size_bytes),
            u.available_percent(),
            bytes(u.fhir_db_bytes),
            bytes(u.audit_db_bytes),
        ))
    }

    /// Bytes per second by which available space shrank between the last
    /// two readings, if there were two.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// Hours until `u`'s available space is gone at the last rate, if it
    /// is shrinking.
    pub fn full_in_hours(&self, u: &Usage) -> Option<f64> {
        self.rate
            .filter(|r| *r > 0.0)
            .map(|r| u.available_bytes as f64 / r / 3600.0)
    }
}

/// When, for a person: "in less than a minute", "in about 49 minutes",
/// "in about 5.5 hours", "in about 12 days".
fn hours(h: f64) -> String {
    if h * 60.0 < 1.0 {
        "in less than a minute".into()
    } else if h < 1.0 {
        format!("in about {} minutes", (h * 60.0).round())
    } else if h < 48.0 {
        format!("in about {h:.1} hours")
    } else {
        format!("in about {} days", (h / 24.0).round())
    }
}

/// `n` bytes for a person: "512 B", "3.40 MiB", "1.25 GiB".
fn bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn usage(available: u64) -> Usage {
        Usage {
            available_bytes: available,
            size_bytes: 100 * GIB,
            fhir_db_bytes: 40 * GIB,
            audit_db_bytes: 50 * GIB,
        }
    }

    #[test]
    fn warns_under_the_threshold_then_every_ten_minutes_then_says_when_it_recovered() {
        let mut w = Watch::default();
        let t0 = Instant::now();
        assert_eq!(w.observe(t0, &usage(20 * GIB), 10), Say::Nothing);
        // The first reading already low: the rate is not known yet.
        let Say::Warn(first) = Watch::default().observe(t0, &usage(GIB), 10) else {
            panic!("no warning at a first reading under the threshold");
        };
        assert!(first.contains("fill rate not known yet"), "{first}");
        // 20 GiB → 9 GiB in an hour: under 10 %, filling at 11 GiB/hour.
        let t1 = t0 + Duration::from_secs(3600);
        let Say::Warn(msg) = w.observe(t1, &usage(9 * GIB), 10) else {
            panic!("no warning under the threshold");
        };
        assert!(msg.contains("9.00 GiB free of 100.00 GiB (9.0 %"), "{msg}");
        assert!(
            msg.contains("fhir.db 40.00 GiB, audit.db 50.00 GiB"),
            "{msg}"
        );
        assert!(
            msg.contains("filling at 11.00 GiB/hour, full in about 49 minutes"),
            "{msg}"
        );
        let rate = w.rate().unwrap();
        assert!((rate - (11 * GIB) as f64 / 3600.0).abs() < 1.0, "{rate}");
        // Still low a minute later: quiet until WARN_EVERY has passed.
        assert_eq!(
            w.observe(t1 + CHECK_EVERY, &usage(9 * GIB), 10),
            Say::Nothing
        );
        let Say::Warn(again) = w.observe(t1 + WARN_EVERY, &usage(9 * GIB), 10) else {
            panic!("the warning was not repeated");
        };
        assert!(
            again.contains("not filling since the last reading"),
            "{again}"
        );
        // Back over 10 % but within the margin: still low, and quiet.
        assert_eq!(
            w.observe(
                t1 + WARN_EVERY + CHECK_EVERY,
                &usage(10 * GIB + GIB / 2),
                10
            ),
            Say::Nothing
        );
        let Say::Recovered(ok) = w.observe(t1 + WARN_EVERY * 2, &usage(30 * GIB), 10) else {
            panic!("no word that the disk recovered");
        };
        assert!(ok.contains("30.00 GiB free"), "{ok}");
        assert_eq!(
            w.observe(t1 + WARN_EVERY * 3, &usage(30 * GIB), 10),
            Say::Nothing
        );
        // Low again: warned at once, not after WARN_EVERY.
        assert!(matches!(
            w.observe(t1 + WARN_EVERY * 3 + CHECK_EVERY, &usage(GIB), 10),
            Say::Warn(_)
        ));
    }

    #[test]
    fn full_in_hours_follows_the_last_rate() {
        let mut w = Watch::default();
        let t0 = Instant::now();
        w.observe(t0, &usage(10 * GIB), 5);
        w.observe(t0 + Duration::from_secs(3600), &usage(8 * GIB), 5);
        let h = w.full_in_hours(&usage(8 * GIB)).unwrap();
        assert!((h - 4.0).abs() < 1e-9, "{h}");
        w.observe(t0 + Duration::from_secs(7200), &usage(9 * GIB), 5);
        assert_eq!(w.full_in_hours(&usage(9 * GIB)), None);
    }

    #[test]
    fn reads_a_real_file_system_and_the_database_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        std::fs::write(dir.fhir_db(), vec![0u8; 4096]).unwrap();
        let mut wal = dir.fhir_db().into_os_string();
        wal.push("-wal");
        std::fs::write(&wal, vec![0u8; 1000]).unwrap();
        let u = Usage::of(&dir).unwrap();
        assert_eq!(u.fhir_db_bytes, 5096);
        assert_eq!(u.audit_db_bytes, 0);
        assert!(
            u.size_bytes > 0 && u.available_bytes <= u.size_bytes,
            "{u:?}"
        );
        let err = Usage::of(&DataDir::new(tmp.path().join("missing"))).unwrap_err();
        assert!(format!("{err:#}").contains("missing"), "{err:#}");
        // A database whose size cannot be read (here: its directory is a
        // file) is an error naming it, not a size of 0.
        let file = tmp.path().join("not-a-dir");
        std::fs::write(&file, b"").unwrap();
        let err = Usage::of(&DataDir::new(&file)).unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot read the size of")
                && format!("{err:#}").contains("not-a-dir/fhir.db"),
            "{err:#}"
        );
    }

    #[test]
    fn hours_read_well() {
        assert_eq!(hours(0.01), "in less than a minute");
        assert_eq!(hours(0.5), "in about 30 minutes");
        assert_eq!(hours(5.54), "in about 5.5 hours");
        assert_eq!(hours(24.0 * 12.2), "in about 12 days");
    }
}
