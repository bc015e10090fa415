//! The `qcow2_image` target: see `ferrite_storage_daemon::fuzzing::qcow2_image`.
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: ferrite_storage_daemon::fuzzing::require_sandbox(),
    |data: &[u8]| ferrite_storage_daemon::fuzzing::qcow2_image(data)
);
