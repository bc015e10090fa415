//! Rewriting a region of a child whose new contents take long to compute (key slots
//! derived with PBKDF2): read on the main thread, computed on a blocking thread, written
//! back in the order the computation says.

use crate::child::Child;
use crate::driver::ReqFlags;
use std::io;

/// Writes at offsets from the start of a region, in order.
pub type RegionWrites = Vec<(u64, Vec<u8>)>;

/// Why a region was not rewritten.
#[derive(Debug)]
pub enum RewriteError {
    /// The file failed.
    Io(io::Error),
    /// The computation refused (its text).
    Refused(String),
}

/// Reads `len` bytes at `base` in `file`, hands them to `compute` off the main thread, and
/// makes the writes it returns; returns the region as it is afterwards.
///
/// # Errors
/// The file failing, or `compute`'s refusal.
pub async fn rewrite_region<F>(
    file: &Child,
    base: u64,
    len: usize,
    compute: F,
) -> Result<Vec<u8>, RewriteError>
where
    F: FnOnce(&[u8]) -> Result<RegionWrites, String> + Send + 'static,
{
    let area = file.read(base, len).await.map_err(RewriteError::Io)?;
    let writes = tokio::task::spawn_blocking(move || compute(&area).map(|w| (w, area)))
        .await
        .map_err(|e| RewriteError::Io(io::Error::other(e)))?;
    let (writes, mut area) = writes.map_err(RewriteError::Refused)?;
    for (offset, data) in writes {
        if let Some(dst) = usize::try_from(offset)
            .ok()
            .and_then(|o| area.get_mut(o..o.checked_add(data.len())?))
        {
            dst.copy_from_slice(&data);
        }
        file.write(base + offset, data, ReqFlags::empty())
            .await
            .map_err(RewriteError::Io)?;
    }
    Ok(area)
}
