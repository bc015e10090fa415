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

/// A number as qemu-io takes it ([`cvtnum`]), or `None`.
fn number(s: &str) -> Option<u64> {
    cvtnum(s).ok()
}

/// qemu-io's `cvtnum`: a size as QEMU's `qemu_strtosz` reads it, at most `i64::MAX`.
/// Decimal, with a fraction if a suffix follows (`1.5k`), and one of the suffixes
/// B, K, M, G, T, P, E (powers of 1024, either case); or 0x hex with neither (its digits
/// include `b`: `0xab` is 171). Errs with the errno qemu-io reports: EINVAL for what is
/// not such a number, ERANGE for what is too large (a minus sign included).
fn cvtnum(s: &str) -> Result<u64, i32> {
    if s.starts_with('-') {
        return Err(libc::ERANGE);
    }
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (mut val, mut rest) = if digits == 0 {
        (0u64, s)
    } else {
        (
            s[..digits].parse::<u64>().map_err(|_| libc::ERANGE)?,
            &s[digits..],
        )
    };
    if s[..digits] == *"0" && (rest.starts_with('x') || rest.starts_with('X')) {
        let hex = &rest[1..];
        let end = hex
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(hex.len());
        if end == 0 {
            return Err(libc::EINVAL);
        }
        val = u64::from_str_radix(&hex[..end], 16).map_err(|_| libc::ERANGE)?;
        return match &hex[end..] {
            "" if val <= i64::MAX as u64 => Ok(val),
            "" => Err(libc::ERANGE),
            _ => Err(libc::EINVAL),
        };
    }
    // The fraction, as a binary fraction of 2^64 (QEMU's `valf`).
    let mut fraction = 0u64;
    if let Some(after) = rest.strip_prefix('.') {
        let end = after
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(after.len());
        if end > 0 {
            let f: f64 = format!("0.{}", &after[..end])
                .parse()
                .map_err(|_| libc::EINVAL)?;
            if f >= 1.0 {
                val = val.checked_add(1).ok_or(libc::ERANGE)?;
            } else {
                fraction = ((f * 2f64.powi(64)) as u64).max(u64::from(f > 0.0));
            }
        }
        rest = &after[end..];
    } else if digits == 0 {
        return Err(libc::EINVAL);
    }
    let shift = match rest.chars().next() {
        Some('b' | 'B') => Some(0),
        Some('k' | 'K') => Some(10),
        Some('m' | 'M') => Some(20),
        Some('g' | 'G') => Some(30),
        Some('t' | 'T') => Some(40),
        Some('p' | 'P') => Some(50),
        Some('e' | 'E') => Some(60),
        _ => None,
    };
    if shift.is_some() {
        rest = &rest[1..];
    }
    let mul = 1u128 << shift.unwrap_or(0);
    if mul == 1 && fraction != 0 {
        return Err(libc::EINVAL);
    }
    // The fraction's share rounded to the nearest byte, as QEMU rounds it.
    let part = u128::from(fraction) * mul;
    let total = u128::from(val) * mul + (part >> 64) + ((part >> 63) & 1);
    if total > u128::from(u64::MAX) {
        return Err(libc::ERANGE);
    }
    if !rest.is_empty() {
        return Err(libc::EINVAL);
    }
    if total > i64::MAX as u128 {
        return Err(libc::ERANGE);
    }
    Ok(total as u64)
}

/// The longest request the block layer takes (QEMU's `BDRV_REQUEST_MAX_BYTES`).
const REQUEST_MAX_BYTES: u64 = (i32::MAX as u64) & !511;

/// What qemu-io's `read` and `write` say of a length too long for one request, or of a
/// range not in whole sectors where `sectors` (VM state, compressed writes) needs them.
fn unfit(cmd: &str, off: u64, len: u64, args: &[&str], sectors: bool) -> Option<String> {
    if !matches!(cmd, "read" | "write") {
        return None;
    }
    if len > REQUEST_MAX_BYTES {
        let n = if cmd == "write" { " without -n" } else { "" };
        let given = args.get(1).copied().unwrap_or_default();
        return Some(format!(
            "length cannot exceed {REQUEST_MAX_BYTES}{n}, given {given}\n"
        ));
    }
    if sectors {
        for (value, what) in [(off, "offset"), (len, "count")] {
            if value % 512 != 0 {
                return Some(format!(
                    "{value} is not a sector-aligned value for '{what}'\n"
                ));
            }
        }
    }
    None
}

/// What qemu-io prints when [`cvtnum`] refuses `arg`.
fn cvtnum_error(errno: i32, arg: &str) -> String {
    match errno {
        libc::EINVAL => format!(
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}\n"
        ),
        libc::ERANGE => format!("Parsing error: argument too large -- {arg}\n"),
        _ => format!("Parsing error: {arg}\n"),
    }
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
    let mut vmstate = false;
    let mut flags = ReqFlags::empty();
    let mut verbose = false;
    let mut rest = Vec::new();
    let mut it = args.iter();
    // getopt's way: flags may come together (`-zu`) and a value may follow its option
    // directly (`-P0x9a`).
    while let Some(&a) = it.next() {
        if a == "--" {
            // getopt's end of options: what follows is taken as it is (`read -- -1 512`).
            rest.extend(it.by_ref().copied());
            break;
        }
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
                'b' if matches!(cmd, "read" | "write") => vmstate = true,
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
    // The offset and length (the lengths' sum for a vectored command), or what qemu-io
    // says of the first argument it cannot take.
    let range = || -> Result<(u64, u64), String> {
        let num = |a: &str| cvtnum(a).map_err(|e| cvtnum_error(e, a));
        match rest.as_slice() {
            [o, l] => Ok((num(o)?, num(l)?)),
            [o, lens @ ..] if vectored && !lens.is_empty() => {
                let off = num(o)?;
                let mut total = 0u64;
                for l in lens {
                    total = total
                        .checked_add(num(l)?)
                        .ok_or_else(|| cvtnum_error(libc::ERANGE, l))?;
                }
                Ok((off, total))
            }
            _ => Err(format!("{cmd}: invalid arguments\n")),
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
            let (off, len) = match range() {
                Ok(r) => r,
                Err(said) => return said,
            };
            if let Some(said) = unfit(cmd, off, len, &rest, vmstate) {
                return said;
            }
            let r = if vmstate {
                vm_state(blk, off, len, None).await
            } else if !in_bounds(off, len) {
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
            if vmstate && zero {
                return "-b and -z cannot be specified at the same time\n".into();
            }
            let (off, len) = match range() {
                Ok(r) => r,
                Err(said) => return said,
            };
            if let Some(said) = unfit(cmd, off, len, &rest, vmstate || compressed) {
                return said;
            }
            let r = if vmstate {
                let data = vec![pattern.unwrap_or(0xcd); len as usize];
                vm_state(blk, off, len, Some(data)).await.map(drop)
            } else if !in_bounds(off, len) {
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
            let (off, len) = match range() {
                Ok(r) => r,
                Err(said) => return said,
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

/// `-b`: reads `len` bytes of the VM state area at `off`, or writes `data` there (flushed
/// after under `cache=writethrough`, as QEMU's `blk_save_vmstate` does).
async fn vm_state(
    blk: &BlockBackend,
    off: u64,
    len: u64,
    data: Option<Vec<u8>>,
) -> std::io::Result<Vec<u8>> {
    let node = blk
        .node()
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEDIUM))?;
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= i32::MAX as usize)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ERANGE))?;
    match data {
        None => ferrite_blockdev::vm_snapshot::load_vmstate(&node, off, len).await,
        Some(data) => {
            ferrite_blockdev::vm_snapshot::save_vmstate(&node, off, data).await?;
            if !blk.write_cache() {
                node.flush().await?;
            }
            Ok(Vec::new())
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
                // As QEMU's qemu-io reports the refusal: its text, then its hint.
                let e = ferrite_qapi::Error::from(e);
                let hint = e.hint.map(|h| format!("{h}\r\n")).unwrap_or_default();
                return format!("{}\r\n{hint}", e.desc);
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
        return match reopen::run(graph, &blk, &words).await {
            Ok(()) => String::new(),
            Err(reopen::Said::Usage) => {
                finish(blk, reopen::USAGE.to_owned()).await;
                String::new()
            }
            Err(reopen::Said::Error(text)) => format!("{text}\r\n"),
        };
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
    fn numbers_and_their_refusals_as_qemus_strtosz() {
        use super::cvtnum;
        let einval = Err(libc::EINVAL);
        let erange = Err(libc::ERANGE);
        for (text, want) in [
            ("1.5k", Ok(1536)),
            ("0.5M", Ok(1 << 19)),
            ("1.k", Ok(1024)),
            (".5k", Ok(512)),
            ("1.0001k", Ok(1024)),
            ("1.0005k", Ok(1025)),
            ("2P", Ok(1 << 51)),
            ("7E", Ok(7 << 60)),
            ("0x10", Ok(16)),
            ("1.5", einval),
            ("1G-64k", einval),
            ("abc", einval),
            ("0x10k", einval),
            ("0x", einval),
            ("", einval),
            ("8E", erange),
            ("16E", erange),
            ("-1", erange),
            ("99999999999999999999", erange),
        ] {
            assert_eq!(cvtnum(text), want, "{text}");
        }
    }

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
