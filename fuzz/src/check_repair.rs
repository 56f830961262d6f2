//! Target `check_repair`: arbitrary bytes (in the corpus: mutated qemu-img images) checked,
//! then repaired with `-r leaks` and with `-r all` on separate copies.
//!
//! Oracle, beyond "no panic, no hang": when a repair finishes (no check errors), the report
//! it returns for the repaired image must be what a fresh check of the repaired bytes says.
//! (The corruption count may go up, as with qemu-img: `-r leaks` can lower an L2 table's
//! refcount to 1 under an L1 entry without COPIED, which is then an OFLAG_COPIED error.)

use std::sync::Arc;

use qcow2_engine::check::{CheckReport, RepairMode, check, repair_with};

use super::block_on;
use super::capped::CappedStorage;
use super::image_bytes::check_options;

/// Run the target on one input.
pub fn run(data: &[u8]) {
    block_on(exercise(data));
}

async fn exercise(data: &[u8]) {
    let storage = Arc::new(CappedStorage::new(data.to_vec()));
    let Ok(first) = check(storage, &check_options()).await else {
        return;
    };
    for mode in [RepairMode::Leaks, RepairMode::All] {
        repair_copy(data, mode, &first).await;
    }
}

/// Repair a copy of `data` and compare the repair's own account with a fresh check.
async fn repair_copy(data: &[u8], mode: RepairMode, first: &CheckReport) {
    let storage = Arc::new(CappedStorage::new(data.to_vec()));
    let Ok((before, after)) = repair_with(storage.clone(), &check_options(), mode).await else {
        return;
    };
    assert_eq!(
        (before.corruptions, before.leaks),
        (first.corruptions, first.leaks),
        "{mode:?}: the repair's first check disagrees with a plain check"
    );
    if after.check_errors > 0 {
        // The repair could not finish (qemu-img fails the same way, exit 1): nothing to hold
        // it to.
        return;
    }
    let fresh = check(storage, &check_options())
        .await
        .unwrap_or_else(|e| panic!("{mode:?}: the repaired image cannot be checked: {e}"));
    assert_eq!(
        (fresh.corruptions, fresh.leaks, fresh.check_errors),
        (after.corruptions, after.leaks, after.check_errors),
        "{mode:?}: the repair's report disagrees with a fresh check of the result"
    );
}
