//! How a command may open images: the image locks (`-U`, `--no-lock`) and which files an image
//! may make us open (`--trusted`, `--untrusted`, `--no-references`, `--references-under`).
//! Every command that opens an image flattens [`Access`] into its arguments.

use std::path::{Path, PathBuf};

use qcow2_engine::image::{OpenOptions, ReferencePolicy};
use qcow2_engine::storage::LockRequest;

/// The common open flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Access {
    /// Read-only: let other processes write the image while it is open (qemu-img's
    /// --force-share); what is read may be inconsistent.
    #[arg(short = 'U', long)]
    pub force_share: bool,
    /// Take no image locks (only when something else keeps writers apart).
    #[arg(long)]
    pub no_lock: bool,
    /// Trust the image: open any backing or data file it names, the data file read-write
    /// (qemu-img's behaviour; the default of every command but serve).
    #[arg(long, conflicts_with = "untrusted")]
    pub trusted: bool,
    /// Distrust the image: open only backing and data files it names relatively, without
    /// '..', inside its own directory, and data files read-only (the default of serve).
    #[arg(long)]
    pub untrusted: bool,
    /// Open no backing or data file the image names.
    #[arg(long, visible_alias = "no-backing", conflicts_with_all = ["trusted", "references_under"])]
    pub no_references: bool,
    /// Open only backing and data files the image names relatively, without '..', that lie
    /// inside DIR (data files read-only).
    #[arg(long, value_name = "DIR", conflicts_with = "trusted")]
    pub references_under: Option<PathBuf>,
    /// Distrust images unless --trusted is given (set by serve, not a flag).
    #[arg(skip)]
    pub untrusted_by_default: bool,
    /// Open files with O_DIRECT (set by serve's --cache, not a flag here).
    #[arg(skip)]
    pub direct: bool,
    /// The IO backend (set by serve's --aio, not a flag here).
    #[arg(skip)]
    pub io_backend: qcow2_engine::storage::IoBackend,
}

impl Access {
    /// The same flags, distrusting images unless `--trusted` is given.
    pub fn untrusted_by_default(mut self) -> Self {
        self.untrusted_by_default = true;
        self
    }

    /// Whether the image is trusted (any reference, writable data files).
    fn trusts(&self) -> bool {
        let restricted = self.untrusted || self.no_references || self.references_under.is_some();
        self.trusted || !(restricted || self.untrusted_by_default)
    }

    /// The reference policy the flags ask for.
    fn policy(&self) -> ReferencePolicy {
        if self.no_references {
            ReferencePolicy::Refuse
        } else if let Some(dir) = &self.references_under {
            ReferencePolicy::Under(dir.clone())
        } else if self.trusts() {
            ReferencePolicy::Any
        } else {
            ReferencePolicy::ImageDirectory
        }
    }

    /// Check that the reference `name` in an image below `top` (the image the user named),
    /// resolved to `resolved`, may be opened.
    pub fn check_reference(
        &self,
        top: &Path,
        what: &str,
        name: &str,
        resolved: &Path,
    ) -> qcow2_engine::Result<()> {
        self.policy()
            .anchored(Some(top))
            .check(what, name, resolved)
    }

    /// Library options for opening a qcow2 image.
    pub fn options(&self, writable: bool) -> OpenOptions {
        OpenOptions::new()
            .writable(writable)
            .references(self.policy())
            .writable_data_file(self.trusts())
            .locking(!self.no_lock)
            .force_share(self.force_share)
            .direct(self.direct)
            .io_backend(self.io_backend)
    }

    /// [`Access::options`] with the reference policy tied to the directory of `top` rather
    /// than of the image opened (for an overlay that names `top` as its backing file).
    pub fn options_anchored(&self, writable: bool, top: &Path) -> OpenOptions {
        self.options(writable)
            .references(self.policy().anchored(Some(top)))
    }

    /// The lock to take on a raw image file (raw images share every permission, as with
    /// qemu-img and qemu-io).
    pub fn raw_lock(&self, writable: bool) -> Option<LockRequest> {
        (!self.no_lock).then(|| LockRequest::raw(writable))
    }

    /// The lock to take on a qcow2 file a command opens without the library's `Image` (check,
    /// info).
    pub fn image_lock(&self, writable: bool) -> Option<LockRequest> {
        (!self.no_lock).then(|| LockRequest::image(writable, self.force_share && !writable))
    }
}
