//! The parallelism of `qcow2 convert`: up to `-m N` chunks in flight (read, zero detection,
//! compression), their writes applied in source order, or as they finish with `-W`.
//!
//! In order, the destination's layout (which host cluster each guest cluster gets, how
//! compressed payloads are packed) is the same whatever N is: only reading and compressing
//! overlap. With `-W` each chunk writes as soon as it is ready, as qemu-img's `-W` allows.

use std::collections::VecDeque;
use std::future::Future;

use anyhow::Result;
use tokio::task::JoinHandle;

/// `-m` and `-W`.
#[derive(Debug, Clone, Copy)]
pub struct Parallel {
    /// Chunks in flight at once (at least 1).
    pub requests: usize,
    /// Chunks may be written out of order.
    pub unordered: bool,
}

/// Chunks in flight, oldest first.
pub struct Pipeline<T> {
    limit: usize,
    pending: VecDeque<JoinHandle<Result<T>>>,
}

impl<T: Send + 'static> Pipeline<T> {
    /// A pipeline running up to `limit` chunks at once.
    pub fn new(limit: usize) -> Self {
        Pipeline {
            limit: limit.max(1),
            pending: VecDeque::new(),
        }
    }

    /// Start `job`; if that makes more than `limit` in flight, first wait for the oldest and
    /// return its result (so the caller applies results in submission order).
    pub async fn push(
        &mut self,
        job: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<Option<T>> {
        let out = if self.pending.len() >= self.limit {
            self.next().await?
        } else {
            None
        };
        self.pending.push_back(tokio::spawn(job));
        Ok(out)
    }

    /// The oldest chunk's result, or `None` when none is in flight.
    pub async fn next(&mut self) -> Result<Option<T>> {
        match self.pending.pop_front() {
            Some(h) => Ok(Some(h.await??)),
            None => Ok(None),
        }
    }
}

impl<T> Drop for Pipeline<T> {
    fn drop(&mut self) {
        // On an error, stop the chunks still in flight (a chunk's writes are cancel-safe).
        for h in &self.pending {
            h.abort();
        }
    }
}

/// Whether every byte of `b` is zero (vectorizes: no early exit inside a 64-byte block).
pub fn is_zero(b: &[u8]) -> bool {
    b.chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn results_come_back_in_submission_order() {
        let mut p = Pipeline::new(3);
        let mut got = Vec::new();
        for i in 0..10u64 {
            // Later jobs finish first.
            let job = async move {
                tokio::time::sleep(std::time::Duration::from_millis(10 - i)).await;
                Ok(i)
            };
            if let Some(v) = p.push(job).await.unwrap() {
                got.push(v);
            }
        }
        while let Some(v) = p.next().await.unwrap() {
            got.push(v);
        }
        assert_eq!(got, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0; 200]));
        let mut b = [0u8; 200];
        b[199] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&[]));
    }
}
