//! The structure `qemu-img info` prints, field for field and in its order, plus its human form.

use serde::Serialize;

use crate::output::size_to_str;

/// One image of `qemu-img info --output=json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    pub children: Vec<Child>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    /// The internal snapshots, on-disk form (serialized in qemu-img's form).
    #[serde(
        rename = "snapshots",
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "super::snapshots::serialize_json"
    )]
    pub raw_snapshots: Vec<qcow2_engine::format::snapshot::Snapshot>,
    pub virtual_size: u64,
    pub filename: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    pub format: String,
    pub actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    pub dirty_flag: bool,
}

/// A child node (always the protocol node `file`).
#[derive(Debug, Serialize)]
pub struct Child {
    pub name: &'static str,
    pub info: FileInfo,
}

/// The protocol-level view of the image file.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FileInfo {
    pub children: Vec<Child>,
    pub virtual_size: u64,
    pub filename: String,
    pub format: &'static str,
    pub actual_size: u64,
    pub format_specific: FormatSpecific,
    pub dirty_flag: bool,
}

/// `format-specific`: `{ "type": ..., "data": {...} }`.
#[derive(Debug, Serialize)]
pub struct FormatSpecific {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub data: SpecificData,
}

/// The data of `format-specific`.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum SpecificData {
    Qcow2(Box<Qcow2Data>),
    Empty {},
}

/// qcow2's `format-specific.data`; the v3-only fields are absent for compat 0.10.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Data {
    pub compat: &'static str,
    pub compression_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BitmapJson>>,
    pub refcount_bits: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<super::info_luks::EncryptInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
}

/// One persistent bitmap, as qemu-img lists it under `format-specific`.
#[derive(Debug, Serialize)]
pub struct BitmapJson {
    /// `in-use` and/or `auto`, in that order.
    pub flags: Vec<&'static str>,
    pub name: String,
    pub granularity: u64,
}

impl From<qcow2_engine::image::BitmapInfo> for BitmapJson {
    fn from(b: qcow2_engine::image::BitmapInfo) -> Self {
        let flags = [(b.in_use, "in-use"), (b.auto, "auto")];
        BitmapJson {
            flags: flags.iter().filter(|f| f.0).map(|f| f.1).collect(),
            name: b.name,
            granularity: b.granularity,
        }
    }
}

impl ImageInfo {
    /// Print in qemu-img's human layout.
    pub fn print_human(&self) {
        outln!("image: {}", self.filename);
        outln!("file format: {}", self.format);
        outln!(
            "virtual size: {} ({} bytes)",
            size_to_str(self.virtual_size),
            self.virtual_size
        );
        outln!("disk size: {}", size_to_str(self.actual_size));
        if self.encrypted == Some(true) {
            outln!("encrypted: yes");
        }
        if let Some(c) = self.cluster_size {
            outln!("cluster_size: {c}");
        }
        self.print_backing();
        if self.dirty_flag {
            outln!("cleanly shut down: no");
        }
        if !self.raw_snapshots.is_empty() {
            super::snapshots::print_human(&self.raw_snapshots);
        }
        if let Some(FormatSpecific {
            data: SpecificData::Qcow2(d),
            ..
        }) = &self.format_specific
        {
            outln!("Format specific information:");
            d.print_human();
        }
        for c in &self.children {
            outln!("Child node '/{}':", c.name);
            outln!("    filename: {}", c.info.filename);
            outln!("    protocol type: {}", c.info.format);
            let len = c.info.virtual_size;
            outln!("    file length: {} ({len} bytes)", size_to_str(len));
            outln!("    disk size: {}", size_to_str(c.info.actual_size));
        }
    }

    fn print_backing(&self) {
        let Some(name) = &self.backing_filename else {
            return;
        };
        match &self.full_backing_filename {
            Some(full) if full != name => outln!("backing file: {name} (actual path: {full})"),
            _ => outln!("backing file: {name}"),
        }
        if let Some(f) = &self.backing_filename_format {
            outln!("backing file format: {f}");
        }
    }
}

impl Qcow2Data {
    /// The fields in qemu-img's order, one per line, indented by 4.
    fn print_human(&self) {
        outln!("    compat: {}", self.compat);
        outln!("    compression type: {}", self.compression_type);
        let opt = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                outln!("    {k}: {v}");
            }
        };
        opt("lazy refcounts", self.lazy_refcounts.map(|b| b.to_string()));
        if let Some(list) = &self.bitmaps {
            print_bitmaps(list);
        }
        outln!("    refcount bits: {}", self.refcount_bits);
        opt("data file", self.data_file.clone());
        opt("data file raw", self.data_file_raw.map(|b| b.to_string()));
        if let Some(e) = &self.encrypt {
            outln!("    encrypt:");
            print_tree(e, 2);
        }
        opt("corrupt", self.corrupt.map(|b| b.to_string()));
        opt("extended l2", self.extended_l2.map(|b| b.to_string()));
    }
}

/// Print a serializable tree as qemu does in human output, in field order: `key: value`,
/// nested objects indented by 4 more, key dashes as spaces, list items as `[i]:`.
fn print_tree<T: Serialize>(v: &T, depth: usize) {
    let Ok(text) = serde_json::to_string_pretty(v) else {
        return;
    };
    let base = "    ".repeat(depth.saturating_sub(1));
    let mut counters: Vec<usize> = vec![0; 64];
    for line in text.lines().skip(1) {
        let indent = line.len() - line.trim_start().len();
        let level = (indent / 2).min(63);
        let t = line.trim().trim_end_matches(',');
        let pad = format!("{base}{}", "    ".repeat(level));
        match t {
            "}" | "]" | "{}" | "[]" => continue,
            "{" | "[" => {
                outln!("{pad}[{}]:", counters[level]);
                counters[level] += 1;
            }
            _ => {
                let (k, val) = t.split_once("\": ").unwrap_or((t, ""));
                let k = k.trim_start_matches('"').replace('-', " ");
                match val {
                    "{" | "[" => {
                        counters[level + 1] = 0;
                        outln!("{pad}{k}:");
                    }
                    _ => outln!("{pad}{k}: {}", val.trim_matches('"')),
                }
            }
        }
    }
}

/// qemu-img's human listing of bitmaps (an empty flag list prints just `flags:`).
fn print_bitmaps(list: &[BitmapJson]) {
    outln!("    bitmaps:");
    for (i, b) in list.iter().enumerate() {
        outln!("        [{i}]:");
        outln!("            flags:");
        for (k, f) in b.flags.iter().enumerate() {
            outln!("                [{k}]: {f}");
        }
        outln!("            name: {}", b.name);
        outln!("            granularity: {}", b.granularity);
    }
}
