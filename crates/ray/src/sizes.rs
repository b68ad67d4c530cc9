//! Sizes on the command line: `128M`, `2G`, `512MiB`, `1.5G`, or plain bytes.
//!
//! As in QEMU, units are powers of 1024 (`K`, `M`, `G`, `T`, with or without `B`/`iB`)
//! and the number may have a decimal fraction (`1.5G` is 1536 MiB); the result must be a
//! whole number of bytes. Guest memory ([`parse_memory`]) must also be whole pages.

/// The page size guest memory is counted in.
pub const PAGE: u64 = 4096;

pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let not_a_size = || {
        format!("'{text}' is not a size: expected a number (e.g. 512 or 1.5) with an optional unit (K, M, G or T)")
    };
    let (whole, frac) = match num.split_once('.') {
        Some((w, f)) => (w, f),
        None => (num, ""),
    };
    if whole.is_empty() && frac.is_empty()
        || frac.contains('.')
        || num.ends_with('.')
        || frac.len() > 18
    {
        return Err(not_a_size());
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| not_a_size())?
    };
    let mult: u128 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        other => {
            return Err(format!(
                "'{text}' has an unknown size unit '{other}' (use K, M, G or T)"
            ))
        }
    };
    let too_large = || format!("'{text}' is too large");
    let mut bytes = whole.checked_mul(mult).ok_or_else(too_large)?;
    if !frac.is_empty() {
        let scale = 10u128.pow(frac.len() as u32);
        let f: u128 = frac.parse().map_err(|_| not_a_size())?;
        let part = f * mult;
        if !part.is_multiple_of(scale) {
            return Err(format!(
                "'{text}' is not a whole number of bytes ({}.{:0width$} bytes)",
                bytes + part / scale,
                part % scale,
                width = frac.len()
            ));
        }
        bytes += part / scale;
    }
    u64::try_from(bytes).map_err(|_| too_large())
}

/// A duration between 1 ms and an hour: `3s`, `500ms`, `2` (seconds).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, scale) = if let Some(ms) = s.strip_suffix("ms") {
        (ms, 1e-3)
    } else {
        (s.strip_suffix('s').unwrap_or(s), 1.0)
    };
    // The range is checked on the seconds: `19000ms` is 19 s.
    match num.parse::<f64>().map(|v| v * scale) {
        Ok(secs) if (0.001..=3600.0).contains(&secs) => {
            Ok(std::time::Duration::from_secs_f64(secs))
        }
        _ => Err(format!(
            "`{s}` is not a duration between 1ms and 3600s (e.g. 3s, 500ms)"
        )),
    }
}

/// A guest memory size: [`parse_size`], and a whole number of 4 KiB pages.
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let bytes = parse_size(text)?;
    if !bytes.is_multiple_of(PAGE) {
        return Err(format!(
            "'{text}' is {bytes} bytes, not a whole number of {PAGE}-byte pages ({} pages and {} bytes); round it to a multiple of 4K",
            bytes / PAGE,
            bytes % PAGE
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_checked_in_seconds_whatever_the_unit() {
        use std::time::Duration;
        assert_eq!(parse_duration("19000ms"), Ok(Duration::from_secs(19)));
        assert_eq!(parse_duration("1ms"), Ok(Duration::from_millis(1)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3600s"), Ok(Duration::from_secs(3600)));
        for bad in ["0", "0.5ms", "3601s", "3600001ms", "x", "-1s"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("128M"), Ok(128 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q")
            .unwrap_err()
            .contains("unknown size unit 'Q'"));
        assert!(parse_size("M").unwrap_err().contains("not a size"));
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn decimal_sizes_as_qemu_takes_them() {
        assert_eq!(parse_size("1.5G"), Ok(1536 << 20));
        assert_eq!(parse_size("0.5M"), Ok(512 << 10));
        assert_eq!(parse_size(".25G"), Ok(256 << 20));
        assert_eq!(parse_size("2.0G"), Ok(2 << 30));
        assert_eq!(parse_size("1.125k"), Ok(1152));
        let e = parse_size("1.5").unwrap_err();
        assert!(e.contains("not a whole number of bytes (1.5 bytes)"), "{e}");
        for bad in ["1.", "1.2.3G", ".", "1.x"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("16383.99999999999T")
            .unwrap_err()
            .contains("whole number"));
        assert!(parse_size("16777216T").unwrap_err().contains("too large"));
    }

    #[test]
    fn memory_is_whole_pages() {
        assert_eq!(parse_memory("1.5G"), Ok(1536 << 20));
        assert_eq!(parse_memory("1.5M"), Ok(1536 << 10));
        let e = parse_memory("1.5K").unwrap_err();
        assert!(
            e.contains("'1.5K' is 1536 bytes, not a whole number of 4096-byte pages"),
            "{e}"
        );
        let e = parse_memory("1.3M").unwrap_err();
        assert!(e.contains("(1363148.8 bytes)"), "{e}");
        let e = parse_memory("1000").unwrap_err();
        assert!(e.contains("0 pages and 1000 bytes"), "{e}");
        // A fraction of a byte is named as such, before pages are counted.
        assert!(parse_memory("1.0000001K")
            .unwrap_err()
            .contains("whole number of bytes"));
    }
}
