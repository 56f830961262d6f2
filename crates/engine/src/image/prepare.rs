//! Steps on a read-write open before the first write: clear autoclear feature bits we do not
//! maintain (so, e.g., persistent bitmaps are known to be stale). Dirty images (lazy
//! refcounts) have their refcounts rebuilt by `open` before this runs.

use super::Image;
use crate::error::{Error, Result};
use crate::format::features;

/// Header offset of `autoclear_features` (v3).
const AUTOCLEAR_OFFSET: u64 = 88;

impl Image {
    pub(crate) async fn prepare_for_writing(&self) -> Result<()> {
        let (version, autoclear) = {
            let h = &self.inner.header.lock().unwrap().header;
            (h.version, h.autoclear_features)
        };
        // We keep only the raw-external-data bit: bitmaps are not updated by our writes.
        let keep = autoclear & features::RAW_EXTERNAL;
        if version >= 3 && keep != autoclear {
            self.write_header_u64(AUTOCLEAR_OFFSET, keep).await?;
            self.inner.header.lock().unwrap().header.autoclear_features = keep;
        }
        Ok(())
    }

    /// Write one big-endian u64 header field and fsync.
    pub(crate) async fn write_header_u64(&self, off: u64, v: u64) -> Result<()> {
        self.inner
            .file
            .write_at(&v.to_be_bytes(), off)
            .await
            .map_err(|e| Error::io("updating the header", e).at(off))?;
        self.inner
            .file
            .flush()
            .await
            .map_err(|e| Error::io("syncing the header", e))
    }
}
