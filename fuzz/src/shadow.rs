//! [`Shadow`]: what the guest disk must read as, byte by byte, where we know it.

use qcow2_engine::image::Image;

/// Reads go in pieces of this size.
const CHUNK: usize = 64 << 10;
/// A chunk that fails to read is read again in pieces of this size, so that one bad
/// compressed cluster does not hide its neighbours.
const SECTOR: usize = 512;

/// Read `buf.len()` bytes at guest offset `start`: the whole chunk, or where that fails, each
/// sector that reads. Returns (guest offset, bytes) runs.
async fn read_chunk<'a>(img: &Image, buf: &'a mut [u8], start: usize) -> Vec<(usize, &'a [u8])> {
    if img.read_at(buf, start as u64).await.is_ok() {
        return vec![(start, &*buf)];
    }
    let mut ok = Vec::new();
    for (i, sector) in buf.chunks_mut(SECTOR).enumerate() {
        let off = start + i * SECTOR;
        if img.read_at(sector, off as u64).await.is_ok() {
            ok.push((off, &*sector));
        }
    }
    ok
}

/// The expected content of a virtual disk; `None` where an operation failed or the content
/// may legitimately be either of two things (discard, grown area).
#[derive(Debug, Clone)]
pub struct Shadow {
    bytes: Vec<Option<u8>>,
}

impl Shadow {
    /// The current content of `img` (sectors that fail to read are unknown).
    pub async fn load(img: &Image) -> Shadow {
        let size = img.virtual_size() as usize;
        let mut bytes = vec![None; size];
        let mut buf = vec![0u8; CHUNK];
        for start in (0..size).step_by(CHUNK) {
            let n = CHUNK.min(size - start);
            for (off, data) in read_chunk(img, &mut buf[..n], start).await {
                for (s, b) in bytes[off..off + data.len()].iter_mut().zip(data) {
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
            let n = CHUNK.min(self.bytes.len() - start);
            let mut read = 0;
            for (off, data) in read_chunk(img, &mut buf[..n], start).await {
                self.compare(off as u64, data, "after reopening");
                read += data.len();
            }
            if read < n {
                self.assert_unknown_unread(img, start, n).await;
            }
        }
    }

    /// After a chunk failed to read: every sector that fails must be all unknown.
    async fn assert_unknown_unread(&self, img: &Image, start: usize, n: usize) {
        let mut sector = [0u8; SECTOR];
        for off in (start..start + n).step_by(SECTOR) {
            let len = SECTOR.min(start + n - off);
            if let Err(e) = img.read_at(&mut sector[..len], off as u64).await {
                let known = self.bytes[off..off + len].iter().any(Option::is_some);
                assert!(
                    !known,
                    "reading back known bytes at guest offset {off}: {e}"
                );
            }
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
