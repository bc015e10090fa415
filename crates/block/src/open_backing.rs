//! The backing file of an image format that names one in its header (qcow2, qed): opened
//! as the node's options say (`backing: null` for none, a node name or inline options, or
//! options for the named file without a driver), else the file the header names, relative
//! to the image, of the header's format or probed (QEMU: `bdrv_open_backing_file`).

use crate::child::Child;
use crate::error::{Error, Result};
use crate::open::OpenCtx;
use ferrite_qobject::{QDict, QObject};

/// The backing file a header names: its file name and, when the header says, its format.
pub type BackingName = (String, Option<String>);

impl OpenCtx<'_> {
    /// Opens child `backing` of a format node whose file is `file` and whose header names
    /// `header` (or no backing file).
    ///
    /// # Errors
    /// "Could not open backing file: ..." with the reason, an unknown node or format.
    pub async fn open_backing(&mut self, file: &Child, header: Option<BackingName>) -> Result<()> {
        match self.opts().get("backing").cloned() {
            Some(QObject::Null) => Ok(()),
            // Options for the backing file the header names, without a driver (what
            // `-drive ...,backing.node-name=x` gives): that file, with these options.
            Some(QObject::Dict(extra)) if extra.get("driver").is_none() => {
                // A file name among them replaces the header's (its format stays).
                let named = match extra.get("file") {
                    Some(QObject::Dict(f)) => f
                        .get("filename")
                        .and_then(QObject::as_str)
                        .map(str::to_owned),
                    _ => None,
                };
                match (named, header) {
                    (Some(filename), header) => {
                        let format = header.and_then(|(_, f)| f);
                        self.open_named_backing(&filename, format, extra).await
                    }
                    (None, Some(header)) => self.open_header_backing(file, header, extra).await,
                    (None, None) => Ok(()),
                }
            }
            Some(v) => self.open_child_ref("backing", &v).await.map(drop),
            None => match header {
                Some(header) => self.open_header_backing(file, header, QDict::new()).await,
                None => Ok(()),
            },
        }
    }

    /// Opens backing file `filename` the user's options name (relative to the working
    /// directory, not the image), of `format` or probed.
    async fn open_named_backing(
        &mut self,
        filename: &str,
        format: Option<String>,
        extra: QDict,
    ) -> Result<()> {
        let failed = |e| Error::BackingOpen(Box::new(e));
        let format = match format {
            Some(f) => f,
            None => self.probe(filename).await.map_err(failed)?.to_owned(),
        };
        self.open_image_with("backing", filename, &format, true, extra)
            .await
            .map_err(failed)
            .map(drop)
    }

    /// Opens the backing file the header names: its path relative to the image's, its
    /// format from the header or probed, read-only, with `extra` options of the user's.
    async fn open_header_backing(
        &mut self,
        file: &Child,
        (filename, format): BackingName,
        extra: QDict,
    ) -> Result<()> {
        let path = crate::filename::backing_path(&file.node().filename(), &filename)?;
        let failed = |e| Error::BackingOpen(Box::new(e));
        let format = match format {
            Some(f) => f,
            None => self.probe(&path).await.map_err(failed)?.to_owned(),
        };
        if self.graph().registry().get(&format).is_none() {
            return Err(Error::UnknownBackingDriver(format));
        }
        self.open_image_with("backing", &path, &format, true, extra)
            .await
            .map_err(failed)
            .map(drop)
    }
}
