//! LUKS1's anti-forensic splitter: a key is stored as `stripes` key-sized blocks whose
//! combination (through a hash "diffuser") gives the key back, so destroying any one stripe
//! destroys the key.
//!
//! With `d_0 = 0`, `d_{i+1} = H(d_i ^ s_i)` for `i < stripes - 1`, and the last stripe
//! `s_{n-1} = d_{n-1} ^ key`. `H` hashes each digest-sized piece `j` of its input as
//! `hash(be32(j) || piece)`, truncated to the piece's length.

use zeroize::Zeroizing;

use super::hash::HashAlg;

/// Diffuse `buf` in place.
fn diffuse(hash: HashAlg, buf: &mut [u8]) {
    let ds = hash.digest_len();
    for (j, piece) in buf.chunks_mut(ds).enumerate() {
        // The piece index as a big-endian u32, as LUKS1 specifies (a key has few pieces).
        let iv = u32::try_from(j).unwrap_or(u32::MAX).to_be_bytes();
        let d = Zeroizing::new(hash.digest(&[&iv, piece]));
        let n = piece.len();
        piece.copy_from_slice(&d[..n]);
    }
}

/// The running value `d_{n-1}` over all stripes but the last of `split`.
fn fold(hash: HashAlg, split: &[u8], key_len: usize) -> Zeroizing<Vec<u8>> {
    let mut d = Zeroizing::new(vec![0u8; key_len]);
    let stripes = split.len() / key_len;
    for s in split.chunks_exact(key_len).take(stripes.saturating_sub(1)) {
        for (a, b) in d.iter_mut().zip(s) {
            *a ^= b;
        }
        diffuse(hash, &mut d);
    }
    d
}

/// Recover a `key_len`-byte key from its split form (`key_len * stripes` bytes).
pub(crate) fn merge(hash: HashAlg, split: &[u8], key_len: usize) -> Zeroizing<Vec<u8>> {
    let mut d = fold(hash, split, key_len);
    let stripes = split.len() / key_len;
    let last = &split[(stripes - 1) * key_len..stripes * key_len];
    for (a, b) in d.iter_mut().zip(last) {
        *a ^= b;
    }
    d
}

/// Split `key` into `stripes` stripes; `random` fills the first `stripes - 1` stripes.
pub(crate) fn split(
    hash: HashAlg,
    key: &[u8],
    stripes: usize,
    random: impl FnOnce(&mut [u8]) -> crate::error::Result<()>,
) -> crate::error::Result<Zeroizing<Vec<u8>>> {
    let n = key.len();
    let mut out = Zeroizing::new(vec![0u8; n * stripes]);
    random(&mut out[..n * (stripes - 1)])?;
    let d = fold(hash, &out, n);
    for (i, o) in out[n * (stripes - 1)..].iter_mut().enumerate() {
        *o = d[i] ^ key[i];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_gives_the_key() {
        let key: Vec<u8> = (0..64u8).collect();
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            let mut seed = 7u8;
            let s = split(hash, &key, 40, |b| {
                b.iter_mut().for_each(|x| {
                    seed = seed.wrapping_mul(31).wrapping_add(1);
                    *x = seed;
                });
                Ok(())
            })
            .unwrap();
            assert_eq!(&merge(hash, &s, key.len())[..], &key[..]);
            // Any damaged stripe loses the key.
            let mut bad = s.clone();
            bad[3] ^= 1;
            assert_ne!(&merge(hash, &bad, key.len())[..], &key[..]);
        }
    }
}
