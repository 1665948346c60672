//! Sizes on the command line: `10GiB`, `1.5GiB`, `10G` (= 10 GiB), `10GB` (= 10 × 1000³), `4096`.
//!
//! | unit | factor |
//! | --- | --- |
//! | none, `B` | 1 |
//! | `K` `Ki` `KiB`, `M` `Mi` `MiB`, `G` `Gi` `GiB`, `T` `Ti` `TiB`, `P` `Pi` `PiB` | 1024ⁿ (binary) |
//! | `KB`, `MB`, `GB`, `TB`, `PB` | 1000ⁿ (decimal, as disk vendors count) |
//!
//! Units are case-insensitive; a single letter is binary (`10G` is 10 GiB, like `dd` and `truncate`).
//! A fraction is allowed if the result is a whole number of bytes (`1.5GiB`, `0.5K`; not `1.5B`).

/// What `--help` says about sizes.
pub const SIZE_HELP: &str = "a number with an optional unit: K/M/G/T/P or KiB/MiB/GiB/TiB/PiB are binary \
                             (1024), KB/MB/GB/TB/PB decimal (1000); fractions like 1.5GiB are allowed";

/// Parses a size (see the [module documentation](self)).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err(format!("invalid size {s:?}: sizes cannot be negative"));
    }
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') || frac.len() > 18 {
        return Err(format!("invalid size {s:?}: expected a number like 10, 1.5 or 512, then a unit"));
    }
    let mult: u128 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        "p" | "pi" | "pib" => 1 << 50,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        _ => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {unit:?} (KiB, MiB, GiB, TiB, PiB or KB, MB, GB, TB, PB)"
            ))
        }
    };
    let too_large = || format!("size {s:?} is too large (more than 16 EiB)");
    let int: u128 = if int.is_empty() { 0 } else { int.parse().map_err(|_| too_large())? };
    let scale = 10u128.pow(frac.len() as u32);
    let frac_value: u128 = if frac.is_empty() { 0 } else { frac.parse().map_err(|_| too_large())? };
    let scaled = int
        .checked_mul(scale)
        .and_then(|v| v.checked_add(frac_value))
        .and_then(|v| v.checked_mul(mult))
        .ok_or_else(too_large)?;
    if scaled % scale != 0 {
        return Err(format!("invalid size {s:?}: not a whole number of bytes"));
    }
    u64::try_from(scaled / scale).map_err(|_| too_large())
}

/// Formats a byte count with the largest binary unit that keeps it readable (`10 GiB`, `1.5 MiB`).
#[must_use]
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    let u = UNITS.get(unit).copied().unwrap_or("B");
    if v.fract() == 0.0 {
        format!("{v:.0} {u}")
    } else {
        format!("{v:.1} {u}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10gi"), Ok(10 << 30));
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("0.5k"), Ok(512));
        assert_eq!(parse_size(".5KiB"), Ok(512));
        assert_eq!(parse_size("2.25 TB"), Ok(2_250_000_000_000));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("9000000TiB"), Ok(9_000_000 << 40));
        for bad in ["1X", "", "GiB", "1..5G", "1.2.3G", "1.5B", "-1", "-1GiB", "99999999999T", "20000000TiB"]
        {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains(&format!("{:?}", bad.trim())), "{bad}: {e}");
        }
        assert!(parse_size("-1").unwrap_err().contains("negative"));
        assert!(parse_size("1.5B").unwrap_err().contains("whole number"));
        assert!(parse_size("99999999999T").unwrap_err().contains("too large"));
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(1536 << 10), "1.5 MiB");
        assert_eq!(format_size(100), "100 B");
        assert_eq!(format_size(u64::MAX), "16 EiB");
    }
}
