//! Reading and patching image files byte by byte, for tests that damage images on purpose.

use std::os::unix::fs::FileExt;
use std::path::Path;

/// `len` bytes of the file `img` at `off`.
pub fn read(img: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(img)
        .unwrap()
        .read_exact_at(&mut buf, off)
        .unwrap();
    buf
}

/// Overwrite the file `img` with `bytes` at `off`.
pub fn poke(img: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, off).unwrap();
}
