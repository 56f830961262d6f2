//! Parsing of numbers and sizes as qemu-img and qemu-io write them (`-o` lists are parsed
//! by the library's `CreateOptions`).

use anyhow::{Result, bail};

/// Multiplier of a size suffix (`b`, `k`, `M`, `G`, `T`, `P`, `E`, case-insensitive; binary).
fn suffix_multiplier(suffix: &str) -> Option<u64> {
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        "e" => 60,
        _ => return None,
    };
    Some(1u64 << shift)
}

/// Split `s` into its leading number part and the suffix after it.
fn split_number(s: &str) -> (&str, &str) {
    let hex = s.len() > 2 && (s.starts_with("0x") || s.starts_with("0X"));
    let end = if hex {
        2 + s[2..]
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(s.len() - 2)
    } else {
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len())
    };
    s.split_at(end)
}

/// Parse a byte count the way qemu-img and qemu-io do: a decimal number with an optional
/// binary suffix (`4096`, `64k`, `1.5G`; a fraction needs a suffix other than `b`), or a
/// `0x` hexadecimal number without suffix.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, suffix) = split_number(t);
    let invalid =
        || anyhow::anyhow!("invalid size '{s}': non-numeric argument or unrecognized suffix");
    let mult = suffix_multiplier(suffix).ok_or_else(invalid)?;
    let value = if let Some(hex) = num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        match suffix.is_empty() {
            true => u64::from_str_radix(hex, 16).ok(),
            false => None,
        }
    } else if num.contains('.') {
        let f: f64 = num.parse().map_err(|_| invalid())?;
        let v = f * mult as f64;
        (mult > 1 && v.is_finite() && v < u64::MAX as f64).then_some(v as u64)
    } else {
        num.parse::<u64>().ok().and_then(|v| v.checked_mul(mult))
    };
    value.ok_or_else(invalid)
}

/// Parse a byte pattern for `-P`: decimal or `0x` hex, 0..=255.
pub fn parse_pattern(s: &str) -> Result<u8> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse::<u64>().ok(),
    };
    match v {
        Some(v) if v <= 255 => Ok(v as u8),
        _ => bail!("invalid pattern '{s}' (a byte: 0..255 or 0x00..0xff)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("0x10000").unwrap(), 65536);
        assert_eq!(parse_size("0x1b").unwrap(), 27);
        assert_eq!(parse_size("0.5k").unwrap(), 512);
        assert_eq!(parse_size("512b").unwrap(), 512);
        for bad in [
            "",
            "k",
            "12q",
            "-1",
            "0x",
            "99999999999999999999",
            "16E",
            "1.2.3",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns() {
        assert_eq!(parse_pattern("0xab").unwrap(), 0xab);
        assert_eq!(parse_pattern("17").unwrap(), 17);
        assert!(parse_pattern("256").is_err());
    }
}
