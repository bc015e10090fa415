//! Compressed clusters: the codecs (raw deflate with a 4 KiB window, what QEMU reads back,
//! or zstd) and the compressed write path.

use crate::Qcow2Driver;
use crate::format::entry;
use crate::meta::FreeKind;
use ferrite_block::Child;
use ferrite_block::Node;
use ferrite_block::driver::ReqFlags;
use std::io;

/// The codec named by the header's compression type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Codec {
    Deflate,
    Zstd,
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// Inflates one cluster from `src` (which may run past the compressed stream's end).
pub(crate) fn decompress(codec: Codec, src: &[u8], cluster_size: usize) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; cluster_size];
    match codec {
        Codec::Deflate => {
            let mut d = flate2::Decompress::new_with_window_bits(false, 12);
            let r = d.decompress(src, &mut out, flate2::FlushDecompress::Finish);
            match r {
                // QEMU stops as soon as a whole cluster came out.
                Ok(_) if d.total_out() as usize == cluster_size => Ok(out),
                _ => Err(eio()),
            }
        }
        Codec::Zstd => {
            // The stream may be followed by padding; decode frame by frame until full.
            let mut dctx = zstd::bulk::Decompressor::new().map_err(|_| eio())?;
            let n = dctx.decompress_to_buffer(src, &mut out).or_else(|_| {
                // Trailing bytes after the frame: find the frame's size and retry.
                let size = zstd::zstd_safe::find_frame_compressed_size(src).map_err(|_| eio())?;
                dctx.decompress_to_buffer(&src[..size.min(src.len())], &mut out)
                    .map_err(|_| eio())
            })?;
            if n != cluster_size {
                return Err(eio());
            }
            Ok(out)
        }
    }
}

/// Compresses a cluster; `None` when it would not save space (QEMU then writes it plain).
pub(crate) fn compress(codec: Codec, data: &[u8]) -> Option<Vec<u8>> {
    let limit = data.len() - 1;
    match codec {
        Codec::Deflate => {
            let mut c =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = Vec::with_capacity(data.len());
            match c.compress_vec(data, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) if out.len() <= limit => Some(out),
                _ => None,
            }
        }
        Codec::Zstd => {
            let out = zstd::bulk::compress(data, 0).ok()?;
            (out.len() <= limit).then_some(out)
        }
    }
}

impl Qcow2Driver {
    /// Writes whole clusters compressed (QEMU's `write -c`, backup `compress`): each
    /// cluster that compresses well goes into a byte range shared with its neighbours.
    pub(crate) async fn write_compressed_impl(
        &self,
        node: &Node,
        file: &Child,
        offset: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let cs = self.cs();
        if offset % cs != 0
            || (data.len() as u64 % cs != 0 && offset + data.len() as u64 != self.size.get())
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        for (k, chunk) in data.chunks(cs as usize).enumerate() {
            let gc = offset / cs + k as u64;
            let mut full = chunk.to_vec();
            full.resize(cs as usize, 0);
            let Some(c) = compress(self.codec, &full) else {
                self.write_impl(node, file, gc * cs, chunk.to_vec()).await?;
                continue;
            };
            let _claim = self.claims.claim(gc, gc).await;
            {
                // As QEMU's: a compressed cluster never overwrites one the image holds.
                let mut m = self.meta.lock().await;
                let (old, _) = m.l2_entry(file, gc).await?;
                if old & entry::OFFSET_MASK != 0 {
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
            }
            let host = {
                let mut m = self.meta.lock().await;
                // The table first, as QEMU gets it ready before placing the data.
                m.l2_for_write(file, gc).await?;
                let host = m.alloc_bytes(file, c.len() as u64).await?;
                m.check_data(file, host, c.len() as u64).await?;
                host
            };
            let clen = c.len() as u64;
            file.debug_event("write_compressed").await;
            file.write(host, c, ReqFlags::empty()).await?;
            let mut m = self.meta.lock().await;
            let (table, idx) = m.l2_for_write(file, gc).await?;
            let (old, _) = m.l2_entry(file, gc).await?;
            file.debug_event("l2_update_compressed").await;
            m.set_l2(
                table,
                idx,
                entry::compressed_entry(host, clen, self.cluster_bits),
                0,
            );
            self.release_old(&mut m, old, FreeKind::Other);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 251) as u8 ^ (i / 4096) as u8;
        }
        for codec in [Codec::Deflate, Codec::Zstd] {
            let mut c = compress(codec, &data).unwrap();
            c.extend_from_slice(&[0u8; 300]); // sector padding after the stream
            assert_eq!(decompress(codec, &c, data.len()).unwrap(), data);
        }
        assert!(compress(Codec::Deflate, &random(4096)).is_none());
    }

    fn random(n: usize) -> Vec<u8> {
        let mut x = 0x1234_5678_9abc_def0u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for codec in [Codec::Deflate, Codec::Zstd] {
            assert!(decompress(codec, &random(1000), 65536).is_err());
            assert!(decompress(codec, &[], 512).is_err());
        }
    }
}
