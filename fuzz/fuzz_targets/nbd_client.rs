//! The `nbd_client` target: see `ferrite_storage_daemon::fuzzing::nbd_client`.
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: ferrite_storage_daemon::fuzzing::require_sandbox(),
    |data: &[u8]| ferrite_storage_daemon::fuzzing::nbd_client(data)
);
