//! The read path: guest bytes through the mapping (data clusters, compressed clusters,
//! zero clusters, the backing file), and block status.

use crate::Qcow2Driver;
use crate::compress;
use crate::map::Source;
use crate::meta::read_at;
use ferrite_block::Child;
use ferrite_block::Node;
use ferrite_block::driver::Extent;
use std::io;

/// Guest bytes `guest..guest + len` of an encrypted image, stored at `host`: the whole
/// sectors around them read and decrypted. A sector's number is where it lies in the file
/// (QEMU's `crypt_physical_offset`, for LUKS).
async fn read_decrypted(
    src: &Child,
    crypto: &ferrite_crypto::LuksVolume,
    guest: u64,
    host: u64,
    len: usize,
) -> io::Result<Vec<u8>> {
    const S: u64 = ferrite_crypto::SECTOR as u64;
    let start = guest / S * S;
    let end = (guest + len as u64).next_multiple_of(S);
    let skip = (guest - start) as usize;
    let host_start = host - skip as u64;
    let mut buf = read_at(src, host_start, (end - start) as usize).await?;
    crypto.cipher.decrypt(&mut buf, host_start / S);
    if skip == 0 && buf.len() == len {
        return Ok(buf);
    }
    Ok(buf[skip..skip + len].to_vec())
}

impl Qcow2Driver {
    /// Reads guest bytes through the current mapping (the request path, and the source of
    /// copy-on-write data).
    pub(crate) async fn read_guest(
        &self,
        node: &Node,
        file: &Child,
        offset: u64,
        len: usize,
    ) -> io::Result<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        let mut pos = 0usize;
        while pos < len {
            let (src, run) = {
                let mut m = self.meta.lock().await;
                m.map(file, offset + pos as u64, (len - pos) as u64).await?
            };
            let run = run as usize;
            let piece = match src {
                Source::Zero => None,
                Source::Backing => self.read_backing(node, offset + pos as u64, run).await?,
                Source::Data(host) => {
                    // Data clusters live in the external data file when there is one.
                    let data = self.data_edge(node);
                    let src = data.as_deref().unwrap_or(file);
                    file.debug_event("read_aio").await;
                    Some(match &self.crypto {
                        None => read_at(src, host, run).await?,
                        Some(c) => read_decrypted(src, c, offset + pos as u64, host, run).await?,
                    })
                }
                Source::Compressed {
                    offset: co,
                    len: cl,
                    skip,
                } => {
                    let cluster = self.read_compressed(file, co, cl).await?;
                    Some(cluster[skip as usize..skip as usize + run].to_vec())
                }
            };
            if pos == 0 && run == len {
                return Ok(piece.unwrap_or_else(|| vec![0u8; len]));
            }
            let buf = out.get_or_insert_with(|| vec![0u8; len]);
            if let Some(p) = piece {
                buf[pos..pos + run].copy_from_slice(&p);
            }
            pos += run;
        }
        Ok(out.unwrap_or_default())
    }

    /// Bytes of the backing file (zeroes past its end or without one); `None` for zeroes.
    pub(crate) async fn read_backing(
        &self,
        node: &Node,
        offset: u64,
        len: usize,
    ) -> io::Result<Option<Vec<u8>>> {
        let Some(b) = node.edge("backing") else {
            return Ok(None);
        };
        let blen = b.len();
        if offset >= blen {
            return Ok(None);
        }
        // Past the backing file's end reads as zeroes (`Child::read` pads).
        if let Some(file) = node.child("file") {
            file.debug_event("read_backing_aio").await;
        }
        Ok(Some(b.read(offset, len).await?))
    }

    pub(crate) async fn read_compressed(
        &self,
        file: &Child,
        offset: u64,
        len: u64,
    ) -> io::Result<Vec<u8>> {
        file.debug_event("read_compressed").await;
        let raw = read_at(file, offset, len as usize).await?;
        let (codec, cluster) = (self.codec, self.cs() as usize);
        // Inflating takes longer than the read: off the main thread, beside other requests.
        ferrite_block::io::blocking(move || compress::decompress(codec, &raw, cluster)).await
    }

    /// Whether a guest range is known to read as zeroes without reading it: one mapping
    /// covers it, and that is a zero cluster or nothing over no backing data.
    pub(crate) async fn known_zero(
        &self,
        node: &Node,
        file: &Child,
        offset: u64,
        len: u64,
    ) -> io::Result<bool> {
        let (src, run) = {
            let mut m = self.meta.lock().await;
            m.map(file, offset, len).await?
        };
        if run != len {
            return Ok(false);
        }
        match src {
            Source::Zero => Ok(true),
            Source::Backing => match node.child("backing") {
                Some(b) if offset < b.len() => {
                    // What the backing chain says about it (zeroes past its end).
                    let end = (offset + len).min(b.len());
                    let mut at = offset;
                    while at < end {
                        let e = b.block_status(at, end - at).await?;
                        if !e.zero || e.len == 0 {
                            return Ok(false);
                        }
                        at += e.len;
                    }
                    Ok(true)
                }
                _ => Ok(true),
            },
            _ => Ok(false),
        }
    }

    /// The extent at `offset`: data, zeroes, or what the backing file has there.
    pub(crate) async fn block_status_impl(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
    ) -> io::Result<Extent> {
        self.alive()?;
        let file = Self::file(node)?;
        let r = {
            let mut m = self.meta.lock().await;
            m.map(&file, offset, len).await
        };
        let (src, run) = self.check(node, &file, r).await?;
        Ok(match src {
            Source::Data(_) | Source::Compressed { .. } => Extent {
                len: run,
                data: true,
                zero: false,
                allocated: true,
            },
            Source::Zero => Extent {
                len: run,
                data: false,
                zero: true,
                allocated: true,
            },
            Source::Backing => Extent::below(node, offset, run).await?,
        })
    }
}
