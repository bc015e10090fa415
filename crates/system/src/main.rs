//! The `ferrite-system-x86_64` binary: all of it lives in the library.

fn main() -> std::process::ExitCode {
    ferrite_system::main()
}
