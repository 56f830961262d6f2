//! [`CreateOptions`]: the `qemu-img create -f qcow2 -o ...` options, their parsing, and the
//! combinations qemu-img refuses.

use crate::error::{Error, Result};
use crate::format::extensions::MAX_BACKING_FORMAT;
use crate::format::header::{self, l1_entries_for};

/// The qcow2 version to create (`compat=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compat {
    /// Version 2 (`compat=0.10` or `v2`): no feature bits, 16-bit refcounts.
    V2,
    /// Version 3 (`compat=1.1` or `v3`), the default.
    #[default]
    V3,
}

/// How much of the image to allocate up front (`preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Only the header, refcount structures and an empty L1 table.
    #[default]
    Off,
    /// Also every L2 table, with every guest cluster mapped to a host cluster (sparse file).
    Metadata,
    /// Like `Metadata`, and the data clusters are reserved with `Storage::allocate`.
    Falloc,
    /// Like `Metadata`, and the data clusters are written with zeros.
    Full,
}

/// Options for [`create`](super::create), defaulting to what `qemu-img create -f qcow2` does.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes, rounded up to 512 like qemu-img. `None`: the caller (the CLI)
    /// must fill it in, e.g. from the backing file, before calling `create`.
    pub size: Option<u64>,
    /// Cluster size, a power of two in 512..=2 MiB (default 64 KiB).
    pub cluster_size: u64,
    /// Refcount width: 1, 2, 4, 8, 16, 32 or 64 (default 16; must be 16 for v2).
    pub refcount_bits: u32,
    /// Version to create.
    pub compat: Compat,
    /// Use extended L2 entries (v3, clusters of at least 16 KiB).
    pub extended_l2: bool,
    /// 0 zlib (default), 1 zstd (v3 only).
    pub compression_type: u8,
    /// Set the lazy refcounts compatible bit (v3 only).
    pub lazy_refcounts: bool,
    /// Name of the external data file to record (v3 only).
    pub data_file: Option<String>,
    /// The data file is a standalone raw image (needs `data_file`; implies metadata
    /// preallocation).
    pub data_file_raw: bool,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Backing file name to record (not opened here).
    pub backing_file: Option<String>,
    /// Backing file format to record.
    pub backing_fmt: Option<String>,
    /// `encrypt.*`: LUKS encryption (feature `luks`).
    #[cfg(feature = "luks")]
    pub encrypt: super::encrypt::EncryptOptions,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: None,
            cluster_size: 65536,
            refcount_bits: 16,
            compat: Compat::V3,
            extended_l2: false,
            compression_type: header::COMPRESSION_ZLIB,
            lazy_refcounts: false,
            data_file: None,
            data_file_raw: false,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_fmt: None,
            #[cfg(feature = "luks")]
            encrypt: super::encrypt::EncryptOptions::default(),
        }
    }
}

/// Largest size qemu-img accepts on its command line.
const MAX_SIZE_ARG: u64 = i64::MAX as u64;
/// QEMU's largest block device length (INT64_MAX aligned down to 1 GiB).
pub const MAX_IMAGE_SIZE: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

/// Parse a size the way qemu-img does: decimal (optionally with a fraction, which then needs a
/// unit suffix) or `0x` hex (no suffix), then an optional suffix `b`/`B` (bytes), `k`, `M`,
/// `G`, `T`, `P`, `E` (powers of 1024, either case). Leading whitespace is allowed. The result
/// must be below 2^63.
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || Error::invalid_arg(format!("invalid size '{s}'"));
    let t = s.trim_start();
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16)
            .ok()
            .filter(|&v| v <= MAX_SIZE_ARG)
            .ok_or_else(bad);
    }
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let mul = suffix_multiplier(suffix).ok_or_else(bad)?;
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let has_frac = num.contains('.');
    if (int.is_empty() && frac.is_empty()) || (has_frac && mul == 1) {
        return Err(bad());
    }
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let total = int.checked_mul(u128::from(mul)).ok_or_else(bad)? + fraction_of(frac, mul);
    u64::try_from(total)
        .ok()
        .filter(|&v| v <= MAX_SIZE_ARG)
        .ok_or_else(bad)
}

/// The multiplier for a size suffix ("" and "b"/"B" are bytes).
fn suffix_multiplier(suffix: &str) -> Option<u64> {
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return None,
    };
    Some(1u64 << shift)
}

/// `0.frac * mul`, truncated (at most 18 fraction digits are significant).
fn fraction_of(frac: &str, mul: u64) -> u128 {
    let digits = &frac[..frac.len().min(18)];
    let Ok(value) = digits.parse::<u128>() else {
        return 0;
    };
    // At most 18 digits (above), so the length fits and 10^len does not overflow.
    #[allow(clippy::cast_possible_truncation)]
    let len = digits.len() as u32;
    value * u128::from(mul) / 10u128.pow(len)
}

/// Parse an on/off option like QEMU: on/yes/true/y and off/no/false/n.
pub fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(Error::invalid_arg(format!(
            "parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

/// Parse a plain number (decimal or `0x` hex).
fn parse_number(key: &str, v: &str) -> Result<u64> {
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    parsed.map_err(|_| Error::invalid_arg(format!("parameter '{key}' expects a number")))
}

impl CreateOptions {
    /// Split a `-o` string into `(key, value)` pairs: comma separated, `,,` is a literal
    /// comma, and a bare `key` means `key=on`.
    pub fn parse_o(s: &str) -> Result<Vec<(String, String)>> {
        let mut items = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                ',' if chars.peek() == Some(&',') => {
                    chars.next();
                    cur.push(',');
                }
                ',' => items.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        items.push(cur);
        items
            .into_iter()
            .filter(|i| !i.is_empty())
            .map(|i| split_item(&i))
            .collect()
    }

    /// Apply every option of a `-o` string.
    pub fn apply_o(&mut self, s: &str) -> Result<()> {
        Self::parse_o(s)?
            .iter()
            .try_for_each(|(k, v)| self.apply_option(k, v))
    }

    /// Apply one qemu-img option by its name (`cluster_size`, `refcount_bits`, `compat`,
    /// `extended_l2`, `compression_type`, `lazy_refcounts`, `data_file`, `data_file_raw`,
    /// `preallocation`, `backing_file`, `backing_fmt`, `size`).
    pub fn apply_option(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "size" => self.size = Some(parse_size(value)?),
            "cluster_size" => self.cluster_size = parse_size(value)?,
            "refcount_bits" => self.refcount_bits = parse_refcount_bits(value)?,
            "compat" => self.compat = parse_compat(value)?,
            "extended_l2" => self.extended_l2 = parse_bool(key, value)?,
            "compression_type" => self.compression_type = parse_compression_type(value)?,
            "lazy_refcounts" => self.lazy_refcounts = parse_bool(key, value)?,
            "data_file" => self.data_file = Some(value.to_string()),
            "data_file_raw" => self.data_file_raw = parse_bool(key, value)?,
            "preallocation" => self.preallocation = parse_preallocation(value)?,
            "backing_file" => self.backing_file = Some(value.to_string()),
            "backing_fmt" => self.backing_fmt = Some(value.to_string()),
            _ => return self.apply_encrypt_option(key, value),
        }
        Ok(())
    }

    /// `encryption=on` (QEMU's old name for legacy AES) and `encrypt.*`.
    #[cfg(feature = "luks")]
    fn apply_encrypt_option(&mut self, key: &str, value: &str) -> Result<()> {
        let known = match (key, key.strip_prefix("encrypt.")) {
            ("encryption", _) if parse_bool(key, value)? => self.encrypt.apply("format", "aes")?,
            ("encryption", _) => true,
            (_, Some(k)) => self.encrypt.apply(k, value)?,
            _ => false,
        };
        match known {
            true => Ok(()),
            false => Err(Error::invalid_arg(format!("invalid parameter '{key}'"))),
        }
    }

    /// Without the `luks` feature, encryption options are refused.
    #[cfg(not(feature = "luks"))]
    fn apply_encrypt_option(&mut self, key: &str, _value: &str) -> Result<()> {
        match key == "encryption" || key.starts_with("encrypt.") {
            true => Err(Error::unsupported(
                "creating encrypted images (feature luks is off)",
            )),
            false => Err(Error::invalid_arg(format!("invalid parameter '{key}'"))),
        }
    }

    /// Whether the options ask for an encrypted image.
    pub fn encrypted(&self) -> bool {
        #[cfg(feature = "luks")]
        return self.encrypt.wanted();
        #[cfg(not(feature = "luks"))]
        false
    }

    /// The size to create: `size`, else `backing_size` (the backing file's virtual size, which
    /// the caller knows after opening it), rounded up to 512 bytes.
    pub fn size_or(&self, backing_size: Option<u64>) -> Result<u64> {
        let size = self.size.or(backing_size).ok_or_else(|| {
            Error::invalid_arg("image size required (no size and no backing file size)")
        })?;
        size.checked_next_multiple_of(512)
            .filter(|&s| s <= MAX_SIZE_ARG)
            .ok_or_else(|| Error::invalid_arg(format!("image size {size} too large")))
    }

    /// The preallocation actually used: `data_file_raw` turns `Off` into `Metadata`, as in QEMU.
    pub fn effective_preallocation(&self) -> Preallocation {
        match (self.data_file_raw, self.preallocation) {
            (true, Preallocation::Off) => Preallocation::Metadata,
            (_, p) => p,
        }
    }

    /// Refuse what qemu-img refuses (each with [`ErrorKind::InvalidArgument`]) for a `size`
    /// already rounded by [`CreateOptions::size_or`].
    ///
    /// [`ErrorKind::InvalidArgument`]: crate::ErrorKind::InvalidArgument
    pub fn validate(&self, size: u64) -> Result<()> {
        self.check_v3_only()?;
        self.check_cluster_size()?;
        self.check_refcount_bits()?;
        self.check_backing()?;
        self.check_data_file()?;
        self.check_encryption()?;
        self.check_size(size)
    }

    /// LUKS needs v3 here, and no preallocation (preallocated clusters would read as the
    /// decryption of whatever the file holds).
    fn check_encryption(&self) -> Result<()> {
        if !self.encrypted() {
            return Ok(());
        }
        if self.compat != Compat::V3 {
            return Err(Error::unsupported("encryption with compat=0.10"));
        }
        if self.effective_preallocation() != Preallocation::Off || self.data_file.is_some() {
            return Err(Error::unsupported(
                "encryption with preallocation or an external data file",
            ));
        }
        #[cfg(feature = "luks")]
        self.encrypt.luks_params()?;
        Ok(())
    }

    /// Features that need compat=1.1.
    fn check_v3_only(&self) -> Result<()> {
        if self.compat == Compat::V3 {
            return Ok(());
        }
        let needs_v3 = [
            (self.extended_l2, "Extended L2 entries"),
            (self.lazy_refcounts, "Lazy refcounts"),
            (self.data_file.is_some(), "External data files"),
            (self.compression_type != 0, "Non-zlib compression type"),
        ];
        match needs_v3.iter().find(|(on, _)| *on) {
            Some((_, what)) => Err(Error::invalid_arg(format!(
                "{what} are only supported with compatibility level 1.1 and above"
            ))),
            None => Ok(()),
        }
    }

    /// Power of two in 512..=2 MiB; at least 16 KiB with extended L2.
    fn check_cluster_size(&self) -> Result<()> {
        let cs = self.cluster_size;
        let bits = cs.trailing_zeros();
        if !cs.is_power_of_two()
            || !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits)
        {
            return Err(Error::invalid_arg(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
        if self.extended_l2 && bits < header::MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(Error::invalid_arg(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if self.compression_type > header::COMPRESSION_ZSTD {
            return Err(Error::invalid_arg("Unknown compression type"));
        }
        Ok(())
    }

    /// Power of two up to 64; exactly 16 for v2.
    fn check_refcount_bits(&self) -> Result<()> {
        let rb = self.refcount_bits;
        if rb > 64 || !rb.is_power_of_two() {
            return Err(Error::invalid_arg(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if self.compat == Compat::V2 && rb != 16 {
            return Err(Error::invalid_arg(
                "Different refcount widths than 16 bits require compatibility level 1.1",
            ));
        }
        Ok(())
    }

    /// Backing file rules: format needs a file, no preallocation without extended L2, names
    /// fit the header.
    fn check_backing(&self) -> Result<()> {
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return Err(Error::invalid_arg(
                "Backing format cannot be used without backing file",
            ));
        }
        let Some(name) = &self.backing_file else {
            return Ok(());
        };
        if self.preallocation != Preallocation::Off && !self.extended_l2 {
            return Err(Error::invalid_arg(
                "Backing file and preallocation can only be used at the same time if \
                 extended_l2 is on",
            ));
        }
        if name.len() > header::MAX_BACKING_FILE_NAME as usize {
            return Err(Error::invalid_arg(
                "backing file name longer than 1023 bytes",
            ));
        }
        if self
            .backing_fmt
            .as_ref()
            .is_some_and(|f| f.len() > MAX_BACKING_FORMAT)
        {
            return Err(Error::invalid_arg(
                "backing format name longer than 15 bytes",
            ));
        }
        Ok(())
    }

    /// data_file_raw needs a data file and conflicts with a backing file.
    fn check_data_file(&self) -> Result<()> {
        if self.data_file_raw && self.data_file.is_none() {
            return Err(Error::invalid_arg("data-file-raw requires data-file"));
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return Err(Error::invalid_arg(
                "Backing file and data-file-raw cannot be used at the same time",
            ));
        }
        Ok(())
    }

    /// The L1 table for `size` must fit QEMU's 32 MiB limit.
    fn check_size(&self, size: u64) -> Result<()> {
        let bits = self.cluster_size.trailing_zeros();
        let l1 = l1_entries_for(size, bits, self.extended_l2);
        if size > MAX_IMAGE_SIZE || l1 * header::L1_ENTRY_SIZE > header::MAX_L1_BYTES {
            return Err(Error::invalid_arg(
                "The image size is too large for file format 'qcow2' (try using a larger \
                 cluster size)",
            ));
        }
        Ok(())
    }
}

/// `key=value` or a bare `key` (= on).
fn split_item(item: &str) -> Result<(String, String)> {
    match item.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        Some(_) => Err(Error::invalid_arg(format!("invalid option '{item}'"))),
        None => Ok((item.to_string(), "on".to_string())),
    }
}

/// `compat`: 0.10, 1.1, v2 or v3.
fn parse_compat(v: &str) -> Result<Compat> {
    match v {
        "0.10" | "v2" => Ok(Compat::V2),
        "1.1" | "v3" => Ok(Compat::V3),
        _ => Err(Error::invalid_arg(format!(
            "Invalid compatibility level: '{v}'"
        ))),
    }
}

/// `compression_type`: zlib or zstd.
fn parse_compression_type(v: &str) -> Result<u8> {
    match v {
        "zlib" => Ok(header::COMPRESSION_ZLIB),
        "zstd" => Ok(header::COMPRESSION_ZSTD),
        _ => Err(Error::invalid_arg(format!(
            "compression_type does not accept '{v}'"
        ))),
    }
}

/// `preallocation`: off, metadata, falloc or full.
fn parse_preallocation(v: &str) -> Result<Preallocation> {
    match v {
        "off" => Ok(Preallocation::Off),
        "metadata" => Ok(Preallocation::Metadata),
        "falloc" => Ok(Preallocation::Falloc),
        "full" => Ok(Preallocation::Full),
        _ => Err(Error::invalid_arg(format!(
            "preallocation does not accept '{v}'"
        ))),
    }
}

/// `refcount_bits`: a number (range checked by `validate`).
fn parse_refcount_bits(v: &str) -> Result<u32> {
    let n = parse_number("refcount_bits", v)?;
    u32::try_from(n).map_err(|_| {
        Error::invalid_arg("Refcount width must be a power of two and may not exceed 64 bits")
    })
}
