//! `qcow2 dump`'s table listings: L1 entries, L2 entries, refcount table and refcounts.
//! Sizes come from the (untrusted) header, so reads are capped by the file length and the
//! format's limits, and each listing stops after a line budget.

use std::collections::HashSet;

use anyhow::Result;
use qcow2_engine::Storage;
use qcow2_engine::format::header::{Header, MAX_L1_BYTES, MAX_REFCOUNT_TABLE_BYTES};
use qcow2_engine::format::l2::{self, L2Entry, L2Geometry};
use qcow2_engine::format::{l1, refcount};

/// Counts printed lines; past the limit, lines are dropped and one note says so.
pub struct Budget {
    limit: u64,
    used: u64,
}

impl Budget {
    pub fn new(limit: u64) -> Self {
        Budget { limit, used: 0 }
    }

    /// Start a new listing.
    fn reset(&mut self) {
        self.used = 0;
    }

    /// Print `line` if the budget allows; false once exhausted.
    fn line(&mut self, line: impl FnOnce() -> String) -> bool {
        self.used += 1;
        if self.used <= self.limit {
            outln!("{}", line());
        } else if self.used == self.limit + 1 {
            outln!("    ... (more lines left out; raise --limit)");
        }
        self.used <= self.limit
    }
}

/// Read `len` bytes at `off`, cut to what the file holds.
async fn read_capped(file: &dyn Storage, off: u64, len: u64, file_len: u64) -> Result<Vec<u8>> {
    let len = len.min(file_len.saturating_sub(off));
    let mut buf = vec![0u8; len as usize];
    if len > 0 {
        file.read_at(&mut buf, off).await?;
    }
    Ok(buf)
}

/// The non-zero L1 entries and, with `l2`, each referenced L2 table's entries.
pub async fn dump_l1_l2(
    file: &dyn Storage,
    h: &Header,
    file_len: u64,
    l2: bool,
    budget: &mut Budget,
) -> Result<()> {
    let want = (u64::from(h.l1_size) * 8).min(MAX_L1_BYTES);
    let buf = read_capped(file, h.l1_table_offset, want, file_len).await?;
    let entries = l1::parse_table(&buf);
    outln!(
        "L1 table at {:#x}: {} entries ({} readable)",
        h.l1_table_offset,
        h.l1_size,
        entries.len()
    );
    budget.reset();
    let mut tables = Vec::new();
    for (i, e) in entries.iter().enumerate().filter(|(_, e)| e.0 != 0) {
        let l2_off = e.l2_offset().map_or(0, |o| o.0);
        let bad = e
            .validate(h.cluster_size())
            .err()
            .map(|e| format!(" [{}]", e.what()));
        let copied = if e.copied() { " copied" } else { "" };
        budget.line(|| {
            format!(
                "    L1[{i}] = {:#018x}: L2 table at {l2_off:#x}{copied}{}",
                e.0,
                bad.unwrap_or_default()
            )
        });
        if l2_off != 0 {
            tables.push((i as u64, l2_off));
        }
    }
    if l2 {
        dump_l2_tables(file, h, file_len, &tables, budget).await?;
    }
    Ok(())
}

async fn dump_l2_tables(
    file: &dyn Storage,
    h: &Header,
    file_len: u64,
    tables: &[(u64, u64)],
    budget: &mut Budget,
) -> Result<()> {
    let geo = L2Geometry {
        cluster_bits: h.cluster_bits,
        extended: h.extended_l2(),
        version3: h.version >= 3,
    };
    let per_table = geo.entries_per_cluster();
    let mut seen = HashSet::new();
    budget.reset();
    for &(l1_index, off) in tables {
        if !seen.insert(off) {
            budget.line(|| {
                format!("L2 table at {off:#x} (L1[{l1_index}]): shared with an earlier L1 entry")
            });
            continue;
        }
        if !budget.line(|| format!("L2 table at {off:#x} (L1[{l1_index}]):")) {
            return Ok(());
        }
        let buf = read_capped(file, off, geo.cluster_size(), file_len).await?;
        for j in 0..per_table {
            let Some((raw, bitmap)) = l2::read_raw(&buf, j as usize, &geo) else {
                break;
            };
            if raw == 0 && bitmap.0 == 0 {
                continue;
            }
            let guest = (l1_index * per_table + j) << h.cluster_bits;
            let text = describe_l2(raw, bitmap, &geo, h.has_external_data_file());
            if !budget.line(|| format!("    L2[{j}] guest {guest:#x}: {text}")) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// One L2 entry in words.
fn describe_l2(raw: u64, bitmap: l2::SubclusterBitmap, geo: &L2Geometry, external: bool) -> String {
    let decoded = match external {
        true => L2Entry::decode_external(raw, geo),
        false => L2Entry::decode(raw, geo),
    };
    let mut s = match decoded {
        Err(e) => format!("raw {raw:#018x} [{}]", e.what()),
        Ok(L2Entry::Unallocated) => "unallocated".to_string(),
        Ok(L2Entry::Zero { host: None, .. }) => "zero".to_string(),
        Ok(L2Entry::Zero {
            host: Some(h),
            copied,
        }) => {
            format!(
                "zero, preallocated at {:#x}{}",
                h.0,
                if copied { " copied" } else { "" }
            )
        }
        Ok(L2Entry::Normal { host, copied }) => {
            format!(
                "data at {:#x}{}",
                host.0,
                if copied { " copied" } else { "" }
            )
        }
        Ok(L2Entry::Compressed(d)) => format!(
            "compressed at {:#x}, {} bytes to read ({} extra sectors)",
            d.host.0,
            d.read_len(),
            d.sectors
        ),
    };
    if l2::reserved_bits(raw, geo) != 0 {
        s.push_str(&format!(
            " [reserved bits {:#x}]",
            l2::reserved_bits(raw, geo)
        ));
    }
    if geo.extended {
        s.push_str(&format!(
            "; subclusters alloc {:#010x} zero {:#010x}",
            bitmap.alloc_bits(),
            bitmap.zero_bits()
        ));
    }
    s
}

/// The refcount table's entries and the non-zero refcounts, as runs of equal values.
pub async fn dump_refcounts(
    file: &dyn Storage,
    h: &Header,
    file_len: u64,
    budget: &mut Budget,
) -> Result<()> {
    let want =
        (u64::from(h.refcount_table_clusters) << h.cluster_bits).min(MAX_REFCOUNT_TABLE_BYTES);
    let buf = read_capped(file, h.refcount_table_offset, want, file_len).await?;
    let table = refcount::parse_table(&buf);
    outln!(
        "refcount table at {:#x}: {} entries readable",
        h.refcount_table_offset,
        table.len()
    );
    let per_block = refcount::entries_per_block(h.cluster_size(), h.refcount_order);
    budget.reset();
    let mut seen = HashSet::new();
    for (i, e) in table.iter().enumerate().filter(|(_, e)| e.0 != 0) {
        let Some(block) = e.block_offset() else {
            continue;
        };
        let shared = !seen.insert(block.0);
        let note = if shared {
            " (shared with an earlier entry)"
        } else {
            ""
        };
        if !budget.line(|| format!("    refcount block {i} at {:#x}{note}:", block.0)) {
            return Ok(());
        }
        if shared {
            continue;
        }
        let data = read_capped(file, block.0, h.cluster_size(), file_len).await?;
        let first = i as u64 * per_block;
        if !print_runs(&data, first, per_block, h, budget) {
            return Ok(());
        }
    }
    Ok(())
}

/// Print runs of equal non-zero refcounts of one block; false when the budget ran out.
fn print_runs(data: &[u8], first: u64, per_block: u64, h: &Header, budget: &mut Budget) -> bool {
    let mut run: Option<(u64, u64, u64)> = None; // (start, end, value)
    let flush = |r: Option<(u64, u64, u64)>, budget: &mut Budget| match r {
        Some((s, e, v)) if v != 0 => budget.line(|| {
            let cs = h.cluster_bits;
            format!(
                "        clusters {s}..{e} (host {:#x}..{:#x}): refcount {v}",
                s << cs,
                (e + 1) << cs
            )
        }),
        _ => true,
    };
    let width = 1u64 << h.refcount_order.min(6);
    for k in 0..per_block.min(data.len() as u64 * 8 / width) {
        let v = refcount::get(data, k, h.refcount_order);
        let c = first + k;
        run = match run {
            Some((s, _, rv)) if rv == v => Some((s, c, v)),
            other => {
                if !flush(other, budget) {
                    return false;
                }
                Some((c, c, v))
            }
        };
    }
    flush(run, budget)
}
