//! One Storage contract (see `qcow2_engine::storage::Storage`), checked against every backend:
//! memory, file (buffered and `O_DIRECT`), io_uring (buffered and `O_DIRECT`), and the
//! test-utils wrappers (fault-injecting with no faults, crash-simulating, parking while not
//! holding). Each behaviour in `behaviours` is one generic async function; `conformance!`
//! instantiates every behaviour for every backend, so a test is named
//! `storage_conformance::BACKEND::BEHAVIOUR`.
//!
//! The oracle is an in-memory shadow of what the contract says the bytes must be, compared
//! both with the storage's own reads and with what an independent reader sees after a flush
//! (the file read with `std::fs`, the memory vector, the crash simulator's durable image).

mod backends;
mod behaviours;

/// Every behaviour, as one `#[tokio::test]` each, for the backend made by `$make`.
macro_rules! behaviour_tests {
    ($make:path; $($behaviour:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $behaviour() {
                super::behaviours::$behaviour($make).await;
            }
        )*
    };
}

/// One test module per backend.
macro_rules! conformance {
    ($($backend:ident => $make:path),* $(,)?) => {
        $(
            mod $backend {
                behaviour_tests!($make;
                    write_read_unaligned,
                    read_past_end,
                    write_past_end_grows,
                    set_len_shrinks_and_grows_with_zeros,
                    write_zeroes_inside_and_past_end,
                    discard_reads_old_or_zeros,
                    allocate_keeps_content,
                    zero_length_requests,
                    flush_makes_writes_visible,
                    concurrent_disjoint_writes,
                    concurrent_growth,
                    block_status_is_sane,
                    huge_offsets_fail_cleanly,
                    read_only_refuses_changes,
                );
            }
        )*
    };
}

conformance! {
    memory => super::backends::memory,
    file_buffered => super::backends::file_buffered,
    file_direct => super::backends::file_direct,
    uring_buffered => super::backends::uring_buffered,
    uring_direct => super::backends::uring_direct,
    fault_no_faults => super::backends::fault_over_file,
    crash => super::backends::crash,
    park_not_holding => super::backends::park_over_memory,
}
