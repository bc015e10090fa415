//! LUKS1 volumes: the header (592 bytes, big-endian), unlocking a key slot with a password,
//! and the master key check.

use crate::cipher::{SECTOR, SectorCipher};
use crate::hash::Hash;
use crate::{Error, af};
use ferrite_qobject::{QDict, QObject};

const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// Bytes of the header proper.
pub const HEADER_LEN: usize = 592;
pub(crate) const SLOTS: usize = 8;
const SLOT_ACTIVE: u32 = 0x00AC_71F3;
const SLOT_INACTIVE: u32 = 0x0000_DEAD;
const DIGEST_LEN: usize = 20;

/// One key slot.
#[derive(Debug, Clone)]
pub struct KeySlot {
    /// Whether the slot holds the master key.
    pub active: bool,
    /// PBKDF2 iterations of the slot's key.
    pub iterations: u32,
    salt: [u8; 32],
    /// Where the slot's key material starts, in bytes.
    pub key_offset: u64,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

/// A LUKS1 header.
#[derive(Debug, Clone)]
pub struct Header {
    /// `cipher-name` (`aes`).
    pub cipher: String,
    /// `cipher-mode` (`xts-plain64`).
    pub mode: String,
    /// `hash-spec` (`sha256`).
    pub hash: String,
    /// Where the encrypted data starts, in bytes.
    pub payload_offset: u64,
    /// Bytes of the master key.
    pub key_bytes: usize,
    mk_digest: [u8; DIGEST_LEN],
    mk_salt: [u8; 32],
    /// PBKDF2 iterations of the master key digest.
    pub mk_iterations: u32,
    /// The volume's UUID.
    pub uuid: String,
    /// The eight key slots.
    pub slots: Vec<KeySlot>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

impl Header {
    /// Parses the first [`HEADER_LEN`] bytes of a volume, with the checks that keep what
    /// follows in bounds.
    ///
    /// # Errors
    /// Not LUKS, another version, or fields out of range.
    pub fn parse(b: &[u8]) -> Result<Header, Error> {
        if b.len() < HEADER_LEN || &b[..6] != MAGIC {
            return Err(Error::NotLuks);
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(Error::Version(version));
        }
        let key_bytes = be32(b, 108) as usize;
        if !(16..=64).contains(&key_bytes) {
            return Err(Error::Damaged(format!("master key of {key_bytes} bytes")));
        }
        let mut slots = Vec::with_capacity(SLOTS);
        for i in 0..SLOTS {
            let s = 208 + i * 48;
            let mut salt = [0u8; 32];
            salt.copy_from_slice(&b[s + 8..s + 40]);
            let stripes = be32(b, s + 44);
            let active = be32(b, s) == SLOT_ACTIVE;
            if active && !(1..=4000 * 16).contains(&stripes) {
                return Err(Error::Damaged(format!(
                    "key slot {i} with {stripes} stripes"
                )));
            }
            slots.push(KeySlot {
                active,
                iterations: be32(b, s + 4),
                salt,
                key_offset: u64::from(be32(b, s + 40)) * SECTOR as u64,
                stripes,
            });
        }
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&b[112..132]);
        let mut mk_salt = [0u8; 32];
        mk_salt.copy_from_slice(&b[132..164]);
        Ok(Header {
            cipher: text(&b[8..40]),
            mode: text(&b[40..72]),
            hash: text(&b[72..104]),
            payload_offset: u64::from(be32(b, 104)) * SECTOR as u64,
            key_bytes,
            mk_digest,
            mk_salt,
            mk_iterations: be32(b, 164),
            uuid: text(&b[168..208]),
            slots,
        })
    }

    /// What queries say of the volume (QEMU's `QCryptoBlockInfoLUKS`).
    pub fn info(&self) -> QDict {
        // XTS keys are two AES keys.
        let bits = if self.mode.starts_with("xts") {
            self.key_bytes * 8 / 2
        } else {
            self.key_bytes * 8
        };
        let slots: Vec<QObject> = self
            .slots
            .iter()
            .map(|s| {
                let mut d = QDict::new().with("active", s.active);
                if s.active {
                    d.insert("iters", u64::from(s.iterations));
                }
                d.insert("key-offset", s.key_offset);
                if s.active {
                    d.insert("stripes", u64::from(s.stripes));
                }
                QObject::Dict(d)
            })
            .collect();
        let (mode, ivgen) = self
            .mode
            .split_once('-')
            .unwrap_or((self.mode.as_str(), ""));
        let mut d = QDict::new();
        match ivgen.split_once(':') {
            Some((alg, hash)) => {
                d.insert("ivgen-alg", alg);
                d.insert("ivgen-hash-alg", hash);
            }
            None => d.insert("ivgen-alg", ivgen),
        }
        // QEMU's test: a payload at 0 cannot share its file with the header.
        d.with("detached-header", self.payload_offset == 0)
            .with("hash-alg", self.hash.as_str())
            .with("cipher-alg", format!("{}-{bits}", self.cipher))
            .with("uuid", self.uuid.as_str())
            .with("cipher-mode", mode)
            .with("slots", slots)
            .with("payload-offset", self.payload_offset)
            .with("master-key-iters", u64::from(self.mk_iterations))
    }

    /// The master key, from the first active slot `password` opens.
    ///
    /// # Errors
    /// No slot opens; an unsupported hash.
    pub(crate) fn master_key(&self, area: &[u8], password: &[u8]) -> Result<Vec<u8>, Error> {
        let hash = Hash::parse(&self.hash)?;
        self.slots
            .iter()
            .filter(|s| s.active)
            .find_map(|s| self.try_slot(hash, area, s, password))
            .ok_or(Error::InvalidPassword)
    }

    /// Whether slot `slot` is active and `password` opens it.
    pub(crate) fn slot_opens(&self, area: &[u8], slot: usize, password: &[u8]) -> bool {
        let Ok(hash) = Hash::parse(&self.hash) else {
            return false;
        };
        self.slots
            .get(slot)
            .filter(|s| s.active)
            .is_some_and(|s| self.try_slot(hash, area, s, password).is_some())
    }

    /// Marks slot `slot` unused in the header bytes `head` (its salt and count zeroed).
    pub(crate) fn clear_slot(&self, head: &mut [u8], slot: usize) {
        let s = 208 + slot * 48;
        put(head, s, &SLOT_INACTIVE.to_be_bytes());
        put(head, s + 4, &0u32.to_be_bytes());
        put(head, s + 8, &[0u8; 32]);
    }

    /// The writes that put `master` in slot `slot` under `password`: its key material, then
    /// the header naming it (QEMU's `qcrypto_block_luks_store_key`), with PBKDF2 iterations
    /// for about `iter_time` milliseconds.
    ///
    /// # Errors
    /// An unsupported hash or cipher; no random numbers.
    pub(crate) fn store_key(
        &self,
        area: &[u8],
        slot: usize,
        password: &[u8],
        master: &[u8],
        iter_time: u64,
    ) -> Result<crate::amend::Writes, Error> {
        let sealed = SealedSlot::new(
            Hash::parse(&self.hash)?,
            &self.mode,
            master,
            password,
            iter_time,
        )?;
        let mut head = area[..HEADER_LEN].to_vec();
        sealed.activate(&mut head, slot);
        put(&mut head, 208 + slot * 48 + 44, &STRIPES.to_be_bytes());
        Ok(vec![
            (self.slots[slot].key_offset, sealed.material),
            (0, head),
        ])
    }

    /// Bytes of a slot's key material.
    fn material_len(&self, slot: &KeySlot) -> usize {
        (self.key_bytes * slot.stripes as usize).next_multiple_of(SECTOR)
    }

    /// The master key in `slot`, if `password` opens it.
    fn try_slot(
        &self,
        hash: Hash,
        area: &[u8],
        slot: &KeySlot,
        password: &[u8],
    ) -> Option<Vec<u8>> {
        let start = usize::try_from(slot.key_offset).ok()?;
        let len = self.material_len(slot);
        let mut material = area.get(start..start.checked_add(len)?)?.to_vec();
        let mut key = vec![0u8; self.key_bytes];
        hash.pbkdf2(password, &slot.salt, slot.iterations, &mut key);
        SectorCipher::new(&self.cipher, &self.mode, &key)
            .ok()?
            .decrypt(&mut material, 0);
        let master = af::merge(hash, &material, self.key_bytes, slot.stripes as usize);
        let mut digest = [0u8; DIGEST_LEN];
        hash.pbkdf2(&master, &self.mk_salt, self.mk_iterations, &mut digest);
        (digest == self.mk_digest).then_some(master)
    }
}

/// An unlocked volume: its header and the cipher of its data.
#[derive(Debug)]
pub struct LuksVolume {
    /// The header, as the key slots are now (`x-blockdev-amend` changes them).
    header: std::cell::RefCell<Header>,
    /// The data's cipher, sector 0 the first of the payload.
    pub cipher: SectorCipher,
}

impl LuksVolume {
    /// The header.
    pub fn header(&self) -> std::cell::Ref<'_, Header> {
        self.header.borrow()
    }

    /// Takes the header again from the area after a change of its key slots.
    ///
    /// # Errors
    /// As [`Header::parse`].
    pub fn reread_header(&self, area: &[u8]) -> Result<(), Error> {
        *self.header.borrow_mut() = Header::parse(area)?;
        Ok(())
    }

    /// Unlocks the volume whose first `payload_offset` bytes are `area` (header and key
    /// material) with `password`, trying the active slots in order. Deriving keys takes as
    /// long as the volume's iteration counts say (a second or more): call it off the main
    /// thread.
    ///
    /// # Errors
    /// As [`Header::parse`]; an unsupported cipher or hash; no slot opening.
    pub fn unlock(area: &[u8], password: &[u8]) -> Result<LuksVolume, Error> {
        let header = Header::parse(area)?;
        let hash = Hash::parse(&header.hash)?;
        // A cipher ferrite cannot use is said before any password is tried.
        SectorCipher::new(&header.cipher, &header.mode, &vec![0u8; header.key_bytes])?;
        for slot in header.slots.iter().filter(|s| s.active) {
            if let Some(master) = header.try_slot(hash, area, slot, password) {
                let cipher = SectorCipher::new(&header.cipher, &header.mode, &master)?;
                return Ok(LuksVolume {
                    header: std::cell::RefCell::new(header),
                    cipher,
                });
            }
        }
        Err(Error::InvalidPassword)
    }
}

/// How a new volume is made (QEMU's `QCryptoBlockCreateOptionsLUKS`).
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// `aes-128` or `aes-256`.
    pub cipher_alg: String,
    /// `xts`.
    pub cipher_mode: String,
    /// `plain64`, `plain` or `essiv`.
    pub ivgen_alg: String,
    /// The hash of `essiv` (`sha256`).
    pub ivgen_hash_alg: String,
    /// `sha1`, `sha256` or `sha512`.
    pub hash_alg: String,
    /// Milliseconds of PBKDF2 a key check should take.
    pub iter_time: u64,
    /// The header goes in a file of its own: the payload starts at 0 of the data file.
    pub detached: bool,
}

impl CreateOptions {
    /// The options QAPI's `QCryptoBlockCreateOptionsLUKS` names (`cipher-alg`, ...), each
    /// from `opt` where given, else the default.
    pub fn from_options(opt: impl Fn(&str) -> Option<String>, iter_time: Option<u64>) -> Self {
        let d = CreateOptions::default();
        CreateOptions {
            cipher_alg: opt("cipher-alg").unwrap_or(d.cipher_alg),
            cipher_mode: opt("cipher-mode").unwrap_or(d.cipher_mode),
            ivgen_alg: opt("ivgen-alg").unwrap_or(d.ivgen_alg),
            ivgen_hash_alg: opt("ivgen-hash-alg").unwrap_or(d.ivgen_hash_alg),
            hash_alg: opt("hash-alg").unwrap_or(d.hash_alg),
            iter_time: iter_time.unwrap_or(d.iter_time),
            detached: false,
        }
    }
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            cipher_alg: "aes-256".into(),
            cipher_mode: "xts".into(),
            ivgen_alg: "plain64".into(),
            ivgen_hash_alg: "sha256".into(),
            hash_alg: "sha256".into(),
            iter_time: 2000,
            detached: false,
        }
    }
}

/// A new volume's header area: the header at 0 and slot 0's key material, to be written
/// before the payload (which starts at `payload_offset`).
#[derive(Debug)]
pub struct NewVolume {
    /// The header (at offset 0).
    pub header: Vec<u8>,
    /// Slot 0's encrypted key material and where it goes.
    pub material: (u64, Vec<u8>),
    /// Where the payload starts (0 with a detached header).
    pub payload_offset: u64,
    /// The header area's length: the header and the eight slots' key material.
    pub header_len: u64,
}

const STRIPES: u32 = 4000;
const MIN_ITERATIONS: u64 = 1000;
const ALIGN: u64 = 4096;

/// A random (version 4) UUID, its bytes in RFC 4122 order.
///
/// # Errors
/// The kernel has no random bytes to give.
pub fn random_uuid() -> Result<[u8; 16], Error> {
    let mut u = [0u8; 16];
    u.copy_from_slice(&random(16)?);
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

/// Bytes from the kernel's random source.
pub fn random(n: usize) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        // SAFETY: the kernel writes at most `n - got` bytes into the buffer's unfilled end.
        let r = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), n - got, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Unsupported(format!("no random numbers: {e}")));
        }
        got += r as usize;
    }
    Ok(buf)
}

/// PBKDF2 iterations that take about `ms` milliseconds with `hash` (QEMU calibrates the
/// same way: time a run, scale it).
fn iterations_for(hash: Hash, key_len: usize, ms: u64) -> u64 {
    let mut rounds = 1u32 << 12;
    loop {
        let start = std::time::Instant::now();
        let mut out = vec![0u8; key_len];
        hash.pbkdf2(b"calibration", &[0u8; 32], rounds, &mut out);
        let took = start.elapsed();
        if took >= std::time::Duration::from_millis(50) || rounds >= 1 << 30 {
            let per_ms = u64::from(rounds) * 1000 / took.as_micros().max(1) as u64;
            return per_ms.saturating_mul(ms);
        }
        rounds *= 2;
    }
}

/// A key slot's contents: the master key split and encrypted with a key PBKDF2 derives from
/// the password (QEMU's `qcrypto_block_luks_store_key`).
struct SealedSlot {
    iterations: u32,
    salt: Vec<u8>,
    /// The encrypted key material, whole sectors.
    material: Vec<u8>,
}

impl SealedSlot {
    /// Seals `master` under `password` for a volume whose data is AES in `mode`, with
    /// PBKDF2 iterations for about `iter_time` milliseconds.
    fn new(
        hash: Hash,
        mode: &str,
        master: &[u8],
        password: &[u8],
        iter_time: u64,
    ) -> Result<SealedSlot, Error> {
        let key_bytes = master.len();
        let iterations = iterations_for(hash, key_bytes, iter_time)
            .clamp(MIN_ITERATIONS, u64::from(u32::MAX)) as u32;
        let salt = random(32)?;
        let mut slot_key = vec![0u8; key_bytes];
        hash.pbkdf2(password, &salt, iterations, &mut slot_key);
        let noise = random(key_bytes * (STRIPES as usize - 1))?;
        let mut material = af::split(hash, master, STRIPES as usize, &noise);
        material.resize(material.len().next_multiple_of(SECTOR), 0);
        SectorCipher::new("aes", mode, &slot_key)?.encrypt(&mut material, 0);
        Ok(SealedSlot {
            iterations,
            salt,
            material,
        })
    }

    /// Marks slot `slot` active with this slot's count and salt in the header bytes `head`.
    fn activate(&self, head: &mut [u8], slot: usize) {
        let s = 208 + slot * 48;
        put(head, s, &SLOT_ACTIVE.to_be_bytes());
        put(head, s + 4, &self.iterations.to_be_bytes());
        put(head, s + 8, &self.salt);
    }
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

impl LuksVolume {
    /// Makes a new volume's header and slot 0 for `password` (QEMU's layout: slots at
    /// 4 KiB-aligned offsets from 4 KiB, the payload after all eight). Calibrating and
    /// deriving keys take about `iter_time` each: call it off the main thread.
    ///
    /// # Errors
    /// Options ferrite does not support.
    pub fn create(password: &[u8], o: &CreateOptions) -> Result<NewVolume, Error> {
        let aes_key = match o.cipher_alg.as_str() {
            "aes-128" => 16,
            "aes-256" => 32,
            other => {
                return Err(Error::Unsupported(format!(
                    "Cipher algorithm '{other}' is not supported by ferrite for LUKS"
                )));
            }
        };
        // XTS takes two keys.
        let key_bytes = if o.cipher_mode == "xts" {
            2 * aes_key
        } else {
            aes_key
        };
        let ivgen = match o.ivgen_alg.as_str() {
            "essiv" => format!("essiv:{}", o.ivgen_hash_alg),
            other => other.to_owned(),
        };
        let mode = format!("{}-{ivgen}", o.cipher_mode);
        let hash = Hash::parse(&o.hash_alg)?;
        let unsupported = Error::Unsupported(format!(
            "Cipher mode '{}' with IV generator '{}' is not supported by ferrite for LUKS",
            o.cipher_mode, o.ivgen_alg
        ));
        if !matches!(o.cipher_mode.as_str(), "xts" | "cbc") {
            return Err(unsupported);
        }
        // The sector cipher says whether it takes the mode (an ESSIV hash it has not).
        SectorCipher::new("aes", &mode, &vec![0u8; key_bytes]).map_err(|_| unsupported)?;
        let master = random(key_bytes)?;
        let mk_salt = random(32)?;
        let per_iter_time = iterations_for(hash, DIGEST_LEN, o.iter_time);
        let mk_iterations = (per_iter_time / 8).clamp(MIN_ITERATIONS, u64::from(u32::MAX)) as u32;
        let mut mk_digest = [0u8; DIGEST_LEN];
        hash.pbkdf2(&master, &mk_salt, mk_iterations, &mut mk_digest);

        let material_len = (key_bytes * STRIPES as usize) as u64;
        let slot_span = material_len.next_multiple_of(ALIGN);
        let first_slot = ALIGN;
        let header_len = first_slot + 8 * slot_span;
        let payload_offset = if o.detached { 0 } else { header_len };

        // Slot 0: the master key split, encrypted with a key from the password.
        let slot0 = SealedSlot::new(hash, &mode, &master, password, o.iter_time)?;

        let mut h = vec![0u8; HEADER_LEN];
        put(&mut h, 0, MAGIC);
        put(&mut h, 6, &1u16.to_be_bytes());
        put(&mut h, 8, b"aes");
        put(&mut h, 40, mode.as_bytes());
        put(&mut h, 72, o.hash_alg.as_bytes());
        put(
            &mut h,
            104,
            &((payload_offset / SECTOR as u64) as u32).to_be_bytes(),
        );
        put(&mut h, 108, &(key_bytes as u32).to_be_bytes());
        put(&mut h, 112, &mk_digest);
        put(&mut h, 132, &mk_salt);
        put(&mut h, 164, &mk_iterations.to_be_bytes());
        let u = random_uuid()?;
        let hex = |r: std::ops::Range<usize>| -> String {
            u[r].iter().map(|b| format!("{b:02x}")).collect()
        };
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            hex(0..4),
            hex(4..6),
            hex(6..8),
            hex(8..10),
            hex(10..16)
        );
        put(&mut h, 168, uuid.as_bytes());
        for i in 0..8u64 {
            let s = 208 + i as usize * 48;
            let offset = first_slot + i * slot_span;
            if i == 0 {
                slot0.activate(&mut h, 0);
            } else {
                put(&mut h, s, &SLOT_INACTIVE.to_be_bytes());
            }
            put(
                &mut h,
                s + 40,
                &((offset / SECTOR as u64) as u32).to_be_bytes(),
            );
            put(&mut h, s + 44, &STRIPES.to_be_bytes());
        }
        Ok(NewVolume {
            header: h,
            material: (first_slot, slot0.material),
            payload_offset,
            header_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_volume_unlocks_with_its_password_only() {
        let o = CreateOptions {
            iter_time: 1,
            ..CreateOptions::default()
        };
        let v = LuksVolume::create(b"secret", &o).expect("create");
        let mut area = vec![0u8; v.payload_offset as usize];
        area[..HEADER_LEN].copy_from_slice(&v.header);
        let (at, m) = &v.material;
        area[*at as usize..*at as usize + m.len()].copy_from_slice(m);
        let vol = LuksVolume::unlock(&area, b"secret").expect("unlock");
        assert_eq!(vol.header().payload_offset, 2068480);
        assert_eq!(vol.header().slots[1].key_offset, 262144);
        assert!(matches!(
            LuksVolume::unlock(&area, b"wrong"),
            Err(Error::InvalidPassword)
        ));
        let mut data = vec![7u8; 1024];
        vol.cipher.encrypt(&mut data, 5);
        assert_ne!(data, vec![7u8; 1024]);
        vol.cipher.decrypt(&mut data, 5);
        assert_eq!(data, vec![7u8; 1024]);
    }

    #[test]
    fn a_detached_header_puts_the_payload_at_the_start_of_the_data() {
        let o = CreateOptions {
            iter_time: 1,
            detached: true,
            ..CreateOptions::default()
        };
        let v = LuksVolume::create(b"secret", &o).expect("create");
        assert_eq!((v.payload_offset, v.header_len), (0, 2068480));
        let mut area = vec![0u8; v.header_len as usize];
        area[..HEADER_LEN].copy_from_slice(&v.header);
        let (at, m) = &v.material;
        area[*at as usize..*at as usize + m.len()].copy_from_slice(m);
        let vol = LuksVolume::unlock(&area, b"secret").expect("unlock");
        assert_eq!(vol.header().payload_offset, 0);
        assert_eq!(
            vol.header().info().get("detached-header"),
            Some(&QObject::Bool(true))
        );
    }
}
