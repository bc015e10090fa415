//! The `nbd_session` target: see `ferrite_storage_daemon::fuzzing::nbd_session`.
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: ferrite_storage_daemon::fuzzing::require_sandbox(),
    |data: &[u8]| ferrite_storage_daemon::fuzzing::nbd_session(data)
);
