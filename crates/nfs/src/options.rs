//! A node's options (`BlockdevOptionsNfs`): the server, the file's path, as whom it is
//! reached, and libnfs's tuning; QEMU's checks of them and the node's file name.

use crate::rpc::Caller;
use ferrite_block::report::warn_report;
use ferrite_qapi::{Args, Error};

/// The largest readahead and page cache QEMU lets libnfs have, and its debug level.
const MAX_READAHEAD: i64 = 1 << 20;
const MAX_PAGECACHE_PAGES: i64 = (8 << 20) / 4096;
const MAX_DEBUG: i64 = 2;

#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) host: String,
    /// The file's whole path: the export is what comes before its last `/`.
    pub(crate) path: String,
    pub(crate) user: Option<i64>,
    pub(crate) group: Option<i64>,
    pub(crate) syn_count: Option<i64>,
    /// Whether readahead or a page cache was asked for (a reopen may then not turn
    /// `cache.direct` on).
    pub(crate) cache_used: bool,
    /// `readahead-size` (bytes) and `page-cache-size` (pages), capped as QEMU caps them.
    pub(crate) readahead: Option<i64>,
    pub(crate) cache_pages: Option<i64>,
}

impl Options {
    /// Reads and checks `BlockdevOptionsNfs` (its types checked by the schema), in QEMU's
    /// order; warns of what QEMU caps.
    ///
    /// # Errors
    /// QEMU's texts.
    pub(crate) fn parse(opts: &Args, cache_direct: bool) -> Result<Options, Error> {
        if !opts.has("path")
            && let Some(name) = opts.opt_str("filename")
        {
            // A name that is no NFS URL: QEMU's reason.
            return Err(match ferrite_block::filename::nfs_url(name) {
                Err(why) => Error::generic(why),
                Ok(_) => Error::generic("Invalid URI specified"),
            });
        }
        ferrite_block::check_visited_whole(opts)?;
        let server = opts
            .dict("server")
            .ok_or_else(|| Error::generic("Parameter 'server' is missing"))?;
        let o = Options {
            host: server.str("host")?.to_owned(),
            path: opts.str("path")?.to_owned(),
            user: opts.opt_i64("user"),
            group: opts.opt_i64("group"),
            syn_count: opts.opt_i64("tcp-syn-count"),
            cache_used: opts.has("readahead-size") || opts.has("page-cache-size"),
            readahead: opts.opt_i64("readahead-size").map(|n| n.min(MAX_READAHEAD)),
            cache_pages: opts
                .opt_i64("page-cache-size")
                .map(|n| n.min(MAX_PAGECACHE_PAGES)),
        };
        if !o.path.contains('/') {
            return Err(Error::generic("Invalid URL specified"));
        }
        if let Some(n) = opts.opt_i64("readahead-size") {
            if cache_direct {
                return Err(Error::generic(
                    "Cannot enable NFS readahead if cache.direct = on",
                ));
            }
            if n > MAX_READAHEAD {
                warn_report(&format!("Truncating NFS readahead size to {MAX_READAHEAD}"));
            }
        }
        if let Some(n) = opts.opt_i64("page-cache-size") {
            if cache_direct {
                return Err(Error::generic(
                    "Cannot enable NFS pagecache if cache.direct = on",
                ));
            }
            if n > MAX_PAGECACHE_PAGES {
                warn_report(&format!(
                    "Truncating NFS pagecache size to {MAX_PAGECACHE_PAGES} pages"
                ));
            }
        }
        if opts.opt_i64("debug").is_some_and(|n| n > MAX_DEBUG) {
            warn_report(&format!("Limiting NFS debug level to {MAX_DEBUG}"));
        }
        Ok(o)
    }

    /// The export (the path before its last `/`) and the file in it (from that `/`).
    pub(crate) fn split(&self) -> (&str, &str) {
        let at = self.path.rfind('/').unwrap_or(0);
        (&self.path[..at], &self.path[at..])
    }

    /// Whom calls are made as: the options' ids, else the process's (C's `int`s, as
    /// libnfs takes them).
    pub(crate) fn caller(&self) -> Caller {
        Caller {
            uid: self.user.map_or_else(process_uid, |u| u as i32 as u32),
            gid: self.group.map_or_else(process_gid, |g| g as i32 as u32),
            syn_count: self.syn_count.map(|n| n as i32),
        }
    }

    /// The ids the name shows: those set and not 0 (QEMU's test).
    fn shown_ids(&self) -> (i64, i64) {
        (self.user.unwrap_or(0), self.group.unwrap_or(0))
    }

    /// The node's file name (QEMU's `nfs_refresh_filename`).
    pub(crate) fn file_name(&self) -> String {
        let base = format!("nfs://{}{}", self.host, self.path);
        match self.shown_ids() {
            (0, 0) => base,
            (uid, 0) => format!("{base}?uid={uid}"),
            (0, gid) => format!("{base}?gid={gid}"),
            (uid, gid) => format!("{base}?uid={uid}&gid={gid}"),
        }
    }

    /// QEMU's refusal to name a directory for relative backing names when the ids are in
    /// the name (the directory alone would lose them).
    pub(crate) fn base_directory_refused(&self) -> Option<String> {
        (self.shown_ids() != (0, 0)).then(|| {
            format!(
                "Cannot generate a base directory for NFS node '{}'",
                self.file_name()
            )
        })
    }
}

fn process_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

fn process_gid() -> u32 {
    rustix::process::getgid().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(path: &str, user: Option<i64>, group: Option<i64>) -> Options {
        Options {
            host: "h".into(),
            path: path.into(),
            user,
            group,
            syn_count: None,
            cache_used: false,
            readahead: None,
            cache_pages: None,
        }
    }

    #[test]
    fn names_show_ids_that_are_not_zero() {
        assert_eq!(opts("/e/a", None, None).file_name(), "nfs://h/e/a");
        assert_eq!(opts("/e/a", Some(0), Some(0)).file_name(), "nfs://h/e/a");
        assert_eq!(opts("/e/a", Some(5), None).file_name(), "nfs://h/e/a?uid=5");
        assert_eq!(opts("/e/a", None, Some(7)).file_name(), "nfs://h/e/a?gid=7");
        assert_eq!(
            opts("/e/a", Some(5), Some(7)).file_name(),
            "nfs://h/e/a?uid=5&gid=7"
        );
        assert!(
            opts("/e/a", Some(5), None)
                .base_directory_refused()
                .is_some()
        );
        assert!(opts("/e/a", None, None).base_directory_refused().is_none());
    }

    #[test]
    fn the_export_is_before_the_last_slash() {
        assert_eq!(opts("/e/x/a.raw", None, None).split(), ("/e/x", "/a.raw"));
        assert_eq!(opts("/a.raw", None, None).split(), ("", "/a.raw"));
        assert_eq!(opts("/e/", None, None).split(), ("/e", "/"));
    }
}
