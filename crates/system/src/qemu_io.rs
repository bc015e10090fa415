//! The human monitor's `qemu-io DEVICE "COMMAND"`: one qemu-io command on a drive or node,
//! its report printed on the program's standard output as qemu-io prints it (QEMU sends it
//! there too, not to the monitor). Tests use it to write patterns into an image under a
//! running machine and to check them.

mod reopen;

use ferrite_block::driver::DebugOp;
use ferrite_block::stats::IoKind;
use ferrite_block::{BlockBackend, Perm, ReqFlags};
use std::io::Write;
use std::rc::Rc;
use std::time::Instant;

/// What a command needs of the backend.
fn perm_for(cmd: &str) -> Perm {
    match cmd {
        "read" | "aio_read" | "readv" => Perm::CONSISTENT_READ,
        "write" | "aio_write" | "writev" | "discard" | "aio_discard" | "d" => Perm::WRITE,
        _ => Perm::empty(),
    }
}

/// qemu-io's size words: "512 bytes", "64 KiB", "1.500 MiB".
fn cvtstr(value: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        ((1u64 << 60) as f64, "EiB"),
        ((1u64 << 50) as f64, "PiB"),
        ((1u64 << 40) as f64, "TiB"),
        ((1u64 << 30) as f64, "GiB"),
        ((1u64 << 20) as f64, "MiB"),
        (1024.0, "KiB"),
    ];
    let (num, unit) = UNITS.iter().find(|(size, _)| value >= *size).map_or_else(
        || (format!("{value:.6}"), "bytes"),
        |(size, unit)| (format!("{:.3}", value / size), *unit),
    );
    match num.find(".000") {
        Some(at) => format!("{} {unit}", &num[..at]),
        None => format!("{num} {unit}"),
    }
}

/// The report line after a transfer.
fn report(op: &str, offset: u64, len: u64, started: Instant) -> String {
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    format!(
        "{op} {len}/{len} bytes at offset {offset}\n{}, 1 ops; {:05.2} sec ({}/sec and {:.4} ops/sec)\n",
        cvtstr(len as f64),
        secs,
        cvtstr(len as f64 / secs),
        1.0 / secs
    )
}

/// A number as qemu-io takes it: decimal with k/M/G/T suffixes (`64k`, `1M`), or 0x hex
/// (whose digits include `b`: `0xab` is 171, not 0xa bytes).
fn number(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        let end = hex
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(hex.len());
        let v = u64::from_str_radix(&hex[..end], 16).ok()?;
        return v.checked_mul(1u64 << suffix_shift(&hex[end..])?);
    }
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let v: u64 = s[..end].parse().ok()?;
    v.checked_mul(1u64 << suffix_shift(&s[end..])?)
}

/// The power of two a size suffix stands for.
fn suffix_shift(suffix: &str) -> Option<u32> {
    Some(match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        _ => return None,
    })
}

/// A pattern byte as qemu-io reads it (C's `strtol` with base 0: decimal, 0x hex, 0 octal).
fn pattern_byte(s: &str) -> Option<u8> {
    let v = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        i64::from_str_radix(hex, 16).ok()?
    } else if s.len() > 1 && s.starts_with('0') {
        i64::from_str_radix(&s[1..], 8).ok()?
    } else {
        s.parse().ok()?
    };
    Some(v as u8)
}

/// The hex dump `read -v` prints.
fn dump(offset: u64, data: &[u8]) -> String {
    let mut out = String::new();
    for (i, row) in data.chunks(16).enumerate() {
        out += &format!("{:08x}:  ", offset + (i * 16) as u64);
        for b in row {
            out += &format!("{b:02x} ");
        }
        out.push(' ');
        for &b in row {
            out.push(if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '.'
            });
        }
        out.push('\n');
    }
    out
}

/// qemu-io's complaint when command `cmd` has `n` words after it (options included) and
/// takes fewer or more; nothing for commands it does not know.
fn argument_count(cmd: &str, n: usize) -> Option<String> {
    let (min, max) = match cmd {
        "read" | "readv" | "write" | "writev" | "aio_read" | "aio_write" | "discard" | "d" => {
            (2, None)
        }
        "flush" | "f" | "aio_flush" | "length" | "map" => (0, Some(0)),
        "alloc" => (1, Some(2)),
        "break" => (2, Some(2)),
        "remove_break" | "resume" | "wait_break" => (1, Some(1)),
        _ => return None,
    };
    if n >= min && max.is_none_or(|max| n <= max) {
        return None;
    }
    Some(match max {
        None => format!("bad argument count {n} to {cmd}, expected at least {min} arguments"),
        Some(max) if max == min => {
            format!("bad argument count {n} to {cmd}, expected {min} arguments")
        }
        Some(max) => {
            format!("bad argument count {n} to {cmd}, expected between {min} and {max} arguments")
        }
    })
}

/// Runs `line` (one qemu-io command) on `blk`; returns what qemu-io prints.
async fn command(blk: &BlockBackend, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((&cmd, args)) = words.split_first() else {
        return String::new();
    };
    if let Some(complaint) = argument_count(cmd, args.len()) {
        // qemu-io says this on standard error.
        eprintln!("{complaint}");
        return String::new();
    }
    let mut pattern: Option<u8> = None;
    let mut zero = false;
    let mut compressed = false;
    let mut flags = ReqFlags::empty();
    let mut verbose = false;
    let mut rest = Vec::new();
    let mut it = args.iter();
    // getopt's way: flags may come together (`-zu`) and a value may follow its option
    // directly (`-P0x9a`).
    while let Some(&a) = it.next() {
        let Some(opts) = a.strip_prefix('-').filter(|o| !o.is_empty()) else {
            rest.push(a);
            continue;
        };
        for (i, c) in opts.char_indices() {
            match c {
                'P' => {
                    let attached = &opts[i + 1..];
                    let value = if attached.is_empty() {
                        it.next().copied()
                    } else {
                        Some(attached)
                    };
                    pattern = value.and_then(pattern_byte);
                    break;
                }
                'z' => zero = true,
                'c' => compressed = true,
                'u' => flags |= ReqFlags::MAY_UNMAP,
                'f' => flags |= ReqFlags::FUA,
                'v' => verbose = true,
                // qemu-io's way to exercise the accounting: nothing is sent.
                'i' if cmd == "aio_read" => {
                    blk.account_invalid(IoKind::Read);
                    return "injecting invalid read request\n".into();
                }
                'i' if cmd == "aio_write" => {
                    blk.account_invalid(IoKind::Write);
                    return "injecting invalid write request\n".into();
                }
                _ => {}
            }
        }
    }
    // `readv` and `writev` take several lengths, one buffer each, end to end.
    let vectored = matches!(cmd, "readv" | "writev");
    let range = || -> Option<(u64, u64)> {
        match rest.as_slice() {
            [o, l] => Some((number(o)?, number(l)?)),
            [o, lens @ ..] if vectored && !lens.is_empty() => {
                let total = lens
                    .iter()
                    .try_fold(0u64, |sum, l| sum.checked_add(number(l)?))?;
                Some((number(o)?, total))
            }
            _ => None,
        }
    };
    let in_bounds = |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= blk.len());
    // qemu-io accounts its asynchronous reads, writes of data and flushes as a device
    // would; its synchronous commands and zero writes bypass the accounting.
    let accounted = matches!(cmd, "aio_read" | "aio_flush") || (cmd == "aio_write" && !zero);
    let quiet = blk.unaccounted();
    let eio = || std::io::Error::from_raw_os_error(libc::EIO);
    let started = Instant::now();
    match cmd {
        "read" | "aio_read" | "readv" => {
            let Some((off, len)) = range() else {
                return format!("{cmd}: invalid arguments\n");
            };
            let r = if !in_bounds(off, len) {
                Err(eio())
            } else if accounted {
                blk.read(off, len as usize).await
            } else {
                quiet.read(off, len as usize).await
            };
            match r {
                Ok(data) => {
                    let mut out = String::new();
                    if let Some(p) = pattern
                        && data.iter().any(|&b| b != p)
                    {
                        out +=
                            &format!("Pattern verification failed at offset {off}, {len} bytes\n");
                    }
                    if verbose {
                        out += &dump(off, &data);
                    }
                    out + &report("read", off, len, started)
                }
                Err(e) => {
                    let what = if cmd == "read" { "read" } else { "readv" };
                    format!("{what} failed: {}\n", ferrite_qapi::os_msg(&e))
                }
            }
        }
        "write" | "aio_write" | "writev" => {
            let Some((off, len)) = range() else {
                return format!("{cmd}: invalid arguments\n");
            };
            let r = if !in_bounds(off, len) {
                Err(eio())
            } else if zero {
                quiet.write_zeroes(off, len, flags).await
            } else {
                let data = vec![pattern.unwrap_or(0xcd); len as usize];
                if compressed {
                    quiet.write_compressed(off, data).await
                } else if accounted {
                    blk.write(off, data, flags).await
                } else {
                    quiet.write(off, data, flags).await
                }
            };
            match r {
                Ok(()) => report("wrote", off, len, started),
                Err(e) => format!("{cmd} failed: {}\n", ferrite_qapi::os_msg(&e)),
            }
        }
        "discard" | "d" => {
            let Some((off, len)) = range() else {
                return format!("{cmd}: invalid arguments\n");
            };
            match quiet.discard(off, len).await {
                Ok(()) => report("discard", off, len, started),
                Err(e) => format!("discard failed: {}\n", ferrite_qapi::os_msg(&e)),
            }
        }
        "flush" | "f" | "aio_flush" => {
            let r = if accounted {
                blk.flush().await
            } else {
                quiet.flush().await
            };
            match r {
                Ok(()) => String::new(),
                Err(e) => format!("{cmd} failed: {}\n", ferrite_qapi::os_msg(&e)),
            }
        }
        "break" | "remove_break" | "resume" | "wait_break" => breakpoint(blk, cmd, &rest).await,
        "length" => format!("{}\n", cvtstr(blk.len() as f64)),
        "map" => map(blk).await,
        "alloc" => {
            let (off, len) = match rest.as_slice() {
                [o] => (number(o), Some(512)),
                [o, l] => (number(o), number(l)),
                _ => return format!("{cmd}: invalid arguments\n"),
            };
            let (Some(off), Some(len)) = (off, len) else {
                return format!("{cmd}: invalid arguments\n");
            };
            alloc(blk, off, len).await
        }
        _ => {
            // qemu-io says this on standard error.
            eprintln!("command \"{cmd}\" not found");
            String::new()
        }
    }
}

/// Whether the drive's top layer allocates `offset` (its backing files do not count), and
/// for how many bytes that holds.
async fn top_allocated(blk: &BlockBackend, offset: u64, len: u64) -> std::io::Result<(bool, u64)> {
    let node = blk
        .node()
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEDIUM))?;
    let backing = node.child("backing");
    let (allocated, n) = node
        .is_allocated_above(backing.as_ref(), false, offset, len)
        .await?;
    Ok((allocated, n.clamp(1, len)))
}

/// `map`: the runs of the image its top layer allocates and does not.
async fn map(blk: &BlockBackend) -> String {
    let len = blk.len();
    let mut out = String::new();
    let mut offset = 0;
    while offset < len {
        let (allocated, mut n) = match top_allocated(blk, offset, len - offset).await {
            Ok(r) => r,
            Err(e) => return format!("{out}map failed: {}\n", ferrite_qapi::os_msg(&e)),
        };
        // Runs of the same kind are one line.
        while offset + n < len {
            match top_allocated(blk, offset + n, len - offset - n).await {
                Ok((a, more)) if a == allocated => n += more,
                _ => break,
            }
        }
        out += &format!(
            "{} (0x{n:x}) bytes {} allocated at offset {} (0x{offset:x})\n",
            cvtstr(n as f64),
            if allocated { "   " } else { "not" },
            cvtstr(offset as f64),
        );
        offset += n;
    }
    out
}

/// `alloc OFFSET [COUNT]`: how much of a range the top layer allocates.
async fn alloc(blk: &BlockBackend, offset: u64, count: u64) -> String {
    let end = offset.saturating_add(count).min(blk.len());
    let (mut at, mut sum) = (offset, 0);
    while at < end {
        match top_allocated(blk, at, end - at).await {
            Ok((allocated, n)) => {
                if allocated {
                    sum += n;
                }
                at += n;
            }
            Err(e) => return format!("alloc failed: {}\n", ferrite_qapi::os_msg(&e)),
        }
    }
    format!(
        "{sum}/{} bytes allocated at offset {}\n",
        end.saturating_sub(offset),
        cvtstr(offset as f64)
    )
}

/// The blkdebug breakpoint commands, on the first node down the drive that has breakpoints.
async fn breakpoint(blk: &BlockBackend, cmd: &str, args: &[&str]) -> String {
    let Some(node) = blk.node() else {
        return String::new();
    };
    let strerror = |e: i32| ferrite_qapi::os_msg(&std::io::Error::from_raw_os_error(e));
    match (cmd, args) {
        ("break", [event, tag]) => {
            let known = ferrite_qapi::schema()
                .enum_values("BlkdebugEvent")
                .contains(event);
            let r = if known {
                node.debug_breakpoint(DebugOp::Break(event, tag))
            } else {
                Err(libc::ENOENT)
            };
            match r {
                Ok(_) => String::new(),
                Err(e) => format!("Could not set breakpoint: {}\n", strerror(e)),
            }
        }
        ("remove_break", [tag]) => match node.debug_breakpoint(DebugOp::Remove(tag)) {
            Ok(_) => String::new(),
            Err(e) => format!("Could not remove breakpoint {tag}: {}\n", strerror(e)),
        },
        ("resume", [tag]) => match node.debug_breakpoint(DebugOp::Resume(tag)) {
            Ok(_) => String::new(),
            Err(e) => format!("Could not resume request: {}\n", strerror(e)),
        },
        ("wait_break", [tag]) => {
            // As qemu-io: until a request is held there (the main loop keeps running).
            while !node
                .debug_breakpoint(DebugOp::IsSuspended(tag))
                .unwrap_or(true)
            {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            String::new()
        }
        _ => format!("{cmd}: invalid arguments\n"),
    }
}

/// Where `qemu-io [-d] NAME` runs: a drive (or with `-d`, a device's drive), else a node
/// through a backend of its own for the command's length.
pub(crate) enum Target {
    Drive(Rc<BlockBackend>),
    Node(Rc<ferrite_block::Node>),
}

/// Runs `line` on `target`, printing the report on standard output. Returns what the
/// monitor answers (nothing, or an error).
pub(crate) async fn run(
    daemon: &Rc<ferrite_storage_daemon::front_end::Daemon>,
    target: Target,
    line: &str,
) -> String {
    let graph = &daemon.graph;
    let cmd = line.split_whitespace().next().unwrap_or("");
    let need = perm_for(cmd);
    let blk = match target {
        // A drive keeps what a command took: QEMU cannot know when the requests a command
        // started (aio_write) are over, so it never gives the permissions back.
        Target::Drive(blk) => {
            let (perm, shared) = blk.perm();
            if !perm.contains(need)
                && let Err(e) = blk.set_perm(perm | need, shared)
            {
                // As QEMU's qemu-io prints the refusal: its text alone.
                return format!("{}\r\n", ferrite_qapi::Error::from(e).desc);
            }
            blk
        }
        Target::Node(node) => match BlockBackend::new(graph, &node, need, Perm::all()) {
            Ok(b) => b,
            Err(e) => return format!("Error: {}\r\n", ferrite_qapi::Error::from(e).desc),
        },
    };
    let line = line.to_owned();
    let monitors = daemon.monitors.borrow().clone();
    // What the monitors owe from before (a reply) is out before anything the request
    // prints on standard error, as QEMU's monitors write at once.
    for m in &monitors {
        m.flush_all().await;
    }
    // The backend lives until the report is out (a node's own one goes then).
    let finish = async move |_blk: Rc<BlockBackend>, out: String| {
        // What the request made the monitors say (a corruption event) comes first, as
        // QEMU's events are out before qemu-io prints.
        for m in &monitors {
            m.flush_all().await;
        }
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
    };
    if cmd == "reopen" {
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        let out = reopen::run(graph, &blk, &words).await;
        finish(blk, out).await;
        return String::new();
    }
    if matches!(cmd, "aio_read" | "aio_write" | "aio_discard") {
        // As qemu-io: the command returns at once, the report comes when the request ends
        // (a request held at a breakpoint must not hold the monitor).
        AIO_IN_FLIGHT.with(|n| n.set(n.get() + 1));
        tokio::task::spawn_local(async move {
            let out = command(&blk, &line).await;
            finish(blk, out).await;
            AIO_IN_FLIGHT.with(|n| n.set(n.get() - 1));
        });
        return String::new();
    }
    if cmd == "aio_flush" {
        while AIO_IN_FLIGHT.with(std::cell::Cell::get) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
    let out = command(&blk, &line).await;
    finish(blk, out).await;
    String::new()
}

thread_local! {
    /// qemu-io's asynchronous requests still running (`aio_flush` waits for them).
    static AIO_IN_FLIGHT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
mod tests {
    use super::{cvtstr, dump, number, pattern_byte};

    #[test]
    fn sizes_and_numbers_as_qemu_io_writes_and_reads_them() {
        assert_eq!(cvtstr(512.0), "512 bytes");
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr((1u64 << 20) as f64), "1 MiB");
        assert_eq!(number("64k"), Some(65536));
        assert_eq!(number("0x200"), Some(512));
        assert_eq!(number("1M"), Some(1 << 20));
        assert_eq!(number("x"), None);
        assert_eq!(dump(16, b"AB"), "00000010:  41 42  AB\n");
    }

    #[test]
    fn numbers_and_patterns_read_as_qemu_io_reads_them() {
        assert_eq!(number("0xab"), Some(0xab));
        assert_eq!(number("0x3ff0000"), Some(0x3ff_0000));
        assert_eq!(number("64k"), Some(65536));
        assert_eq!(number("512b"), Some(512));
        assert_eq!(number("32M"), Some(32 << 20));
        assert_eq!(number("1x"), None);
        assert_eq!(pattern_byte("0xab"), Some(0xab));
        assert_eq!(pattern_byte("0xd5"), Some(0xd5));
        assert_eq!(pattern_byte("42"), Some(42));
        assert_eq!(pattern_byte("010"), Some(8));
        assert_eq!(pattern_byte("0"), Some(0));
    }
}
