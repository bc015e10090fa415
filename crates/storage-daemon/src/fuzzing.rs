//! Entry points for the coverage-guided fuzz targets in `fuzz/`: the command-line parsers, a
//! QMP session and an NBD connection on a daemon set up as a user would set it up, and a
//! qcow2 image opened and used. Each takes the fuzzer's bytes and returns; a panic, a hang
//! (reported as a panic after [`HANG`]) or unbounded memory is a finding.
//!
//! The QMP, NBD and qcow2 targets touch files: they work in the current directory, which
//! they empty before every input, and refuse to run unless the rest of the file system is
//! read-only (`fuzz/run.sh` runs them in a private mount namespace arranged that way), since
//! a fuzzed command or image may name any path.

use crate::cli::parse::parse_args;
use crate::daemon::{Daemon, DaemonCommands};
use crate::wiring;
use ferrite_qapi::Args;
use ferrite_qmp::{Monitor, MonitorOptions};
use ferrite_qobject::{QDict, from_json};
use std::future::Future;
use std::io::Cursor;
use std::rc::Rc;
use std::time::Duration;

/// How long one input may take before it counts as a hang.
pub const HANG: Duration = Duration::from_secs(20);

/// The command line as the daemon reads it: NUL-separated arguments through getopt's rules,
/// then every option through its keyval or JSON parser and its QAPI type. Nothing is acted
/// on.
pub fn command_line(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let argv: Vec<String> = text.split('\0').map(str::to_owned).collect();
    if let Ok(options) = parse_args(&argv) {
        for opt in &options {
            let _ = wiring::check(opt);
        }
    }
}

/// Whether the file system outside the working directory is read-only, as `fuzz/run.sh`
/// arranges. The targets that touch files exit instead of running without it.
pub fn require_sandbox() {
    let probe = "/.ferrite-fuzz-probe";
    match std::fs::File::create(probe) {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        other => {
            if other.is_ok() {
                let _ = std::fs::remove_file(probe);
            }
            eprintln!(
                "fuzzing: '/' is writable; fuzzed commands and images may name any path, so \
                 this target runs only in the sandbox fuzz/run.sh sets up"
            );
            std::process::exit(2);
        }
    }
}

/// Empties the working directory: every input starts from the same files.
fn fresh_dir() {
    let Ok(entries) = std::fs::read_dir(".") else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let _ = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
    }
}

/// Runs `f` on a fresh single-threaded runtime, as the daemon's main loop; panics (a
/// finding) when it takes longer than [`HANG`].
fn run<F: Future>(f: impl FnOnce() -> F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    let out = local.block_on(&rt, async { tokio::time::timeout(HANG, f()).await });
    drop(local);
    rt.shutdown_timeout(Duration::from_secs(1));
    out.expect("the input hung the daemon")
}

/// The daemon a QMP or NBD input meets: null-co nodes `n0` (1 MiB) and `n1`, a qcow2 node
/// `q0` over `q0.qcow2` with a dirty bitmap `b0`, an NBD server on `nbd.sock`, and exports
/// `q0` (writable, with allocation depth and the bitmap), `n0` (writable) and `n1`.
async fn set_up() -> Rc<Daemon> {
    let daemon = Daemon::new();
    daemon.start_commands();
    std::fs::write("q0.qcow2", b"").expect("image file");
    let create = r#"{"driver": "qcow2", "size": 1048576, "cluster-size": 4096,
        "file": {"driver": "file", "filename": "q0.qcow2"}}"#;
    ferrite_block::create::create(&daemon.graph, &args(create))
        .await
        .expect("qcow2 image");
    for (cmd, json) in [
        (
            "blockdev-add",
            r#"{"driver": "null-co", "node-name": "n0", "size": 1048576}"#,
        ),
        (
            "blockdev-add",
            r#"{"driver": "null-co", "node-name": "n1", "read-zeroes": true}"#,
        ),
        (
            "blockdev-add",
            r#"{"driver": "qcow2", "node-name": "q0",
            "file": {"driver": "file", "filename": "q0.qcow2"}}"#,
        ),
        ("block-dirty-bitmap-add", r#"{"node": "q0", "name": "b0"}"#),
        (
            "nbd-server-start",
            r#"{"addr": {"type": "unix", "path": "nbd.sock"}}"#,
        ),
        (
            "block-export-add",
            r#"{"type": "nbd", "id": "e0", "node-name": "q0",
            "writable": true, "allocation-depth": true, "bitmaps": ["b0"]}"#,
        ),
        (
            "block-export-add",
            r#"{"type": "nbd", "id": "e1", "node-name": "n0", "writable": true}"#,
        ),
        (
            "block-export-add",
            r#"{"type": "nbd", "id": "e2", "node-name": "n1"}"#,
        ),
    ] {
        daemon.run(cmd, args(json)).await.expect(cmd);
    }
    daemon
}

fn args(json: &str) -> Args {
    let v = from_json(json).expect("setup JSON");
    Args::new(v.as_dict().cloned().unwrap_or_else(QDict::new))
}

/// A QMP client sending `input` to a fresh daemon (after its greeting), then hanging up;
/// the daemon then shuts down as after `quit`.
pub fn qmp_session(input: &[u8]) {
    fresh_dir();
    let input = input.to_vec();
    run(|| async move {
        let daemon = set_up().await;
        let monitor = Monitor::new(
            Rc::new(DaemonCommands(daemon.clone())),
            daemon.events.clone(),
            Daemon::version_info(),
            MonitorOptions {
                pretty: false,
                oob_offered: true,
            },
        );
        monitor
            .serve(Box::pin(Cursor::new(input)), Box::pin(tokio::io::sink()))
            .await;
        daemon.shut_down().await;
    });
}

/// An NBD client sending `input` (handshake and requests) to a fresh daemon's NBD server,
/// then hanging up.
pub fn nbd_session(input: &[u8]) {
    fresh_dir();
    let input = input.to_vec();
    run(|| async move {
        let daemon = set_up().await;
        daemon
            .nbd
            .serve_client(Cursor::new(input), tokio::io::sink())
            .await;
        daemon.shut_down().await;
    });
}

/// An NBD server that answers the `nbd` driver with `input` (its handshake and replies,
/// whatever the client asked) and then hangs up: a node is opened on it and read, written,
/// zeroed, trimmed, flushed and asked for block status through it.
pub fn nbd_client(input: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    fresh_dir();
    let input = input.to_vec();
    run(|| async move {
        let daemon = Daemon::new();
        let Ok(listener) = tokio::net::UnixListener::bind("server.sock") else {
            return;
        };
        tokio::task::spawn_local(async move {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let (mut r, mut w) = s.into_split();
            tokio::task::spawn_local(async move {
                let mut sink = vec![0u8; 1 << 16];
                while r.read(&mut sink).await.is_ok_and(|n| n > 0) {}
            });
            let _ = w.write_all(&input).await;
            let _ = w.shutdown().await;
        });
        let add = r#"{"driver": "nbd", "node-name": "c", "export": "e",
            "server": {"type": "unix", "path": "server.sock"}}"#;
        let Ok(node) = daemon.graph.blockdev_add(&args(add)).await else {
            return;
        };
        let perm = ferrite_block::Perm::CONSISTENT_READ | ferrite_block::Perm::WRITE;
        let Ok(blk) = ferrite_block::BlockBackend::new(&daemon.graph, &node, perm, perm) else {
            return;
        };
        let len = blk.len();
        let at = |n: u64| if len == 0 { 0 } else { n % len };
        let flags = ferrite_block::ReqFlags::empty();
        let _ = blk.read(at(0), 4096.min(len as usize)).await;
        let _ = blk.block_status(at(0), len.clamp(1, 1 << 20)).await;
        let _ = blk
            .write(at(4096), vec![0x5a; 512.min(len as usize)], flags)
            .await;
        let _ = blk.write_zeroes(at(8192), 4096.min(len), flags).await;
        let _ = blk.discard(at(0), 4096.min(len)).await;
        let _ = blk.flush().await;
        let _ = blk.read(at(1 << 20), (1 << 20).min(len as usize)).await;
        blk.remove();
        daemon.shut_down().await;
    });
}

/// `input` as a qcow2 image file, opened read-write and used
/// ([`ferrite_qcow2::testing::exercise`]); or as an image of another format when it
/// carries its signature (a Parallels image opened read-only first). Beside it are 1 MiB files `base.raw` and `data.raw`, which images may name
/// as their backing or external data file.
pub fn qcow2_image(input: &[u8]) {
    fresh_dir();
    let sparse = |name: &str| std::fs::File::create(name).and_then(|f| f.set_len(1 << 20));
    if std::fs::write("image.qcow2", input).is_err()
        || sparse("base.raw").is_err()
        || sparse("data.raw").is_err()
    {
        return;
    }
    run(|| async {
        let daemon = Daemon::new();
        let file = QDict::new()
            .with("driver", "file")
            .with("filename", "image.qcow2");
        let vdi = input.get(0x40..0x44) == Some(&0xbeda_107f_u32.to_le_bytes()[..]);
        let driver = if vdi {
            "vdi"
        } else if input.starts_with(b"conectix") {
            "vpc"
        } else if input.starts_with(b"KDMV") || input.starts_with(b"COWD") {
            "vmdk"
        } else if input.starts_with(b"QED\0") {
            "qed"
        } else if input.starts_with(b"QFI\xfb\0\0\0\x01") {
            "qcow"
        } else if input.starts_with(b"WithoutFreeSpace") || input.starts_with(b"WithouFreSpacExt") {
            "parallels"
        } else if input.starts_with(b"Bochs Virtual HD Image\0") {
            "bochs"
        } else if input.starts_with(b"vhdxfile") {
            "vhdx"
        } else if input.starts_with(b"#!/bin/sh\n#V2.0 Format\n") {
            "cloop"
        } else if input.len() >= 512 && input[input.len() - 512..].starts_with(b"koly") {
            "dmg"
        } else {
            "qcow2"
        };
        if matches!(driver, "parallels" | "bochs" | "cloop" | "dmg" | "vhdx") {
            // Read-only first: a Parallels format extension is read only then, Bochs, cloop
            // and dmg images open no other way, and a VHDX log is searched but not replayed.
            let opts = QDict::new()
                .with("driver", driver)
                .with("node-name", "ro")
                .with("read-only", true)
                .with("file", file.clone().with("read-only", true));
            if let Ok(node) = daemon.graph.blockdev_add(&Args::new(opts)).await {
                ferrite_qcow2::testing::read_start(&daemon.graph, &node).await;
                drop(node);
                let _ = daemon.graph.blockdev_del("ro").await;
            }
        }
        ferrite_qcow2::testing::exercise_format(&daemon.graph, driver, file).await;
    });
}
