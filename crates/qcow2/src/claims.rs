//! Guest clusters a request is changing: a request that may change a cluster's mapping holds
//! it so that no other such request sees the mapping half-updated (QEMU serialises the
//! same way through its in-flight allocation list).

use ferrite_block::units::{UnitClaim, UnitLocks};

#[derive(Default)]
pub(crate) struct Claims(UnitLocks);

impl Claims {
    /// Waits until no one holds any of guest clusters `[first, last]`, then holds them
    /// until the claim is dropped.
    pub(crate) async fn claim(&self, first: u64, last: u64) -> UnitClaim<'_> {
        self.0.claim(first, last + 1).await
    }
}
