//! The `command_line` target: see `ferrite_storage_daemon::fuzzing::command_line`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferrite_storage_daemon::fuzzing::command_line(data));
