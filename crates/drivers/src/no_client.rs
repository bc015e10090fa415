//! Drivers of storage services ferrite has no client for: `rbd` (Ceph), `gluster`
//! (GlusterFS) and `nvme` (an NVMe controller taken from the kernel through VFIO). QEMU's
//! schema has them, so their options are checked as QEMU checks them before it reaches the
//! service (a Ceph configuration file that cannot be read, a secret that is not there, an
//! empty GlusterFS server list); then the open, or the image's creation, is refused with
//! a text that says why, where QEMU would report the service's own failure.

use ferrite_block::driver::Driver;
use ferrite_block::{DriverFactory, DriverKind, Graph, LocalFut, NameCreation, OpenCtx};
use ferrite_qapi::{Args, Error};
use std::io;
use std::rc::Rc;

/// Which service.
#[derive(Clone, Copy)]
pub(crate) enum Service {
    Rbd,
    Gluster,
    Nvme,
}

/// The factory of one service's driver.
pub(crate) struct NoClientFactory(pub(crate) Service);

impl Service {
    fn driver(self) -> &'static str {
        match self {
            Service::Rbd => "rbd",
            Service::Gluster => "gluster",
            Service::Nvme => "nvme",
        }
    }

    /// Why ferrite cannot go on.
    fn refusal(self) -> Error {
        Error::generic(match self {
            Service::Rbd => {
                "ferrite has no Ceph client: 'rbd' images cannot be opened or created \
                 (map the image with the kernel's rbd driver and use host_device)"
            }
            Service::Gluster => {
                "ferrite has no GlusterFS client: 'gluster' images cannot be opened or \
                 created (mount the volume and use file)"
            }
            Service::Nvme => {
                "ferrite has no VFIO NVMe driver: 'nvme' controllers cannot be opened \
                 (leave the controller to the kernel and use host_device on its namespace)"
            }
        })
    }

    /// QEMU's checks of a location before it reaches the service.
    fn check_location(self, graph: &Graph, location: &Args) -> ferrite_block::Result<()> {
        match self {
            Service::Rbd => {
                ferrite_block::check_visited_whole(location)?;
                if let Some(conf) = location.opt_str("conf") {
                    let read = std::fs::metadata(conf)
                        .and_then(|_| std::fs::read(conf))
                        .and_then(|text| {
                            crate::ceph_conf::loads(&text)
                                .then_some(())
                                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
                        });
                    if let Err(e) = read {
                        return Err(Error::generic(format!(
                            "error reading conf file {conf}: {}",
                            ferrite_qapi::os_msg(&e)
                        ))
                        .into());
                    }
                }
                if let Some(id) = location.opt_str("key-secret") {
                    graph.secrets().get(id)?;
                }
            }
            Service::Gluster => {
                let servers = location
                    .get("server")
                    .and_then(|v| v.as_list())
                    .unwrap_or_default();
                if servers.is_empty() {
                    return Err(Error::generic("Parameter 'server' is missing").into());
                }
                let bad_type = servers.iter().any(|s| {
                    !matches!(
                        s.as_dict()
                            .and_then(|d| d.get("type"))
                            .and_then(|t| t.as_str()),
                        Some("inet" | "unix")
                    )
                });
                if bad_type {
                    return Err(Error::generic("Parameter 'type' may be 'inet' or 'unix'").into());
                }
            }
            Service::Nvme => {}
        }
        Ok(())
    }
}

impl DriverFactory for NoClientFactory {
    fn name(&self) -> &'static str {
        self.0.driver()
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            self.0.check_location(ctx.graph(), ctx.opts())?;
            Err(self.0.refusal().into())
        })
    }

    fn can_create(&self) -> bool {
        !matches!(self.0, Service::Nvme)
    }

    fn name_creation(&self) -> NameCreation {
        match self.0 {
            Service::Nvme => NameCreation::ReuseExisting,
            Service::Rbd | Service::Gluster => NameCreation::Create,
        }
    }

    fn create<'a>(&'a self, graph: &'a Rc<Graph>, opts: &'a Args) -> LocalFut<'a, ()> {
        Box::pin(async move {
            // QEMU's GlusterFS creation goes to the servers without judging their list.
            if !matches!(self.0, Service::Gluster) {
                let location = opts.dict("location").unwrap_or_default();
                self.0.check_location(graph, &location)?;
            }
            Err(self.0.refusal().into())
        })
    }
}
