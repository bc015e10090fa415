//! The repair of a Parallels image opened writable that needs it (QEMU's
//! `parallels_co_check` with errors and leaks fixed, as `parallels_open` runs it): each
//! finding said on standard error in QEMU's words, in its order:
//! - the image was not closed cleanly (nothing more to do: closing marks it);
//! - `data_off` is wrong: set to where the data area must start;
//! - entries pointing (partly) past the file's end: cleared;
//! - the file longer than its last cluster: cut back;
//! - clusters two entries share: the later entry's cluster copied to a new one.
//!
//! Then the BAT is made durable. Beyond QEMU: an entry pointing before the data area is
//! moved as a shared one is (QEMU's check aborts on it), and the used clusters are read
//! again from the repaired BAT (QEMU keeps what it had, and after repairing an image not
//! closed cleanly places its second new cluster over the first cluster of the disk).

use super::used::Used;
use super::{SECTOR, State};
use std::io;

pub(super) async fn repair(s: &State) -> io::Result<()> {
    if s.unclean.replace(false) {
        eprintln!("Repairing image was not closed correctly");
    }
    repair_data_off(s);
    let image_end = repair_outside(s);
    let size = s.file.len();
    if size > image_end {
        eprintln!(
            "Repairing space leaked at the end of the image {}",
            size - image_end
        );
        s.file.truncate(image_end).await?;
    }
    let image_end = repair_shared(s, image_end).await?;
    if s.file.len() > image_end {
        s.file.truncate(image_end).await?;
    }
    // Whatever the used clusters were before, they are the BAT's now.
    let _ = s.fill_used();
    s.write_bat().await?;
    s.file.flush().await
}

/// QEMU's `parallels_check_data_off`.
fn repair_data_off(s: &State) {
    let (start, ok) = s.header.borrow().data_start(s.file.len() / SECTOR);
    if ok {
        return;
    }
    s.header.borrow_mut().data_off = start as u32;
    s.data_start.set(start);
    s.mark_header_changed();
    let _ = s.fill_used();
    eprintln!("Repairing data_off field has incorrect value");
}

/// QEMU's `parallels_check_outside_image`: returns where the last cluster ends (the
/// image's end), which is also the data area's end from now on.
fn repair_outside(s: &State) -> u64 {
    let size = s.file.len();
    let c = s.g.cluster;
    let mut high = 0;
    for i in 0..s.held() {
        let off = s.sector_of(i) * SECTOR;
        // Beyond QEMU, which "repairs" entries pointing nowhere too when the file is
        // shorter than a cluster (one line each, for millions of entries).
        if off != 0 && off + c > size {
            eprintln!("Repairing cluster {i} is outside image");
            s.set_entry(i, 0);
            continue;
        }
        high = high.max(off);
    }
    if high == 0 {
        return s.data_end.get() * SECTOR;
    }
    s.data_end.set((high + c) / SECTOR);
    high + c
}

/// QEMU's `parallels_check_duplicate`: every entry after the first claiming a cluster
/// gets a cluster of its own with the same bytes. Returns the image's end after that.
async fn repair_shared(s: &State, image_end: u64) -> io::Result<u64> {
    let c = s.g.cluster;
    let Some(span) = image_end.checked_sub(s.data_start.get() * SECTOR) else {
        return Ok(image_end);
    };
    let mut size = span / c;
    if size == 0 {
        return Ok(image_end);
    }
    if image_end % c != 0 {
        size += 1;
    }
    let mut claimed = Used::new(size);
    let mut end = image_end;
    for i in 0..s.held() {
        let Some(host) = s.host_of(i) else {
            continue;
        };
        let at = s.used_index(host);
        if claimed.claim(at, 1).is_ok() {
            continue;
        }
        if at.is_none() {
            eprintln!("Repairing BAT entry {i} points before the data area");
        } else {
            eprintln!("Repairing duplicate offset in BAT entry {i}");
        }
        let old = s.entry(i);
        s.set_entry(i, 0);
        let moved = async {
            let data = s.file.read(host, c as usize).await?;
            let (new, _) = s.place(i, 1, async |_, _| Ok(())).await?;
            s.file
                .write(new, data, ferrite_block::ReqFlags::empty())
                .await?;
            match claimed.claim(s.used_index(new), 1) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(e),
                _ => Ok(new),
            }
        };
        match moved.await {
            Ok(new) => end = end.max(new + c),
            Err(e) => {
                s.set_entry(i, old);
                return Err(e);
            }
        }
    }
    Ok(end)
}
