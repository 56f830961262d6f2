//! The references one L1 table holds: its L2 tables and every host cluster they map (data
//! clusters, preallocated zero clusters, and each host cluster a compressed payload touches,
//! counted once per payload as QEMU counts them). Raising or dropping a whole tree's
//! refcounts is how snapshots share and let go of clusters.

use std::collections::{BTreeMap, BTreeSet};

use super::super::Image;
use crate::alloc::Kinds;
use crate::error::{Error, Result};
use crate::format::l1::{self, L1Entry};
use crate::format::l2::{self, L2Entry};
use crate::units::ClusterIndex;
use crate::units::to_usize;

/// Every reference held by one L1 table.
#[derive(Debug, Default)]
pub(super) struct Tree {
    /// Host offsets of its L2 tables, in L1 order (each at most once).
    pub l2_tables: Vec<u64>,
    /// Host cluster index → references held (L2 tables and what they map).
    pub refs: BTreeMap<u64, u64>,
}

impl Tree {
    /// Count `n` more references to host cluster `c`.
    pub fn add(&mut self, c: u64, n: u64) {
        *self.refs.entry(c).or_insert(0) += n;
    }

    /// Going from `old` to `new`: the references to add and the references to drop. A
    /// cluster both use changes only by the difference, so a refcount at the width's limit
    /// does not overflow on the way (QEMU raises first and fails there). The L2 table lists
    /// stay whole: `new`'s in the first, `old`'s in the second.
    pub fn diff(new: Tree, old: Tree) -> (Tree, Tree) {
        let net = |a: &Tree, b: &Tree| {
            a.refs
                .iter()
                .filter_map(|(&c, &n)| {
                    let m = b.refs.get(&c).copied().unwrap_or(0);
                    (n > m).then(|| (c, n - m))
                })
                .collect()
        };
        let up = net(&new, &old);
        let down = net(&old, &new);
        let up = Tree {
            l2_tables: new.l2_tables,
            refs: up,
        };
        let down = Tree {
            l2_tables: old.l2_tables,
            refs: down,
        };
        (up, down)
    }
}

/// Whether refcounts go up (sharing) or down (letting go).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    Up,
    Down,
}

impl Image {
    /// Read and validate the L1 table of `entries` entries at `offset` (a snapshot's): inside
    /// the file, every entry well-formed.
    pub(super) async fn read_l1_at(&self, offset: u64, entries: u32) -> Result<Vec<L1Entry>> {
        let len = u64::from(entries) * 8;
        let file_len = self.file_len().await?;
        if offset.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(Error::corrupt("snapshot L1 table beyond the end of the file").at(offset));
        }
        let mut buf = vec![0u8; to_usize(len)];
        self.read_meta(&mut buf, offset, "reading a snapshot L1 table")
            .await?;
        let table = l1::parse_table(&buf);
        for (i, e) in table.iter().enumerate() {
            e.validate(self.inner.geo.cluster_size)
                .map_err(|err| Error::corrupt(format!("L1 entry {i}: {}", err.what())))?;
        }
        Ok(table)
    }

    /// Read the whole L2 table at `offset` from the file (callers run after a flush, with
    /// nothing else in flight, so the file holds the current tables).
    pub(super) async fn read_l2_table(&self, offset: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; to_usize(self.inner.geo.cluster_size)];
        self.read_meta(&mut buf, offset, "reading an L2 table")
            .await?;
        Ok(buf)
    }

    /// Every reference `l1` holds. Corrupt when an L2 table or a mapped cluster lies beyond
    /// the end of the file, one L2 table appears twice (the work stays bounded by the file
    /// size whatever the tables claim), or an L2 table or a mapped cluster lies on other
    /// metadata the image knows of (changing those refcounts would free live tables).
    pub(super) async fn load_tree(&self, l1: &[L1Entry]) -> Result<Tree> {
        let file_len = self.file_len().await?;
        let cb = self.inner.geo.cluster_bits;
        let mut tree = Tree::default();
        let mut seen = BTreeSet::new();
        for l2 in l1.iter().filter_map(|e| e.l2_offset()).map(|h| h.0) {
            if l2 >= file_len || !seen.insert(l2) {
                let what = "L2 table beyond the end of the file or referenced twice";
                return Err(Error::corrupt(what).at(l2));
            }
            self.check_not_metadata(l2, 1, Kinds(Kinds::L2.0 | Kinds::SNAPSHOT_L2.0))?;
            tree.l2_tables.push(l2);
            tree.add(l2 >> cb, 1);
            let table = self.read_l2_table(l2).await?;
            self.count_l2(&table, file_len, &mut tree)
                .map_err(|e| e.at(l2))?;
        }
        Ok(tree)
    }

    /// Count the clusters one L2 table maps.
    fn count_l2(&self, table: &[u8], file_len: u64, tree: &mut Tree) -> Result<()> {
        let geo = &self.inner.geo.l2;
        let cb = geo.cluster_bits;
        for i in 0..to_usize(geo.entries_per_cluster()) {
            let Some((raw, _)) = l2::read_raw(table, i, geo) else {
                break;
            };
            match L2Entry::decode(raw, geo)? {
                L2Entry::Compressed(d) => {
                    let (first, last) = d.host_clusters(cb);
                    if last >= file_len.div_ceil(1 << cb) {
                        return Err(Error::corrupt(
                            "compressed cluster beyond the end of the file",
                        ));
                    }
                    self.check_not_metadata(first << cb, (last - first + 1) << cb, Kinds::NONE)?;
                    (first..=last).for_each(|c| tree.add(c, 1));
                }
                e => {
                    if let Some(h) = e.host() {
                        if h.0 >= file_len {
                            return Err(Error::corrupt("data cluster beyond the end of the file"));
                        }
                        self.check_not_metadata(h.0, 1, Kinds::NONE)?;
                        tree.add(h.0 >> cb, 1);
                    }
                }
            }
        }
        Ok(())
    }

    /// Corrupt when `[host, host + len)` holds metadata of a kind other than `own`.
    fn check_not_metadata(&self, host: u64, len: u64, own: Kinds) -> Result<()> {
        let map = self.write_state()?.refcounts().map();
        match map.find(host, len, own) {
            Some(k) => Err(Error::corrupt(format!(
                "a table reached from an L1 table points at the {}",
                k.name()
            ))
            .at(host)),
            None => Ok(()),
        }
    }

    /// Refuse a refcount change of `tree` that would overflow the refcount width (going up)
    /// or drop below zero (going down), before changing anything.
    pub(super) async fn check_tree(&self, tree: &Tree, dir: Direction) -> Result<()> {
        let w = self.write_state()?;
        let alloc = w.refcounts().lock().await;
        let max = w.refcounts().max_refcount();
        for (&c, &n) in &tree.refs {
            let cur = alloc.refcount(ClusterIndex(c)).await?;
            match dir {
                Direction::Up if cur.checked_add(n).is_none_or(|v| v > max) => {
                    let bits = max.count_ones();
                    return Err(Error::unsupported(format!(
                        "the refcount of cluster {c} would exceed {max}, the most \
                         refcount_bits={bits} can hold (convert the image to a wider \
                         refcount_bits first)"
                    ))
                    .at(c << self.inner.geo.cluster_bits));
                }
                Direction::Down if cur < n => {
                    return Err(Error::corrupt(format!(
                        "cluster {c} has refcount {cur} but {n} references to drop"
                    ))
                    .at(c << self.inner.geo.cluster_bits));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Apply `tree`'s references to the refcounts (in the refcount cache; the caller flushes).
    /// Clusters whose refcount reaches 0 leave the L2 cache (a freed L2 table may be cached).
    pub(super) async fn change_tree(&self, tree: &Tree, dir: Direction) -> Result<()> {
        let w = self.write_state()?;
        let cb = self.inner.geo.cluster_bits;
        let mut alloc = w.refcounts().lock().await;
        for (&c, &n) in &tree.refs {
            let delta = i64::try_from(n).map_err(|_| Error::corrupt("too many references"))?;
            let delta = if dir == Direction::Up { delta } else { -delta };
            if alloc.change_refcount(ClusterIndex(c), delta).await? == 0 {
                self.inner.l2_cache.invalidate_range(c << cb, 1 << cb);
            }
        }
        Ok(())
    }

    /// Drop one reference to each of the `len` bytes' clusters at `offset` (a table no longer
    /// referenced: an old snapshot table, a snapshot's or an old active L1 table).
    pub(super) async fn free_range(&self, offset: u64, len: u64) -> Result<()> {
        let mut tree = Tree::default();
        add_range(&mut tree, offset, len, self.inner.geo.cluster_bits);
        self.change_tree(&tree, Direction::Down).await
    }
}

/// Count one reference to each cluster of `[offset, offset + len)`.
pub(super) fn add_range(tree: &mut Tree, offset: u64, len: u64, cluster_bits: u32) {
    if len == 0 {
        return;
    }
    let (first, last) = (offset >> cluster_bits, (offset + len - 1) >> cluster_bits);
    (first..=last).for_each(|c| tree.add(c, 1));
}
