//! [`CryptStorage`]: a [`Storage`] wrapper over an image's data file that encrypts every
//! write and decrypts every read with the LUKS data cipher, the IV of each 512-byte sector
//! being its offset in this storage / 512 (qcow2 LUKS uses host offsets).
//!
//! Requests that start or end inside a sector read, decrypt, patch and re-encrypt that
//! sector. Two such requests on different bytes of one sector (two small in-place guest
//! writes side by side) would lose one another's bytes, so a partial sector is rewritten
//! under a lock for its sector (striped: 64 locks, taken in increasing order). A request that
//! covers whole sectors needs no lock: no other request that does not overlap it in bytes
//! can touch those sectors.

use std::io;
use std::sync::Arc;

use tokio::sync::{Mutex, MutexGuard};

use super::cipher::{SECTOR, SectorCipher};
use crate::storage::{IoFuture, Storage};

const S: u64 = SECTOR as u64;
/// Number of striped partial-sector locks.
const LOCKS: usize = 64;
/// Zeroes are encrypted and written in pieces of this size (bounded memory).
const ZERO_CHUNK: u64 = 1 << 20;

/// Encrypting storage for LUKS-encrypted guest data.
pub(crate) struct CryptStorage {
    inner: Arc<dyn Storage>,
    cipher: Arc<SectorCipher>,
    locks: Vec<Mutex<()>>,
}

impl std::fmt::Debug for CryptStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptStorage")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl CryptStorage {
    /// Wrap `inner`, encrypting with `cipher`.
    pub(crate) fn new(inner: Arc<dyn Storage>, cipher: Arc<SectorCipher>) -> CryptStorage {
        CryptStorage {
            inner,
            cipher,
            locks: (0..LOCKS).map(|_| Mutex::new(())).collect(),
        }
    }

    async fn read(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let (start, end) = (off / S * S, (off + buf.len() as u64).div_ceil(S) * S);
        if start == off && end == off + buf.len() as u64 {
            self.inner.read_at(buf, off).await?;
            self.cipher.decrypt(buf, off / S);
            return Ok(());
        }
        let mut tmp = vec![0u8; to_usize(end - start)?];
        self.inner.read_at(&mut tmp, start).await?;
        self.cipher.decrypt(&mut tmp, start / S);
        let at = to_usize(off - start)?;
        buf.copy_from_slice(&tmp[at..at + buf.len()]);
        Ok(())
    }

    async fn write(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let end = off + buf.len() as u64;
        let (start, aend) = (off / S * S, end.div_ceil(S) * S);
        let mut tmp = vec![0u8; to_usize(aend - start)?];
        let head_partial = off != start;
        let tail_partial = end != aend;
        // Lock the partial sectors (in increasing stripe order), then read them back.
        let _guards = self
            .lock_sectors(
                head_partial.then_some(start / S),
                tail_partial.then_some(aend / S - 1),
            )
            .await;
        if head_partial {
            self.read(&mut tmp[..SECTOR], start).await?;
        }
        if tail_partial && (aend - S > start || !head_partial) {
            let at = tmp.len() - SECTOR;
            self.read(&mut tmp[at..], aend - S).await?;
        }
        let at = to_usize(off - start)?;
        tmp[at..at + buf.len()].copy_from_slice(buf);
        self.cipher.encrypt(&mut tmp, start / S);
        self.inner.write_at(&tmp, start).await
    }

    async fn lock_sectors(&self, a: Option<u64>, b: Option<u64>) -> Vec<MutexGuard<'_, ()>> {
        let stripe = |s: u64| crate::units::to_usize(s % LOCKS as u64);
        let mut idx: Vec<usize> = a.into_iter().chain(b).map(stripe).collect();
        idx.sort_unstable();
        idx.dedup();
        let mut guards = Vec::with_capacity(idx.len());
        for i in idx {
            guards.push(self.locks[i].lock().await);
        }
        guards
    }

    async fn zeroes(&self, mut off: u64, len: u64) -> io::Result<()> {
        let end = off
            .checked_add(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows"))?;
        let zeros = vec![0u8; to_usize(ZERO_CHUNK.min(len))?];
        while off < end {
            let n = (end - off).min(ZERO_CHUNK);
            self.write(&zeros[..to_usize(n)?], off).await?;
            off += n;
        }
        Ok(())
    }
}

fn to_usize(x: u64) -> io::Result<usize> {
    usize::try_from(x).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "request too large"))
}

impl Storage for CryptStorage {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], offset: u64) -> IoFuture<'a, ()> {
        Box::pin(self.read(buf, offset))
    }
    fn write_at<'a>(&'a self, buf: &'a [u8], offset: u64) -> IoFuture<'a, ()> {
        Box::pin(self.write(buf, offset))
    }
    /// Zeroes of an encrypted image are encrypted zeroes: a hole would decrypt to noise.
    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.zeroes(offset, len))
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.inner.flush()
    }
    fn len(&self) -> IoFuture<'_, u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        self.inner.set_len(len)
    }
    fn path(&self) -> Option<&std::path::Path> {
        self.inner.path()
    }
    fn grows_ahead(&self) -> bool {
        self.inner.grows_ahead()
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, (bool, u64)> {
        self.inner.block_status(offset, len)
    }
    fn allocated_size(&self) -> IoFuture<'_, Option<u64>> {
        self.inner.allocated_size()
    }
    fn release_locks(&self) -> io::Result<()> {
        self.inner.release_locks()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::cipher::{CipherAlg, CipherMode, CipherSpec, IvGen};
    use crate::storage::MemoryStorage;

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        futures_lite::future::block_on(f)
    }

    /// Unaligned writes and reads through the wrapper match a plaintext shadow, and the
    /// bytes underneath are the shadow encrypted sector by sector at their own offsets.
    #[test]
    fn unaligned_io_matches_a_shadow() {
        let spec = CipherSpec {
            alg: CipherAlg::Aes256,
            mode: CipherMode::Xts,
            ivgen: IvGen::Plain64,
        };
        let cipher = Arc::new(SectorCipher::new(&spec, &[7u8; 64]).unwrap());
        let mem: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let c = CryptStorage::new(mem.clone(), cipher.clone());
        let mut shadow = vec![0u8; 8192];
        run(c.write_zeroes(0, 8192)).unwrap();
        for (i, (off, len)) in [(0, 512), (700, 5), (1000, 3000), (4095, 2), (511, 1)]
            .iter()
            .enumerate()
        {
            let data = vec![i as u8 + 1; *len];
            run(c.write_at(&data, *off)).unwrap();
            shadow[*off as usize..*off as usize + len].copy_from_slice(&data);
        }
        let mut back = vec![0u8; 8192];
        run(c.read_at(&mut back, 0)).unwrap();
        assert_eq!(back, shadow);
        let mut piece = vec![0u8; 9];
        run(c.read_at(&mut piece, 996)).unwrap();
        assert_eq!(piece, shadow[996..1005]);
        let mut raw = vec![0u8; 8192];
        run(mem.read_at(&mut raw, 0)).unwrap();
        let mut expect = shadow.clone();
        cipher.encrypt(&mut expect, 0);
        assert_eq!(raw, expect);
    }
}
