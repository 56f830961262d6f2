//! Named exports: what a client can choose during the handshake.

use std::sync::Arc;

use super::device::BlockDevice;
use super::meta::MetaContext;

/// One exported device under a name.
#[derive(Debug, Clone)]
pub struct Export {
    /// The name clients ask for (`nbd://host/NAME`).
    pub name: String,
    /// Shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// The device.
    pub device: Arc<dyn BlockDevice>,
    /// Metadata contexts offered besides `base:allocation` (say
    /// [`MetaContext::AllocationDepth`] for qemu-nbd's `-A`).
    pub contexts: Vec<MetaContext>,
}

impl Export {
    /// An export of `device` named `name`, without a description.
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Export {
        Export {
            name: name.into(),
            description: String::new(),
            device,
            contexts: Vec::new(),
        }
    }
}

/// The server's exports. The first is also the default export, the one the empty name
/// selects (the spec reserves the empty name for "the default export").
#[derive(Debug, Clone)]
pub struct Exports {
    list: Arc<[Arc<Export>]>,
}

impl Exports {
    /// The exports, in order.
    pub fn new(list: Vec<Export>) -> Exports {
        Exports {
            list: list.into_iter().map(Arc::new).collect(),
        }
    }

    /// The export a client's name selects.
    pub fn find(&self, name: &[u8]) -> Option<&Arc<Export>> {
        if name.is_empty() {
            return self.list.first();
        }
        self.list.iter().find(|e| e.name.as_bytes() == name)
    }

    /// All exports.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.list.iter()
    }
}
