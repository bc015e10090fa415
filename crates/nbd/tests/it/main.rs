//! The NBD server through the public API, with a minimal client over a unix socket.

mod drain;

use ferrite_qapi::Args;
use ferrite_qobject::from_json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub(crate) fn args(json: &str) -> Args {
    Args::new(
        from_json(json)
            .expect("json")
            .as_dict()
            .expect("dict")
            .clone(),
    )
}

/// An NBD client past the handshake (fixed newstyle, `NBD_OPT_EXPORT_NAME`, simple replies).
pub(crate) struct Client {
    s: UnixStream,
    cookie: u64,
}

impl Client {
    pub(crate) async fn connect(path: &str, export: &str) -> std::io::Result<Client> {
        let mut s = UnixStream::connect(path).await?;
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await?;
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        // FIXED_NEWSTYLE | NO_ZEROES.
        s.write_all(&3u32.to_be_bytes()).await?;
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&1u32.to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        s.write_all(&opt).await?;
        let mut size_flags = [0u8; 10];
        s.read_exact(&mut size_flags).await?;
        Ok(Client { s, cookie: 0 })
    }

    /// One write, waiting for its reply: the NBD error (0 on success).
    pub(crate) async fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<u32> {
        self.cookie += 1;
        let mut req = Vec::with_capacity(28 + data.len());
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&1u16.to_be_bytes());
        req.extend_from_slice(&self.cookie.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&(data.len() as u32).to_be_bytes());
        req.extend_from_slice(data);
        self.s.write_all(&req).await?;
        let mut reply = [0u8; 16];
        self.s.read_exact(&mut reply).await?;
        assert_eq!(
            u32::from_be_bytes([reply[0], reply[1], reply[2], reply[3]]),
            0x6744_6698
        );
        assert_eq!(
            u64::from_be_bytes(reply[8..16].try_into().unwrap()),
            self.cookie
        );
        Ok(u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]))
    }
}
