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

/// Parse a rate limit (`convert -r`) as qemu-img's `cvtnum` does: a size as [`parse_size`]
/// takes it (leading blanks allowed, trailing ones not), at most `i64::MAX`, with qemu-img's
/// two messages: one for text that is not a size, one for a size out of range (a negative
/// integer counts as one, as in QEMU's parser).
pub fn parse_rate(s: &str) -> Result<u64> {
    let invalid = || anyhow::anyhow!("Invalid rate limit specified: '{s}'.");
    let range = || {
        anyhow::anyhow!(
            "Invalid rate limit specified. Must be between 0 and {}.",
            i64::MAX
        )
    };
    let t = s.trim_start();
    if t.is_empty() || t.ends_with(char::is_whitespace) {
        return Err(invalid());
    }
    if let Some(neg) = t.strip_prefix('-') {
        let integer = !neg.is_empty() && neg.bytes().all(|b| b.is_ascii_digit());
        return Err(if integer { range() } else { invalid() });
    }
    match parse_size(t) {
        Ok(v) if v <= i64::MAX as u64 => Ok(v),
        Ok(_) => Err(range()),
        Err(_) if overflows(t) => Err(range()),
        Err(_) => Err(invalid()),
    }
}

/// Whether `t`, refused by [`parse_size`], is well-formed but too large for a `u64`.
fn overflows(t: &str) -> bool {
    let (num, suffix) = split_number(t);
    if let Some(hex) = num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        return suffix.is_empty() && !hex.is_empty();
    }
    let Some(mult) = suffix_multiplier(suffix) else {
        return false;
    };
    let fraction_ok = !num.contains('.') || mult > 1;
    fraction_ok
        && num
            .parse::<f64>()
            .is_ok_and(|v| v * mult as f64 >= u64::MAX as f64)
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

    /// qemu-img 10's answers to `convert -r X` (measured).
    #[test]
    fn rates_as_qemu_img() {
        let ok = [("0", 0), ("0x10", 16), (" 5", 5), ("5b", 5), ("1.5k", 1536)];
        for (s, v) in ok {
            assert_eq!(parse_rate(s).unwrap(), v, "{s}");
        }
        assert_eq!(
            parse_rate("7.99E").unwrap(),
            (7.99 * (1u64 << 60) as f64) as u64
        );
        let invalid = [
            "xx", "-5k", "-xx", "1.5", "1e3", "", "5 ", "-5 ", "-1.5", "1.5b",
        ];
        for s in invalid {
            let e = parse_rate(s).unwrap_err().to_string();
            assert_eq!(e, format!("Invalid rate limit specified: '{s}'."));
        }
        let range = [
            "-5",
            "-0",
            "9223372036854775808",
            "18446744073709551616",
            "99999999999999999999999",
            "8E",
            "16E",
            "20.5E",
            "0x8000000000000000",
            "0xffffffffffffffffff",
        ];
        for s in range {
            let e = parse_rate(s).unwrap_err().to_string();
            assert_eq!(
                e, "Invalid rate limit specified. Must be between 0 and 9223372036854775807.",
                "{s}"
            );
        }
    }

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
