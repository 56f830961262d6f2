//! Steps on a read-write open before the first write: load the persistent bitmaps and mark
//! the enabled ones in use (see `bitmaps/`), and clear the autoclear feature bits we do not
//! maintain. Dirty images (lazy refcounts) have their refcounts rebuilt by `open` before
//! this runs.

use super::Image;
use crate::error::Result;
use crate::format::features;
use crate::format::header::HeaderPatch;

impl Image {
    pub(crate) async fn prepare_for_writing(&self) -> Result<()> {
        let (version, autoclear) = {
            let h = &self.inner.header.lock().unwrap().header;
            (h.version, h.autoclear_features)
        };
        if version >= 3 {
            self.load_bitmaps().await?;
        }
        // We keep the raw-external-data bit and the bitmaps bit (our writes update them).
        let keep = autoclear & (features::RAW_EXTERNAL | features::BITMAPS);
        if version >= 3 && keep != autoclear {
            self.write_header(HeaderPatch::autoclear_features(keep))
                .await?;
            self.inner.header.lock().unwrap().header.autoclear_features = keep;
        }
        Ok(())
    }

    /// Write header fields in place and fsync (through the metadata writer: a failure
    /// latches).
    pub(crate) async fn write_header(&self, patch: HeaderPatch) -> Result<()> {
        let w = self.write_state()?;
        w.meta().write_header(patch, "updating the header").await
    }
}
