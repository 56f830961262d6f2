//! The in-memory bits of one bitmap: one bit per granularity chunk of the guest disk.
//!
//! Bits live in blocks of [`BLOCK_WORDS`] atomic words that are allocated on first use, so a
//! bitmap of a big, mostly clean disk costs little memory, and the write path sets bits with
//! one `fetch_or` per word under a shared lock (no IO, no waiting on other writers).
//!
//! Bit `i` is bit `i % 64` of word `i / 64`; on disk (qcow2.txt, "Bitmap data") bit `i` is bit
//! `i % 8` of byte `i / 8`, so a word is its 8 bytes least significant first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock};

/// Words per lazily allocated block (4 KiB: 32768 bits).
const BLOCK_WORDS: u64 = 512;
/// Bits per block.
const BLOCK_BITS: u64 = BLOCK_WORDS * 64;

type Block = Box<[AtomicU64]>;

/// A growable bit set of a fixed logical length (see the module docs).
#[derive(Debug)]
pub(crate) struct DirtyBits {
    /// (length in bits, blocks); the length changes only on resize.
    inner: RwLock<(u64, Vec<OnceLock<Block>>)>,
}

fn new_block() -> Block {
    (0..BLOCK_WORDS).map(|_| AtomicU64::new(0)).collect()
}

/// Blocks needed for `bits` bits.
fn blocks_for(bits: u64) -> usize {
    // Callers bound `bits` to 2^32 (QEMU's limit): at most 2^17 blocks.
    usize::try_from(bits.div_ceil(BLOCK_BITS)).unwrap_or(usize::MAX)
}

impl DirtyBits {
    /// `bits` clear bits.
    pub fn new(bits: u64) -> Self {
        let blocks = (0..blocks_for(bits)).map(|_| OnceLock::new()).collect();
        DirtyBits {
            inner: RwLock::new((bits, blocks)),
        }
    }

    /// Set bits `[first, end)` (clamped to the length).
    pub fn set_range(&self, first: u64, end: u64) {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let end = end.min(g.0);
        let mut bit = first;
        while bit < end {
            let (w, b) = (bit / 64, bit % 64);
            let n = (64 - b).min(end - bit);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << b
            };
            if let Some(a) = word(&g.1, w, true) {
                a.fetch_or(mask, Ordering::Relaxed);
            }
            bit += n;
        }
    }

    /// Clear every bit.
    pub fn clear(&self) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        g.1.iter_mut().for_each(|b| *b = OnceLock::new());
    }

    /// Change the length; bits past a smaller length are dropped.
    pub fn resize(&self, bits: u64) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let old = g.0;
        g.1.resize_with(blocks_for(bits), OnceLock::new);
        g.0 = bits;
        drop(g);
        if bits < old {
            self.clear_from(bits);
        }
    }

    /// Clear the bits from `bit` to the end of its block (the blocks after it are gone).
    fn clear_from(&self, bit: u64) {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let block_end = bit.next_multiple_of(BLOCK_BITS);
        let mut b = bit;
        while b < block_end {
            let (w, off) = (b / 64, b % 64);
            let keep = (1u64 << off) - 1;
            if let Some(a) = word(&g.1, w, false) {
                a.fetch_and(keep, Ordering::Relaxed);
            }
            b = (w + 1) * 64;
        }
    }

    /// Whether bit `bit` is set.
    #[cfg(test)]
    pub fn get(&self, bit: u64) -> bool {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        bit < g.0
            && word(&g.1, bit / 64, false)
                .is_some_and(|a| a.load(Ordering::Relaxed) & (1 << (bit % 64)) != 0)
    }

    /// OR `bytes` (on-disk order) into the bits starting at byte `byte_off` (a multiple of 8);
    /// bits past the length are ignored.
    pub fn or_bytes(&self, byte_off: u64, bytes: &[u8]) {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let v = chunk
                .iter()
                .enumerate()
                .fold(0u64, |v, (k, &b)| v | u64::from(b) << (8 * k));
            let w = byte_off / 8 + i as u64;
            if v != 0 && w * 64 < g.0 {
                if let Some(a) = word(&g.1, w, true) {
                    a.fetch_or(v & tail_mask(g.0, w), Ordering::Relaxed);
                }
            }
        }
    }

    /// `len` bytes of bits (on-disk order) from byte `byte_off` (a multiple of 8); zeros past
    /// the length.
    pub fn to_bytes(&self, byte_off: u64, len: usize) -> Vec<u8> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let mut out = vec![0u8; len];
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            let w = byte_off / 8 + i as u64;
            if let Some(a) = word(&g.1, w, false) {
                let v = a.load(Ordering::Relaxed);
                for (k, b) in chunk.iter_mut().enumerate() {
                    // Byte k of the word, least significant first: keeping the low byte is
                    // the point.
                    #[allow(clippy::cast_possible_truncation)]
                    let byte = (v >> (8 * k)) as u8;
                    *b = byte;
                }
            }
        }
        out
    }

    /// Whether no bit is set.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.extents().is_empty()
    }

    /// OR every bit of `other` into this one (up to this one's length).
    #[cfg(test)]
    pub fn merge(&self, other: &DirtyBits) {
        for (first, end) in other.extents() {
            self.set_range(first, end);
        }
    }

    /// The runs of set bits, as `[first, end)` bit ranges in order.
    #[cfg(test)]
    pub fn extents(&self) -> Vec<(u64, u64)> {
        self.extents_in(0, u64::MAX)
    }

    /// The runs of set bits within bits `[first, end)`, clipped to it, in order. Only the
    /// words of that range are read, so a small range of a big bitmap costs little.
    pub fn extents_in(&self, first: u64, end: u64) -> Vec<(u64, u64)> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let end = end.min(g.0);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut w = first / 64;
        while w.saturating_mul(64) < end {
            let Some(a) = word(&g.1, w, false) else {
                // A block never written: skip all of it.
                w = (w / BLOCK_WORDS + 1) * BLOCK_WORDS;
                continue;
            };
            let v = a.load(Ordering::Relaxed) & range_mask(w, first, end);
            push_word_runs(&mut out, w * 64, v);
            w += 1;
        }
        out
    }
}

/// The bits of word `w` that lie in bits `[first, end)`.
fn range_mask(w: u64, first: u64, end: u64) -> u64 {
    let ones = |n: u64| if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    let lo = first.saturating_sub(w * 64);
    let hi = end.saturating_sub(w * 64);
    ones(hi) & !ones(lo)
}

/// Append the runs of set bits of word value `v`, whose bit 0 is bit `base`.
fn push_word_runs(out: &mut Vec<(u64, u64)>, base: u64, mut v: u64) {
    while v != 0 {
        let start = u64::from(v.trailing_zeros());
        let run = u64::from((v >> start).trailing_ones());
        push_run(out, base + start, base + start + run);
        v = if start + run >= 64 {
            0
        } else {
            v & !((1u64 << (start + run)) - 1)
        };
    }
}

/// Append `[first, end)` to `out`, joining it to the last run when they touch.
fn push_run(out: &mut Vec<(u64, u64)>, first: u64, end: u64) {
    match out.last_mut() {
        Some(last) if last.1 == first => last.1 = end,
        _ => out.push((first, end)),
    }
}

/// The bits of word `w` that lie below the length `len`.
fn tail_mask(len: u64, w: u64) -> u64 {
    let valid = len.saturating_sub(w * 64);
    if valid >= 64 {
        u64::MAX
    } else {
        (1u64 << valid) - 1
    }
}

/// Word `w`, allocating its block when `create` (else `None` for a block never written).
fn word(blocks: &[OnceLock<Block>], w: u64, create: bool) -> Option<&AtomicU64> {
    let block = blocks.get(usize::try_from(w / BLOCK_WORDS).ok()?)?;
    let b = match create {
        true => block.get_or_init(new_block),
        false => block.get()?,
    };
    b.get(usize::try_from(w % BLOCK_WORDS).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_set_across_words_and_blocks() {
        let d = DirtyBits::new(100_000);
        d.set_range(60, 70);
        d.set_range(BLOCK_BITS - 1, BLOCK_BITS + 1);
        d.set_range(99_990, 200_000); // clamped
        assert_eq!(
            d.extents(),
            vec![
                (60, 70),
                (BLOCK_BITS - 1, BLOCK_BITS + 1),
                (99_990, 100_000)
            ]
        );
        assert!(d.get(69) && !d.get(70) && !d.get(100_000));
    }

    #[test]
    fn ranged_extents_are_clipped_and_skip_empty_blocks() {
        let d = DirtyBits::new(3 * BLOCK_BITS);
        d.set_range(10, 200);
        d.set_range(2 * BLOCK_BITS + 5, 2 * BLOCK_BITS + 7);
        assert_eq!(d.extents_in(70, 130), vec![(70, 130)]);
        assert_eq!(d.extents_in(0, 10), vec![]);
        assert_eq!(d.extents_in(199, BLOCK_BITS), vec![(199, 200)]);
        assert_eq!(
            d.extents_in(150, u64::MAX),
            vec![(150, 200), (2 * BLOCK_BITS + 5, 2 * BLOCK_BITS + 7)]
        );
        assert_eq!(d.extents_in(2 * BLOCK_BITS + 6, 2 * BLOCK_BITS + 6), vec![]);
    }

    #[test]
    fn bytes_are_least_significant_bit_first() {
        let d = DirtyBits::new(20);
        d.or_bytes(0, &[0b1000_0001, 0xff, 0xff]); // bits past 20 are ignored
        assert_eq!(d.extents(), vec![(0, 1), (7, 20)]);
        assert_eq!(d.to_bytes(0, 4), vec![0x81, 0xff, 0x0f, 0]);
    }

    #[test]
    fn shrink_drops_bits_and_merge_ors() {
        let d = DirtyBits::new(1000);
        d.set_range(0, 1000);
        d.resize(10);
        d.resize(1000);
        assert_eq!(d.extents(), vec![(0, 10)]);
        let e = DirtyBits::new(1000);
        e.set_range(500, 501);
        d.merge(&e);
        assert_eq!(d.extents(), vec![(0, 10), (500, 501)]);
        d.clear();
        assert!(d.is_empty());
    }
}
