//! Probe safety for raw images whose format was guessed: a write must not turn block 0 into
//! something that probes as another format. Otherwise whoever writes the disk (an NBD client, a
//! guest) could plant a qcow2 header naming any host file as its backing file, and the next
//! open that probes would follow it. qemu-nbd and qemu-io refuse such writes with EPERM.

use crate::Storage;
use crate::error::{Error, ErrorKind, Result};
use crate::format::probe;
use crate::units::to_usize;

/// Bytes of block 0 that format probing looks at.
pub const PROBE_BYTES: u64 = 512;

/// Fail with [`ErrorKind::Refused`] if writing `buf` at `offset` of the raw `storage` would make
/// it probe as another format. Writes past block 0 are always allowed.
pub async fn check_probed_raw_write(storage: &dyn Storage, buf: &[u8], offset: u64) -> Result<()> {
    if offset >= PROBE_BYTES {
        return Ok(());
    }
    let mut block0 = vec![0u8; to_usize(PROBE_BYTES)];
    storage
        .read_at(&mut block0, 0)
        .await
        .map_err(|e| Error::io("reading block 0", e))?;
    let at = to_usize(offset);
    let n = buf.len().min(block0.len() - at);
    block0[at..at + n].copy_from_slice(&buf[..n]);
    // Any other answer, including formats we cannot read (vmdk, luks, ...), would change how
    // the next probing open sees the file.
    match probe::probe(&block0, None) {
        "raw" => Ok(()),
        other => Err(Error::new(
            ErrorKind::Refused,
            format!(
                "writing block 0 of a raw image whose format was probed would make it probe as \
                 {other} (give the format explicitly to allow this)"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    #[tokio::test]
    async fn qcow2_magic_in_block0_is_refused() {
        let s = MemoryStorage::from_vec(vec![0u8; 4096]);
        // A qcow2 magic and version: what QEMU's qcow2 probe looks for.
        let qcow2 = b"QFI\xfb\0\0\0\x03";
        let e = check_probed_raw_write(&s, qcow2, 0).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused);
        // Completing the magic from a write that starts inside it is caught too.
        s.write_at(b"Q", 0).await.unwrap();
        assert!(check_probed_raw_write(&s, &qcow2[1..], 1).await.is_err());
        // The magic with version 0 probes as raw (for QEMU too), and past block 0 is free.
        check_probed_raw_write(&s, b"QFI\xfb", 0).await.unwrap();
        check_probed_raw_write(&s, qcow2, 512).await.unwrap();
        check_probed_raw_write(&s, &[0x51; 512], 0).await.unwrap();
    }
}
