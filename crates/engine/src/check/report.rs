//! [`CheckReport`]: what a check found, in the shape of `qemu-img check`'s output.
//!
//! The JSON form has the same keys as `qemu-img check --output=json` (QAPI `ImageCheck`), and
//! like QEMU it leaves out the optional counters that are zero. The human form ([`Display`])
//! prints the same text as qemu-img's human output.
//!
//! [`Display`]: std::fmt::Display

use std::fmt;

/// At most this many messages are kept; a broken image can produce one per cluster.
pub const MAX_MESSAGES: usize = 10_000;

/// The result of checking (and possibly repairing) one image.
///
/// Counters follow `qemu-img check`: `corruptions` are errors that may lose data,
/// `leaks` are clusters whose refcount is higher than the number of references (wasted
/// space), `check_errors` are problems that stopped part of the check (e.g. unreadable
/// refcount blocks). After a repair, `corruptions_fixed` / `leaks_fixed` say what was repaired
/// and the other counters describe the image as it is afterwards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub struct CheckReport {
    /// The image's file name as the caller named it (the storage's path by default).
    pub filename: String,
    /// Always `"qcow2"`.
    pub format: String,
    /// Internal errors during the check (the image could not be fully checked).
    pub check_errors: u64,
    /// Offset just past the last cluster in use (by refcount or by reference).
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "is_zero"))]
    pub image_end_offset: u64,
    /// Inconsistencies that may lose data.
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "is_zero"))]
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their number of references.
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "is_zero"))]
    pub leaks: u64,
    /// Corruptions repaired.
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "is_zero"))]
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "is_zero"))]
    pub leaks_fixed: u64,
    /// Guest clusters of the virtual disk: `ceil(size / cluster_size)`.
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "is_zero"))]
    pub total_clusters: u64,
    /// Guest clusters the active L1 table maps to a host cluster (normal, preallocated zero or
    /// compressed).
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "is_zero"))]
    pub allocated_clusters: u64,
    /// Allocated clusters not stored right after the previous one of the same L2 table
    /// (every compressed cluster counts as fragmented, as in QEMU).
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "is_zero"))]
    pub fragmented_clusters: u64,
    /// Compressed clusters in the active L1 table.
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "is_zero"))]
    pub compressed_clusters: u64,
    /// One line per finding, worded like qemu-img's stderr output
    /// (`ERROR cluster 5 refcount=0 reference=1`, `Leaked cluster 9 refcount=1 reference=0`).
    /// At most [`MAX_MESSAGES`] are kept.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub messages: Vec<String>,
}

#[cfg(feature = "serde")]
fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl CheckReport {
    /// An empty report for `filename`.
    pub fn new(filename: impl Into<String>) -> CheckReport {
        CheckReport {
            filename: filename.into(),
            format: "qcow2".into(),
            ..CheckReport::default()
        }
    }

    /// The exit code `qemu-img check` would use: 1 when the check itself failed
    /// (`check_errors`), 2 for corruptions, 3 for leaks only, 0 for a clean image.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// No corruptions, leaks or check errors.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }

    /// The JSON form, like `qemu-img check --output=json`.
    #[cfg(feature = "serde")]
    pub fn to_json(&self) -> String {
        // Serializing plain integers and strings cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// qemu-img's text before the double check of a repaired image (empty when nothing was
    /// repaired).
    pub fn repair_summary(&self) -> String {
        if self.corruptions_fixed == 0 && self.leaks_fixed == 0 {
            return String::new();
        }
        format!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    \
             {} corruptions\n\nDouble checking the fixed image now...\n",
            self.leaks_fixed, self.corruptions_fixed
        )
    }

    /// Record a finding (kept up to [`MAX_MESSAGES`]).
    pub(crate) fn note(&mut self, msg: impl Into<String>) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg.into());
        }
    }

    /// A corruption with its message.
    pub(crate) fn corruption(&mut self, msg: impl Into<String>) {
        self.corruptions += 1;
        self.note(msg);
    }

    /// A check error with its message.
    pub(crate) fn check_error(&mut self, msg: impl Into<String>) {
        self.check_errors += 1;
        self.note(msg);
    }

    /// The finding counters (not the messages, not the fragmentation info) are all zero.
    pub(crate) fn nothing_found(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
}

/// The human form, as `qemu-img check` prints it (without the messages and the repair
/// summary; see [`CheckReport::messages`] and [`CheckReport::repair_summary`]).
impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_findings(f)?;
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            let alloc = self.allocated_clusters as f64;
            writeln!(
                f,
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                self.allocated_clusters,
                self.total_clusters,
                alloc * 100.0 / self.total_clusters as f64,
                self.fragmented_clusters as f64 * 100.0 / alloc,
                self.compressed_clusters as f64 * 100.0 / alloc,
            )?;
        }
        if self.image_end_offset != 0 {
            writeln!(f, "Image end offset: {}", self.image_end_offset)?;
        }
        Ok(())
    }
}

impl CheckReport {
    /// The "No errors" line or one paragraph per kind of finding.
    fn fmt_findings(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nothing_found() {
            return writeln!(f, "No errors were found on the image.");
        }
        if self.corruptions > 0 {
            writeln!(
                f,
                "\n{} errors were found on the image.\nData may be corrupted, or further \
                 writes to the image may corrupt it.",
                self.corruptions
            )?;
        }
        if self.leaks > 0 {
            writeln!(
                f,
                "\n{} leaked clusters were found on the image.\nThis means waste of disk \
                 space, but no harm to data.",
                self.leaks
            )?;
        }
        if self.check_errors > 0 {
            writeln!(
                f,
                "\n{} internal errors have occurred during the check.",
                self.check_errors
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "serde")]
    #[test]
    fn json_leaves_out_zero_counters_like_qemu() {
        let mut r = CheckReport::new("e.qcow2");
        r.total_clusters = 1024;
        r.image_end_offset = 262144;
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "check-errors",
                "filename",
                "format",
                "image-end-offset",
                "total-clusters"
            ]
        );
    }

    #[cfg(feature = "serde")]
    #[test]
    fn parses_qemu_json() {
        let qemu = r#"{"image-end-offset": 1441792, "compressed-clusters": 1,
            "total-clusters": 1024, "corruptions": 2, "check-errors": 0, "leaks": 1,
            "allocated-clusters": 17, "filename": "a.qcow2", "format": "qcow2",
            "fragmented-clusters": 1}"#;
        let r: CheckReport = serde_json::from_str(qemu).unwrap();
        assert_eq!((r.corruptions, r.leaks, r.allocated_clusters), (2, 1, 17));
        assert_eq!(r.exit_code(), 2);
    }

    #[test]
    fn human_text_matches_qemu() {
        let mut r = CheckReport::new("a");
        r.total_clusters = 1024;
        r.allocated_clusters = 17;
        r.fragmented_clusters = 1;
        r.compressed_clusters = 1;
        r.image_end_offset = 1441792;
        assert_eq!(
            r.to_string(),
            "No errors were found on the image.\n\
             17/1024 = 1.66% allocated, 5.88% fragmented, 5.88% compressed clusters\n\
             Image end offset: 1441792\n"
        );
        r.leaks = 3;
        assert!(r.to_string().starts_with(
            "\n3 leaked clusters were found on the image.\nThis means waste of disk space, \
             but no harm to data.\n17/1024"
        ));
        assert_eq!(r.exit_code(), 3);
    }

    #[test]
    fn exit_codes() {
        let mut r = CheckReport::new("a");
        assert_eq!(r.exit_code(), 0);
        r.leaks = 1;
        r.corruptions = 1;
        assert_eq!(r.exit_code(), 2);
        r.check_errors = 1;
        assert_eq!(r.exit_code(), 1);
    }
}
