//! Which files an image may make us open.
//!
//! A backing file name and an external data file name are strings read from the image, which
//! is untrusted input: a hostile image can name `/etc/passwd`, `../../victim`, a FIFO, or
//! another tenant's disk, and a server that follows the name would read (or, for a data file,
//! write) that file on the client's behalf. [`ReferencePolicy`] is the one place that decides
//! whether such a name may be opened; names the caller passes explicitly (a backing or data file
//! override) are the caller's own choice and are not checked.
//!
//! The file-type rule (only regular files and block devices, opened without blocking on a FIFO)
//! is enforced for every file by the storage layer.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};

/// Which files named inside an image (backing file, external data file) may be opened.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ReferencePolicy {
    /// Open none: an image that names a backing or data file fails to open
    /// ([`ErrorKind::Refused`]) unless the caller names the file itself.
    Refuse,
    /// The default: only relative names without `..` components that resolve (symlinks
    /// followed) inside the directory of the image being opened (for a backing chain, the
    /// top image's directory).
    #[default]
    ImageDirectory,
    /// Only relative names without `..` components that resolve (symlinks followed) inside this
    /// directory.
    Under(PathBuf),
    /// Any name: absolute, `..`, anywhere (images the caller trusts, like qemu-img does).
    Any,
}

impl ReferencePolicy {
    /// `ImageDirectory` becomes `Under(the directory of image_path)`, so that every image of a
    /// backing chain is held to the top image's directory. Without a path (an image on memory)
    /// nothing can be resolved, so nothing is allowed.
    pub fn anchored(&self, image_path: Option<&Path>) -> ReferencePolicy {
        match self {
            ReferencePolicy::ImageDirectory => match image_path.map(parent_dir) {
                Some(dir) => ReferencePolicy::Under(dir),
                None => ReferencePolicy::Refuse,
            },
            other => other.clone(),
        }
    }

    /// Check that `name` (as stored in the image), resolved to `resolved`, may be opened as
    /// `what` ("backing file", "external data file"). Call it on an [`anchored`] policy.
    ///
    /// [`anchored`]: ReferencePolicy::anchored
    pub fn check(&self, what: &str, name: &str, resolved: &Path) -> Result<()> {
        let dir = match self {
            ReferencePolicy::Any => return Ok(()),
            ReferencePolicy::Refuse => {
                return Err(refused(what, name, "the policy opens no referenced files"));
            }
            ReferencePolicy::ImageDirectory => {
                return Err(refused(what, name, "no image directory to resolve it in"));
            }
            ReferencePolicy::Under(dir) => dir,
        };
        let p = Path::new(name);
        if p.is_absolute() {
            return Err(refused(what, name, "absolute names are not allowed"));
        }
        if p.components().any(|c| c == Component::ParentDir) {
            return Err(refused(what, name, "names with '..' are not allowed"));
        }
        // Symlinks can still point anywhere: compare where the name really leads.
        let (Ok(real), Ok(root)) = (std::fs::canonicalize(resolved), std::fs::canonicalize(dir))
        else {
            return Err(refused(what, name, "it does not exist"));
        };
        if !real.starts_with(&root) {
            let why = format!("it leads outside {}", root.display());
            return Err(refused(what, name, &why));
        }
        Ok(())
    }
}

/// The directory a file lives in (`.` for a bare file name).
fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn refused(what: &str, name: &str, why: &str) -> Error {
    Error::new(
        ErrorKind::Refused,
        format!("not opening the {what} '{name}' that the image names: {why}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base"), b"").unwrap();
        let pol = ReferencePolicy::ImageDirectory.anchored(Some(&dir.path().join("top")));
        pol.check("backing file", "base", &dir.path().join("base"))
            .unwrap();
        for bad in ["/etc/passwd", "../x", "a/../base", "missing"] {
            let e = pol
                .check("backing file", bad, &dir.path().join(bad))
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Refused, "{bad}");
        }
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        let e = pol
            .check("backing file", "link", &dir.path().join("link"))
            .unwrap_err();
        assert!(e.what().contains("leads outside"), "{e}");
        ReferencePolicy::Any
            .check("backing file", "/etc/passwd", Path::new("/etc/passwd"))
            .unwrap();
        assert!(
            ReferencePolicy::Refuse
                .check("data file", "base", &dir.path().join("base"))
                .is_err()
        );
    }
}
