//! [`Shadow`]: what the guest disk must read as, byte by byte, where we know it.

use qcow2_rs::image::Image;

/// Reads go in pieces of this size.
const CHUNK: usize = 64 << 10;

/// The expected content of a virtual disk; `None` where an operation failed or the content
/// may legitimately be either of two things (discard, grown area).
#[derive(Debug, Clone)]
pub struct Shadow {
    bytes: Vec<Option<u8>>,
}

impl Shadow {
    /// The current content of `img` (chunks that fail to read are unknown).
    pub async fn load(img: &Image) -> Shadow {
        let size = img.virtual_size() as usize;
        let mut bytes = vec![None; size];
        let mut buf = vec![0u8; CHUNK];
        for start in (0..size).step_by(CHUNK) {
            let n = CHUNK.min(size - start);
            if img.read_at(&mut buf[..n], start as u64).await.is_ok() {
                for (s, b) in bytes[start..start + n].iter_mut().zip(&buf[..n]) {
                    *s = Some(*b);
                }
            }
        }
        Shadow { bytes }
    }

    /// The disk size the shadow describes.
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Whether the shadow is of an empty disk.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// `data` was written at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        for (s, b) in self.range(offset, data.len() as u64).iter_mut().zip(data) {
            *s = Some(*b);
        }
    }

    /// `[offset, offset + len)` was set to `value` (`None`: unknown).
    pub fn fill(&mut self, offset: u64, len: u64, value: Option<u8>) {
        self.range(offset, len).fill(value);
    }

    /// The disk was resized; bytes past the old end are unknown.
    pub fn resize(&mut self, size: u64) {
        self.bytes.resize(size as usize, None);
    }

    /// Panic at the first known byte `img` reads differently, or that fails to read.
    pub async fn verify(&self, img: &Image) {
        assert_eq!(img.virtual_size(), self.len(), "virtual size after reopen");
        let mut buf = vec![0u8; CHUNK];
        for start in (0..self.bytes.len()).step_by(CHUNK) {
            let want = &self.bytes[start..(start + CHUNK).min(self.bytes.len())];
            if want.iter().all(Option::is_none) {
                continue;
            }
            let got = &mut buf[..want.len()];
            if let Err(e) = img.read_at(got, start as u64).await {
                panic!("reading back {} bytes at {start}: {e}", got.len());
            }
            self.compare(start as u64, got, "after reopening");
        }
    }

    /// Panic if `got`, read at `offset`, differs from a byte the shadow knows.
    pub fn compare(&self, offset: u64, got: &[u8], when: &str) {
        let start = offset.min(self.len()) as usize;
        for (i, (w, g)) in self.bytes[start..].iter().zip(got).enumerate() {
            if let Some(w) = w {
                assert_eq!(w, g, "byte at guest offset {} {when}", start + i);
            }
        }
    }

    /// The part of the shadow `[offset, offset + len)` covers (clipped to the disk).
    fn range(&mut self, offset: u64, len: u64) -> &mut [Option<u8>] {
        let end = offset.saturating_add(len).min(self.len()) as usize;
        let start = (offset.min(self.len()) as usize).min(end);
        &mut self.bytes[start..end]
    }
}
