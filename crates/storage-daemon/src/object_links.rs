//! What block drivers take from the program's objects: throttle filters find their
//! `throttle-group` (holding the object keeps `object-del` from removing a group in use, as
//! QEMU refuses it), and drivers with a `key-secret` its `secret`.

use ferrite_block::throttle::{BucketKind, BucketLimits, LimitsSource, ThrottleLimits};
use ferrite_qom::{ObjectRegistry, Secret, ThrottleGroup, UserObject};
use std::rc::{Rc, Weak};

/// A `throttle-group` object as the block layer's source of limits.
struct GroupObject(Rc<dyn UserObject>);

impl LimitsSource for GroupObject {
    fn limits(&self) -> ThrottleLimits {
        let Some(group) = self.0.as_any().downcast_ref::<ThrottleGroup>() else {
            return ThrottleLimits::default();
        };
        let config = group.config();
        let mut limits = ThrottleLimits {
            op_size: u64::try_from(config.iops_size()).unwrap_or(0),
            ..ThrottleLimits::default()
        };
        for (kind, name, dir) in [
            (BucketKind::BpsTotal, "bps", "total"),
            (BucketKind::BpsRead, "bps", "read"),
            (BucketKind::BpsWrite, "bps", "write"),
            (BucketKind::OpsTotal, "iops", "total"),
            (BucketKind::OpsRead, "iops", "read"),
            (BucketKind::OpsWrite, "iops", "write"),
        ] {
            let b = config.bucket(name, dir);
            limits.buckets[kind as usize] = BucketLimits {
                avg: b.avg as f64,
                max: b.max as f64,
                burst_length: b.burst_length as f64,
            };
        }
        limits
    }
}

/// Lets the drivers of `graph` find the `throttle-group` and `secret` objects of `objects`.
pub(crate) fn link(graph: &ferrite_block::Graph, objects: &Rc<ObjectRegistry>) {
    let groups: Weak<ObjectRegistry> = Rc::downgrade(objects);
    graph.throttle_groups().set_lookup(Rc::new(move |id: &str| {
        let obj = groups.upgrade()?.get(id)?;
        obj.as_any().downcast_ref::<ThrottleGroup>()?;
        Some(Rc::new(GroupObject(obj)) as Rc<dyn LimitsSource>)
    }));
    let secrets: Weak<ObjectRegistry> = Rc::downgrade(objects);
    graph.secrets().set_lookup(Rc::new(move |id: &str| {
        let obj = secrets.upgrade()?.get(id)?;
        let secret = obj.as_any().downcast_ref::<Secret>()?;
        Some(secret.value().to_vec())
    }));
}
