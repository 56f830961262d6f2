//! Rewriting cluster 0 (header, extensions, backing file name) of an open image, for the
//! operations that change what the header names: rebase (backing file and format) and amend.
//!
//! The order is the one every metadata switch follows: everything written before is flushed
//! (data and metadata in soft-update order, fsynced), then cluster 0 is written whole and
//! fsynced, then the in-memory copy is replaced. The fixed header fields sit in the first
//! sector; the backing name and extensions follow, as QEMU writes them.

use super::Image;
use crate::error::Result;
use crate::format::extensions::ImageHeader;

impl Image {
    /// Apply `update` to a copy of the header and write the result as cluster 0 (see the
    /// module docs). `update` may refuse the change; then nothing is written.
    pub(crate) async fn rewrite_header(
        &self,
        update: impl FnOnce(&mut ImageHeader) -> Result<()>,
    ) -> Result<()> {
        let w = self.write_state()?;
        let _one = w.lock_flush().await;
        self.flush_held().await?;
        let mut ih = self.inner.header.lock().unwrap().clone();
        update(&mut ih)?;
        let bytes = ih.to_cluster0()?;
        // Parsing back gives the in-memory copy the backing name fields as written.
        let ih = ImageHeader::parse(&bytes)?;
        w.meta().write(&bytes, 0, "rewriting the header").await?;
        w.meta().sync("syncing the header").await?;
        *self.inner.header.lock().unwrap() = ih;
        Ok(())
    }
}
