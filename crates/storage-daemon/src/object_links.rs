//! What block drivers take from the program's objects: throttle filters find their
//! `throttle-group` (holding the object keeps `object-del` from removing a group in use, as
//! QEMU refuses it), and drivers with a `key-secret` its `secret`.

use ferrite_block::clock::Clock;
use ferrite_block::throttle::{BucketKind, BucketLimits, LimitsSource, ThrottleLimits};
use ferrite_qom::{
    AuthzObject, ObjectRegistry, ThrottleConfig, ThrottleGroup, TlsCredsObject, TlsCredsX509,
    UserObject,
};
use ferrite_tls::{Found, Objects};
use std::rc::{Rc, Weak};

/// A `throttle-group` object as the block layer's source of limits.
struct GroupObject(Rc<dyn UserObject>);

impl GroupObject {
    fn group(&self) -> Option<&ThrottleGroup> {
        self.0.as_any().downcast_ref::<ThrottleGroup>()
    }
}

impl LimitsSource for GroupObject {
    fn limits(&self) -> ThrottleLimits {
        self.group()
            .map_or_else(ThrottleLimits::default, |g| throttle_limits(&g.config()))
    }

    fn set_limits(&self, limits: ThrottleLimits) {
        if let Some(g) = self.group() {
            g.set_config(throttle_config(&limits));
        }
    }

    fn clock(&self) -> Clock {
        match self.group() {
            Some(g) if g.host_clock() => Clock::Host,
            _ => Clock::current(),
        }
    }
}

/// The buckets and the names of their limits.
const BUCKETS: [(BucketKind, &str); 6] = [
    (BucketKind::BpsTotal, "bps-total"),
    (BucketKind::BpsRead, "bps-read"),
    (BucketKind::BpsWrite, "bps-write"),
    (BucketKind::OpsTotal, "iops-total"),
    (BucketKind::OpsRead, "iops-read"),
    (BucketKind::OpsWrite, "iops-write"),
];

/// The block layer's form of a group's limits.
pub fn throttle_limits(config: &ThrottleConfig) -> ThrottleLimits {
    let mut limits = ThrottleLimits {
        op_size: u64::try_from(config.iops_size()).unwrap_or(0),
        ..ThrottleLimits::default()
    };
    for (kind, name) in BUCKETS {
        let (unit, dir) = name.split_once('-').unwrap_or((name, ""));
        let b = config.bucket(unit, dir);
        limits.buckets[kind as usize] = BucketLimits {
            avg: b.avg as f64,
            max: b.max as f64,
            burst_length: b.burst_length as f64,
        };
    }
    limits
}

/// The object's form of the block layer's limits.
pub fn throttle_config(limits: &ThrottleLimits) -> ThrottleConfig {
    let mut config = ThrottleConfig::default();
    for (kind, name) in BUCKETS {
        let b = limits.buckets[kind as usize];
        config.set_value(name, b.avg as i64);
        config.set_value(&format!("{name}-max"), b.max as i64);
        config.set_value(&format!("{name}-max-length"), b.burst_length as i64);
    }
    config.set_value(
        "iops-size",
        i64::try_from(limits.op_size).unwrap_or(i64::MAX),
    );
    config
}

/// Lets the drivers of `graph` find the `throttle-group` and `secret` objects of `objects`,
/// and the graph and its drivers any object's type (`iothread`, `pr-manager-helper`).
pub(crate) fn link(graph: &ferrite_block::Graph, objects: &Rc<ObjectRegistry>) {
    let groups: Weak<ObjectRegistry> = Rc::downgrade(objects);
    graph.throttle_groups().set_lookup(Rc::new(move |id: &str| {
        let obj = groups.upgrade()?.get(id)?;
        obj.as_any().downcast_ref::<ThrottleGroup>()?;
        Some(Rc::new(GroupObject(obj)) as Rc<dyn LimitsSource>)
    }));
    let secrets: Weak<ObjectRegistry> = Rc::downgrade(objects);
    graph.secrets().set_lookup(Rc::new(move |id: &str| {
        let objects = secrets
            .upgrade()
            .ok_or_else(|| format!("No secret with id '{id}'"))?;
        objects.secret_bytes(id).map_err(|e| e.to_string())
    }));
    let all: Weak<ObjectRegistry> = Rc::downgrade(objects);
    graph.set_object_types(Rc::new(move |id: &str| {
        all.upgrade()
            .and_then(|o| o.get(id))
            .map(|obj| obj.type_name())
    }));
    let iothreads: Weak<ObjectRegistry> = Rc::downgrade(objects);
    graph.set_iothread_resolver(Rc::new(move |path: &str| {
        iothreads.upgrade()?.resolve_typed(path, "iothread")
    }));
}

/// The TLS credentials (`tls-creds-x509`, `-psk`, `-anon`) and authorization objects of
/// `objects`, as the NBD server and client look them up by id (holding nothing: QEMU lets
/// `object-del` remove credentials in use, and what uses them keeps its own reference).
pub(crate) fn tls_objects(objects: &Rc<ObjectRegistry>) -> Objects {
    let creds_in: Weak<ObjectRegistry> = Rc::downgrade(objects);
    let authz_in: Weak<ObjectRegistry> = Rc::downgrade(objects);
    Objects {
        creds: Rc::new(move |id: &str| {
            let Some(obj) = creds_in.upgrade().and_then(|o| o.get(id)) else {
                return Found::Missing;
            };
            let any = obj.as_any();
            if let Some(creds) = any.downcast_ref::<TlsCredsX509>() {
                Found::Yes(creds.creds())
            } else if let Some(creds) = any.downcast_ref::<TlsCredsObject>() {
                Found::Yes(creds.creds())
            } else {
                Found::OtherType
            }
        }),
        authz: Rc::new(move |id: &str| {
            let Some(obj) = authz_in.upgrade().and_then(|o| o.get(id)) else {
                return Found::Missing;
            };
            match obj.as_any().downcast_ref::<AuthzObject>() {
                Some(authz) => Found::Yes(authz.authz()),
                None => Found::OtherType,
            }
        }),
    }
}
