//! The one reader of cluster 0 (header, extensions, backing file name) from storage, shared by
//! the open path, `check` and the CLI's `info`.

#![deny(clippy::cast_possible_truncation)]

use crate::error::{Error, Result};
use crate::format::extensions::ImageHeader;
use crate::format::header::{Header, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use crate::storage::Storage;

/// Bytes read first: the whole header of any image whose cluster is at most this size; larger
/// clusters are read whole in a second step once `cluster_bits` is known to be sane.
const FIRST_READ: usize = 4096;

/// Read and decode cluster 0 of a qcow2 file. Only what decoding needs is checked (magic,
/// version, header length, `cluster_bits` in 9..=21, extensions within the cluster): call
/// [`ImageHeader::validate`] before trusting the result. The allocation is bounded by the
/// largest cluster size (2 MiB).
///
/// ```no_run
/// # async fn demo(file: &dyn qcow2_engine::Storage) -> qcow2_engine::Result<()> {
/// let ih = qcow2_engine::image::read_cluster0(file).await?;
/// let len = file.len().await.map_err(|e| qcow2_engine::Error::io("file length", e))?;
/// ih.validate(len)?;
/// # Ok(()) }
/// ```
pub async fn read_cluster0(file: &dyn Storage) -> Result<ImageHeader> {
    let mut first = vec![0u8; FIRST_READ];
    file.read_at(&mut first, 0)
        .await
        .map_err(|e| Error::io("reading the header", e))?;
    let header = Header::from_bytes(&first)?;
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&header.cluster_bits) {
        return Err(Error::invalid(format!(
            "cluster_bits {} out of range {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}",
            header.cluster_bits
        )));
    }
    let cluster_size = 1usize << header.cluster_bits;
    let mut cluster0 = first;
    cluster0.resize(cluster_size, 0);
    if cluster_size > FIRST_READ {
        file.read_at(&mut cluster0[FIRST_READ..], FIRST_READ as u64)
            .await
            .map_err(|e| Error::io("reading the header cluster", e))?;
    }
    ImageHeader::parse(&cluster0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    #[tokio::test]
    async fn refuses_cluster_bits_before_sizing_a_buffer_by_them() {
        let mut h = vec![0u8; 104];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&40u32.to_be_bytes()); // a 1 TiB cluster
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        let err = read_cluster0(&MemoryStorage::from_vec(h))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("cluster_bits 40 out of range"),
            "{err}"
        );
    }
}
