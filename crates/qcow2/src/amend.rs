//! `x-blockdev-amend` of an image: the key slots of its LUKS encryption, whose header area
//! the crypto header extension points at (QEMU: `qcow2_co_amend`).

use crate::Qcow2Driver;
use crate::error::Error;
use ferrite_block::{Graph, Node};
use ferrite_qapi::Args;

impl Qcow2Driver {
    /// Changes the key slots `encrypt` (`QCryptoBlockAmendOptions`) describes.
    pub(crate) async fn amend_key_slots(
        &self,
        graph: &Graph,
        node: &Node,
        encrypt: &Args,
        force: bool,
    ) -> ferrite_block::Result<()> {
        let Some(volume) = &self.crypto else {
            return Err(Error::AmendUnencrypted.into());
        };
        if encrypt.opt_str("format") != Some("luks") {
            return Err(ferrite_qapi::Error::generic(
                "Amend can't be used to change the qcow2 encryption format",
            )
            .into());
        }
        let (offset, length) = crate::open::crypto_area(&self.meta.lock().await.h)?;
        let file = node.edge("file").ok_or(Error::MissingCryptoHeader(2))?;
        ferrite_drivers::amend_key_slots(
            graph,
            &file,
            offset,
            usize::try_from(length).unwrap_or(0),
            volume,
            encrypt,
            self.key_secret.as_deref().unwrap_or(""),
            force,
        )
        .await
    }
}
