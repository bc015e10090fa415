//! Where a relative file name an image records (its backing file) points.

use crate::error::{Error, Result};
use ferrite_qobject::QDict;

/// The options of the protocol node a file name stands for: `blkdebug:CONFIG:IMAGE` is a
/// blkdebug node over the image's file, anything else a file (QEMU's protocol prefixes,
/// for those ferrite has).
pub fn protocol_options(name: &str) -> QDict {
    if let Some((config, image)) = name
        .strip_prefix("blkdebug:")
        .and_then(|rest| rest.split_once(':'))
    {
        let mut d = QDict::new()
            .with("driver", "blkdebug")
            .with("image", protocol_options(image));
        if !config.is_empty() {
            d.insert("config", config);
        }
        return d;
    }
    QDict::new().with("driver", "file").with("filename", name)
}

/// The path of `name`, which the image whose own file is `image` records: absolute names and
/// protocol names as they are, relative ones beside the image (QEMU's rule).
///
/// # Errors
/// A relative name in an image that has no plain file name of its own.
pub fn backing_path(image: &str, name: &str) -> Result<String> {
    if name.starts_with('/') || name.contains(':') {
        return Ok(name.to_owned());
    }
    if image.starts_with("json:") {
        return Err(Error::RelativeBackingName(image.to_owned()));
    }
    Ok(match image.rfind('/') {
        Some(i) => format!("{}/{}", &image[..i], name),
        None => name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::backing_path;

    #[test]
    fn relative_names_sit_beside_the_image() {
        assert_eq!(
            backing_path("/a/b/top.qcow2", "base.qcow2").unwrap(),
            "/a/b/base.qcow2"
        );
        assert_eq!(
            backing_path("top.qcow2", "base.qcow2").unwrap(),
            "base.qcow2"
        );
        assert_eq!(backing_path("/a/top", "/x/base").unwrap(), "/x/base");
        assert_eq!(
            backing_path("/a/top", "nbd:unix:/s").unwrap(),
            "nbd:unix:/s"
        );
        assert!(backing_path("json:{}", "base").is_err());
    }
}
