//! The `ferrite-storage-daemon` binary: all of it lives in the library.

fn main() -> std::process::ExitCode {
    ferrite_storage_daemon::main()
}
