//! The VHDX log: a circular region of 4 KiB sectors where metadata changes are written
//! before they are made, so that a crash between the two leaves an image the next writable
//! open repairs by replaying them (QEMU: block/vhdx-log.c).
//!
//! An entry is a header sector (64-byte header, then 32-byte descriptors) followed by one
//! data sector per data descriptor: the sector to write, its first eight and last four
//! bytes in the descriptor, and the sequence number split around the rest. A zero
//! descriptor zeroes a range instead. The whole entry is checksummed with CRC-32C.
//!
//! As QEMU does, each BAT change is one entry written, flushed, applied and retired
//! (`log_guid` cleared) before the write that needed it returns, and the log is searched
//! for the newest run of entries when an image is opened.

use super::format::{Guid, checksum, guid_at, le32, le64, put, seal};
use ferrite_block::{Child, ReqFlags};
use std::io;

pub(super) const SECTOR: u64 = 4096;
const ENTRY_HEADER_LEN: usize = 64;
const DESCRIPTOR_LEN: usize = 32;
const ENTRY_MAGIC: &[u8; 4] = b"loge";
const DATA_DESC_MAGIC: &[u8; 4] = b"desc";
const ZERO_DESC_MAGIC: &[u8; 4] = b"zero";
const DATA_MAGIC: &[u8; 4] = b"data";

fn errno(n: i32) -> io::Error {
    io::Error::from_raw_os_error(n)
}

/// An entry's header.
#[derive(Clone, Copy, Debug, Default)]
struct EntryHeader {
    magic: [u8; 4],
    checksum: u32,
    entry_length: u32,
    tail: u32,
    sequence: u64,
    descriptors: u32,
    log_guid: Guid,
    flushed_file_offset: u64,
    last_file_offset: u64,
}

impl EntryHeader {
    fn parse(b: &[u8]) -> EntryHeader {
        let mut magic = [0; 4];
        magic.copy_from_slice(&b[..4]);
        EntryHeader {
            magic,
            checksum: le32(b, 4),
            entry_length: le32(b, 8),
            tail: le32(b, 12),
            sequence: le64(b, 16),
            descriptors: le32(b, 24),
            log_guid: guid_at(b, 32),
            flushed_file_offset: le64(b, 48),
            last_file_offset: le64(b, 56),
        }
    }

    fn store(&self, b: &mut [u8]) {
        put(b, 0, &self.magic);
        put(b, 4, &self.checksum.to_le_bytes());
        put(b, 8, &self.entry_length.to_le_bytes());
        put(b, 12, &self.tail.to_le_bytes());
        put(b, 16, &self.sequence.to_le_bytes());
        put(b, 24, &self.descriptors.to_le_bytes());
        put(b, 32, &self.log_guid);
        put(b, 48, &self.flushed_file_offset.to_le_bytes());
        put(b, 56, &self.last_file_offset.to_le_bytes());
    }
}

/// A descriptor: a sector to write from a data sector, or a range to zero.
#[derive(Clone, Copy, Debug)]
struct Descriptor {
    zero: bool,
    trailing: [u8; 4],
    /// Leading bytes of a data descriptor; the length of a zero one.
    leading: u64,
    file_offset: u64,
    sequence: u64,
}

impl Descriptor {
    /// The descriptor at `b`, if it is one of this entry's and its fields are sound.
    fn parse(b: &[u8], sequence: u64) -> Option<Descriptor> {
        let zero = &b[..4] == ZERO_DESC_MAGIC;
        let d = Descriptor {
            zero,
            trailing: [b[4], b[5], b[6], b[7]],
            leading: le64(b, 8),
            file_offset: le64(b, 16),
            sequence: le64(b, 24),
        };
        let sound = d.sequence == sequence
            && d.file_offset % SECTOR == 0
            && if zero {
                d.leading % SECTOR == 0
            } else {
                &b[..4] == DATA_DESC_MAGIC
            };
        sound.then_some(d)
    }
}

/// How many sectors an entry's header and `descriptors` descriptors take.
fn descriptor_sectors(descriptors: u32) -> u64 {
    (u64::from(descriptors) + 2).div_ceil(SECTOR / DESCRIPTOR_LEN as u64)
}

/// The log's place in the file and where reading and writing are in it.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Log {
    pub(super) offset: u64,
    pub(super) length: u64,
    read: u64,
    write: u64,
    /// Where the newest entry starts (the next entry's `tail`).
    tail: u64,
    /// The next entry's sequence number (0: none written yet).
    pub(super) sequence: u64,
}

/// A run of entries found by [`Log::search`]: a cursor over them, and how many.
#[derive(Clone, Copy, Debug)]
pub(super) struct Run {
    cursor: Log,
    count: u64,
}

impl Log {
    pub(super) fn new(offset: u64, length: u64) -> Log {
        Log {
            offset,
            length,
            ..Log::default()
        }
    }

    /// Where position `pos` of the log is in the file; EIO past the largest offset a
    /// request may reach (QEMU's request check), where a damaged header may place the log.
    fn at(&self, pos: u64) -> io::Result<u64> {
        self.offset
            .checked_add(pos)
            .filter(|&at| at <= i64::MAX as u64 - SECTOR)
            .ok_or_else(|| errno(libc::EIO))
    }

    fn next(&self, at: u64) -> u64 {
        let at = at + SECTOR;
        if at >= self.length { 0 } else { at }
    }

    /// The header of the entry at the read position, which does not move (a header that
    /// would not fit before the log's end is read at its start).
    async fn peek(&self, file: &Child) -> io::Result<EntryHeader> {
        if self.read % SECTOR != 0 {
            return Err(errno(libc::EFAULT));
        }
        let mut read = self.read;
        if read + ENTRY_HEADER_LEN as u64 > self.length {
            read = 0;
        }
        if read == self.write {
            return Err(errno(libc::EINVAL));
        }
        let b = file.read(self.at(read)?, ENTRY_HEADER_LEN).await?;
        Ok(EntryHeader::parse(&b))
    }

    /// The sector at the read position, read moving past it; `None` where the writes end.
    async fn read_sector(&mut self, file: &Child) -> io::Result<Option<Vec<u8>>> {
        if self.read == self.write {
            return Ok(None);
        }
        let sector = file.read(self.at(self.read)?, SECTOR as usize).await?;
        self.read = self.next(self.read);
        Ok(Some(sector))
    }

    fn header_is_valid(&self, h: &EntryHeader, log_guid: &Guid) -> bool {
        &h.magic == ENTRY_MAGIC
            && u64::from(h.entry_length) <= self.length
            && u64::from(h.entry_length) % SECTOR == 0
            && h.sequence != 0
            && &h.log_guid == log_guid
            && u64::from(h.descriptors) * DESCRIPTOR_LEN as u64 <= u64::from(h.entry_length)
    }

    /// The entry at the read position's header, descriptor sectors and descriptors, read
    /// moving past the descriptor sectors. EINVAL for a header or descriptor that is not
    /// sound (QEMU fails the open then).
    async fn read_descriptors(
        &mut self,
        file: &Child,
        log_guid: &Guid,
    ) -> io::Result<(EntryHeader, Vec<Vec<u8>>, Vec<Descriptor>)> {
        let h = self.peek(file).await?;
        if !self.header_is_valid(&h, log_guid) {
            return Err(errno(libc::EINVAL));
        }
        let n = descriptor_sectors(h.descriptors);
        let mut sectors = Vec::new();
        let mut descs = Vec::new();
        // Sector by sector, so that a count the file cannot back fails before it takes
        // memory.
        while (sectors.len() as u64) < n {
            let Some(s) = self.read_sector(file).await? else {
                return Err(errno(libc::EINVAL));
            };
            let first = if sectors.is_empty() { 2 } else { 0 };
            for k in first..SECTOR as usize / DESCRIPTOR_LEN {
                if descs.len() as u64 == u64::from(h.descriptors) {
                    break;
                }
                let d = Descriptor::parse(&s[k * DESCRIPTOR_LEN..][..DESCRIPTOR_LEN], h.sequence)
                    .ok_or_else(|| errno(libc::EINVAL))?;
                descs.push(d);
            }
            sectors.push(s);
        }
        Ok((h, sectors, descs))
    }

    /// Checks the entry at the read position (QEMU's `vhdx_validate_log_entry`): its
    /// header, its sequence number following `after` (unless 0), and its checksum. A bad
    /// header moves the read position one sector on; otherwise it moves past what was read.
    async fn validate(
        &mut self,
        file: &Child,
        log_guid: &Guid,
        after: u64,
    ) -> io::Result<Option<EntryHeader>> {
        let h = self.peek(file).await?;
        if !self.header_is_valid(&h, log_guid) || (after > 0 && h.sequence != after.wrapping_add(1))
        {
            self.read = self.next(self.read);
            return Ok(None);
        }
        let (h, sectors, _) = self.read_descriptors(file, log_guid).await?;
        let mut entry: Vec<u8> = sectors.concat();
        let total = u64::from(h.entry_length) / SECTOR;
        for _ in sectors.len() as u64..total {
            let Some(s) = self.read_sector(file).await? else {
                return Ok(None);
            };
            entry.extend_from_slice(&s);
        }
        // The checksum covers the whole entry; a header claiming fewer sectors than its
        // descriptors take is checked over those.
        Ok((checksum(&entry, 4) == h.checksum).then_some(h))
    }

    /// The newest run of consecutive entries of `log_guid` (QEMU's `vhdx_log_search`,
    /// quirks included: runs are compared by their first entry, whose successor need not
    /// follow it). The log's next sequence number is set after the run's first entry.
    pub(super) async fn search(
        &mut self,
        file: &Child,
        log_guid: &Guid,
    ) -> io::Result<Option<Run>> {
        let mut cur = *self;
        cur.write = cur.length;
        cur.read = 0;
        let file_len = file.len();
        let mut best: Option<(Run, u64)> = None;
        loop {
            let tail = cur.read;
            // Past the file's end every sector reads as zeroes: no entry can start there.
            if self.at(cur.read)? >= file_len {
                break;
            }
            if let Some(h) = cur.validate(file, log_guid, 0).await? {
                let mut run = Run {
                    cursor: Log {
                        read: tail,
                        write: cur.read,
                        ..cur
                    },
                    count: 1,
                };
                let mut after = 0;
                while let Some(next) = cur.validate(file, log_guid, after).await? {
                    run.cursor.write = cur.read;
                    run.count += 1;
                    after = next.sequence;
                }
                if best.as_ref().is_none_or(|(_, seq)| h.sequence > *seq) {
                    best = Some((run, h.sequence));
                }
            }
            if cur.read < tail {
                break;
            }
        }
        Ok(best.map(|(run, seq)| {
            self.sequence = seq.wrapping_add(1);
            run
        }))
    }

    /// Writes the run's entries' sectors where they belong (QEMU's `vhdx_log_flush`
    /// between its header updates), growing the file to what the entries say it holds,
    /// and flushes.
    pub(super) async fn replay(file: &Child, run: &mut Run, log_guid: &Guid) -> io::Result<()> {
        for _ in 0..run.count {
            let h = run.cursor.peek(file).await?;
            let file_len = file.len();
            if h.flushed_file_offset > file_len {
                return Err(errno(libc::EINVAL));
            }
            let (h, _, descs) = run.cursor.read_descriptors(file, log_guid).await?;
            for d in descs {
                if d.zero {
                    file.write_zeroes(d.file_offset, d.leading, ReqFlags::FUA)
                        .await?;
                    continue;
                }
                let Some(data) = run.cursor.read_sector(file).await? else {
                    return Err(errno(libc::EINVAL));
                };
                let seq = (u64::from(le32(&data, 4)) << 32) | u64::from(le32(&data, 4092));
                if seq != d.sequence {
                    return Err(errno(libc::EINVAL));
                }
                let mut sector = data;
                put(&mut sector, 0, &d.leading.to_le_bytes());
                put(&mut sector, 4092, &d.trailing);
                file.write(d.file_offset, sector, ReqFlags::FUA).await?;
            }
            if file_len < h.last_file_offset {
                let grown = h.last_file_offset.next_multiple_of(super::format::MIB);
                if grown > i64::MAX as u64 {
                    return Err(errno(libc::EINVAL));
                }
                file.truncate(grown).await?;
            }
        }
        file.flush().await
    }

    /// Writes an entry changing the file's bytes at `offset` to `data` (QEMU's
    /// `vhdx_log_write`; the caller has set `log_guid` in the headers). Sectors `data`
    /// covers only in part are completed from the file. `file_len` goes into the entry as
    /// the file's size.
    pub(super) async fn append(
        &mut self,
        file: &Child,
        log_guid: &Guid,
        offset: u64,
        data: &[u8],
        file_len: u64,
    ) -> io::Result<()> {
        if data.len() as u64 > self.length {
            return Err(errno(libc::EINVAL));
        }
        if self.sequence == 0 {
            self.sequence = 1;
        }
        let first = offset - offset % SECTOR;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| errno(libc::EINVAL))?;
        let count = (end - first).div_ceil(SECTOR);
        let desc_sectors = descriptor_sectors(count as u32);
        let total = desc_sectors + count;
        let mut entry = vec![0u8; (total * SECTOR) as usize];
        for i in 0..count {
            let at = first + i * SECTOR;
            let mut sector = if at < offset || at + SECTOR > end {
                file.read(at, SECTOR as usize).await?
            } else {
                vec![0u8; SECTOR as usize]
            };
            let from = at.max(offset);
            let to = (at + SECTOR).min(end);
            sector[(from - at) as usize..(to - at) as usize]
                .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            let d = DESCRIPTOR_LEN * (2 + i as usize);
            put(&mut entry, d, DATA_DESC_MAGIC);
            put(&mut entry, d + 4, &sector[4092..]);
            put(&mut entry, d + 8, &sector[..8]);
            put(&mut entry, d + 16, &at.to_le_bytes());
            put(&mut entry, d + 24, &self.sequence.to_le_bytes());
            let s = ((desc_sectors + i) * SECTOR) as usize;
            put(&mut entry, s, DATA_MAGIC);
            put(
                &mut entry,
                s + 4,
                &((self.sequence >> 32) as u32).to_le_bytes(),
            );
            put(&mut entry, s + 8, &sector[8..4092]);
            put(&mut entry, s + 4092, &(self.sequence as u32).to_le_bytes());
        }
        EntryHeader {
            magic: *ENTRY_MAGIC,
            checksum: 0,
            entry_length: (total * SECTOR) as u32,
            tail: self.tail as u32,
            sequence: self.sequence,
            descriptors: count as u32,
            log_guid: *log_guid,
            flushed_file_offset: file_len,
            last_file_offset: file_len,
        }
        .store(&mut entry);
        seal(&mut entry, 4);
        let mut write = self.write;
        for sector in entry.chunks(SECTOR as usize) {
            let at = self.at(write)?;
            write = self.next(write);
            if write == self.read {
                // The log is full: QEMU stops here and fails the write.
                return Err(errno(libc::EINVAL));
            }
            file.write(at, sector.to_vec(), ReqFlags::empty()).await?;
            self.write = write;
        }
        self.sequence = self.sequence.wrapping_add(1);
        self.tail = self.write;
        Ok(())
    }

    /// The entries written since the last were applied, to be applied now (QEMU applies
    /// each entry straight after writing it).
    pub(super) fn pending(&self) -> Run {
        Run {
            cursor: *self,
            count: 1,
        }
    }

    /// After `run` was applied: reading and writing go on where it ended.
    pub(super) fn resume(&mut self, run: &Run) {
        *self = run.cursor;
    }

    /// After the replay on open: reading and writing start over at the log's start.
    pub(super) fn reset(&mut self) {
        self.read = 0;
        self.write = 0;
    }
}
