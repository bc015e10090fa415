//! Permissions: what a user of a node does with it, and what it lets others do
//! (QEMU: `BLK_PERM_*`, block.c's permission checks).

use bitflags::bitflags;

bitflags! {
    /// A set of permissions.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Perm: u32 {
        /// Reads return consistent data (no one is modifying it unexpectedly).
        const CONSISTENT_READ = 0x01;
        /// Writes that may change the data.
        const WRITE = 0x02;
        /// Writes that do not change what a read returns.
        const WRITE_UNCHANGED = 0x04;
        /// Changes of the size.
        const RESIZE = 0x08;
    }
}

impl Perm {
    /// Whether the set holds either kind of write (QEMU's "writers": `WRITE` or
    /// `WRITE_UNCHANGED`), which a read-only or inactive node cannot have.
    pub fn writes(self) -> bool {
        self.intersects(Perm::WRITE | Perm::WRITE_UNCHANGED)
    }

    /// What a format node takes and shares of its backing file, given what its own
    /// parents take and share (QEMU's `bdrv_default_perms` for a COW child): at most a
    /// consistent read; it lets others write and resize only when its parents let others
    /// write to it.
    pub fn for_backing(perm: Perm, shared: Perm) -> (Perm, Perm) {
        let writers = if shared.contains(Perm::WRITE) {
            Perm::WRITE | Perm::RESIZE
        } else {
            Perm::empty()
        };
        (
            perm & Perm::CONSISTENT_READ,
            writers | Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        )
    }

    /// The permissions QEMU defines, with their QAPI names, in bit order.
    pub const NAMED: [(Perm, &'static str); 4] = [
        (Perm::CONSISTENT_READ, "consistent-read"),
        (Perm::WRITE, "write"),
        (Perm::WRITE_UNCHANGED, "write-unchanged"),
        (Perm::RESIZE, "resize"),
    ];

    /// Names of the set permissions, in QEMU's listing order (highest bit first).
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMED
            .iter()
            .rev()
            .filter(|(p, _)| self.contains(*p))
            .map(|(_, n)| *n)
            .collect()
    }

    /// How error messages name each permission (QEMU's `bdrv_perm_names`: words, where the
    /// QAPI names have dashes).
    const IN_MESSAGES: [(Perm, &'static str); 4] = [
        (Perm::CONSISTENT_READ, "consistent read"),
        (Perm::WRITE, "write"),
        (Perm::WRITE_UNCHANGED, "write unchanged"),
        (Perm::RESIZE, "resize"),
    ];

    /// The set permissions as error messages name them, lowest bit first, comma-separated.
    pub fn message_names(self) -> String {
        Self::IN_MESSAGES
            .iter()
            .filter(|(p, _)| self.contains(*p))
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// How error messages name the lowest set permission.
    pub fn first_name(self) -> &'static str {
        Self::IN_MESSAGES
            .iter()
            .find(|(p, _)| self.contains(*p))
            .map_or("?", |(_, n)| n)
    }

    /// The bit number of a single permission (for lock byte offsets).
    pub fn bit(self) -> u32 {
        self.bits().trailing_zeros()
    }
}
