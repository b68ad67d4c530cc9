//! `ray vm logs`: a VM's serial console log or its VMM's own log, from its directory (so
//! also after the VM has ended), optionally followed as it grows.
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;

use ray::exit::{self, coded, NOT_FOUND};
use ray::runtime::{self, Presence};

#[derive(Args)]
pub struct LogsArgs {
    /// The VM's id.
    pub id: String,
    /// Keep printing what is added until the VM ends (Ctrl-C stops).
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// The VMM's own log instead of the serial console's.
    #[arg(long)]
    pub vmm: bool,
    /// Only lines logged since WHEN: a duration back from now (30s, 10m, 2h, 1d) or an
    /// RFC 3339 UTC time (2026-12-03T08:00:00Z). Only the VMM log (--vmm) has timestamps.
    #[arg(long, value_name = "WHEN", requires = "vmm")]
    pub since: Option<String>,
    /// Only the last N lines.
    #[arg(long, value_name = "N")]
    pub tail: Option<usize>,
}

/// Seconds since the Unix epoch of an RFC 3339 UTC time (`YYYY-MM-DDTHH:MM:SS[.frac]Z`).
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z').or_else(|| s.strip_suffix("+00:00"))?;
    let (date, time) = s.split_once(['T', ' '])?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 || sec >= 61.0 {
        return None;
    }
    // Days from the civil date (proleptic Gregorian calendar).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + sec)
}

/// `--since`: a duration back from `now` or an RFC 3339 time, as seconds since the epoch.
pub fn parse_since(s: &str, now: f64) -> Result<f64, String> {
    if let Some(t) = parse_rfc3339(s) {
        return Ok(t);
    }
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().map_err(|_| {
        format!("--since '{s}' is neither a duration (30s, 10m, 2h, 1d) nor an RFC 3339 UTC time")
    })?;
    let scale = match unit {
        "s" | "" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        other => {
            return Err(format!(
                "--since '{s}': unknown unit '{other}' (use s, m, h or d)"
            ))
        }
    };
    Ok(now - n * scale)
}

/// The lines of `text` logged at or after `since`. A line without a leading timestamp
/// belongs to the last one that had one; lines before any timestamp are left out.
pub fn lines_since(text: &str, since: f64) -> String {
    let mut keep = false;
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        if let Some(t) = line.split_whitespace().next().and_then(parse_rfc3339) {
            keep = t >= since;
        }
        if keep {
            out.push_str(line);
        }
    }
    out
}

/// The last `n` lines of `text`.
pub fn last_lines(text: &str, n: usize) -> &str {
    if n == 0 {
        return "";
    }
    let body = text.strip_suffix('\n').unwrap_or(text);
    match body.rmatch_indices('\n').nth(n - 1) {
        Some((i, _)) => &text[i + 1..],
        None => text,
    }
}

pub fn run(runtime: &Path, a: &LogsArgs) -> anyhow::Result<()> {
    runtime::check_id(&a.id).map_err(|e| coded(exit::INVALID, e))?;
    let dir = runtime::vm_dir(runtime, &a.id);
    if !dir.is_dir() {
        return Err(coded(
            NOT_FOUND,
            format!("no VM '{}' in {}", a.id, runtime.display()),
        ));
    }
    let path = dir.join(if a.vmm { "vmm.log" } else { "serial.log" });
    let since = a
        .since
        .as_deref()
        .map(|s| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            parse_since(s, now).map_err(|e| coded(exit::INVALID, e))
        })
        .transpose()?;
    let mut text = match std::fs::read(&path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    };
    let mut offset = text.len() as u64;
    if let Some(t) = since {
        text = lines_since(&text, t);
    }
    let shown = match a.tail {
        Some(n) => last_lines(&text, n),
        None => &text,
    };
    let mut out = std::io::stdout();
    out.write_all(shown.as_bytes())?;
    out.flush()?;
    if !a.follow {
        return Ok(());
    }
    // Follow: print what is appended until the VM has ended and all of it is out.
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let ended = !matches!(runtime::presence(&dir), Presence::Live { .. });
        let grown = match std::fs::File::open(&path) {
            Ok(mut f) => {
                let len = f.metadata()?.len();
                if len < offset {
                    // A new VMM of the same id rotated the log: start over.
                    offset = 0;
                }
                f.seek(SeekFrom::Start(offset))?;
                let mut any = false;
                loop {
                    let n = f.read(&mut chunk)?;
                    if n == 0 {
                        break;
                    }
                    out.write_all(&chunk[..n])?;
                    offset += n as u64;
                    any = true;
                }
                out.flush()?;
                any
            }
            Err(_) => false,
        };
        if ended && !grown {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00Z"), Some(951_868_800.0));
        assert_eq!(
            parse_rfc3339("2026-12-03T08:20:42.5Z"),
            Some(1_796_286_042.5)
        );
        assert_eq!(parse_rfc3339("2026-13-03T08:20:42Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn since_takes_durations_and_times() {
        assert_eq!(parse_since("30s", 1000.0), Ok(970.0));
        assert_eq!(parse_since("10m", 1000.0), Ok(400.0));
        assert_eq!(parse_since("1970-01-01T00:01:00Z", 1000.0), Ok(60.0));
        assert!(parse_since("10y", 0.0)
            .unwrap_err()
            .contains("unknown unit 'y'"));
        assert!(parse_since("soon", 0.0).is_err());
    }

    #[test]
    fn lines_since_keep_continuations_with_their_line() {
        let log = "early line\n1970-01-01T00:00:10Z old\n  more old\n1970-01-01T00:01:00Z new\n  more new\n";
        assert_eq!(
            lines_since(log, 30.0),
            "1970-01-01T00:01:00Z new\n  more new\n"
        );
    }

    #[test]
    fn last_lines_of_text() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(last_lines("a\nb\nc", 2), "b\nc");
        assert_eq!(last_lines("a\nb\n", 5), "a\nb\n");
        assert_eq!(last_lines("a\nb\n", 0), "");
    }
}
