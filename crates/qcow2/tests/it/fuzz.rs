//! qcow2 against damaged images: whatever bytes the header and metadata tables hold,
//! opening, reading, writing, zeroing, discarding, resizing and closing return (an error is
//! fine) without panicking, hanging, or writing far outside the image.
//!
//! Seed images are made and filled by ferrite itself, then damaged by proptest: random bytes
//! anywhere in the metadata area, and whole header fields set to hostile values.

use crate::drivers;
use ferrite_block::{BlockBackend, EventSink, Graph, Perm, ReqFlags};
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

struct NoEvents;

impl EventSink for NoEvents {
    fn emit(&self, _event: &dyn ferrite_qapi::QapiEvent) {}
}

const SIZE: u64 = 1 << 20;
/// How far past its old end a damaged image may grow while it is used: a write that
/// allocates, plus the metadata to map it.
const GROWTH_LIMIT: u64 = 8 << 20;

fn file_opts(path: &Path) -> QDict {
    QDict::new()
        .with("driver", "file")
        .with("filename", path.to_str().unwrap_or_default())
}

fn run_local<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tokio::task::LocalSet::new().block_on(&rt, f)
}

/// A seed image made by ferrite: `create` options plus some data of every kind.
fn seed(dir: &Path, name: &str, create: QDict) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, b"").expect("create seed file");
    run_local(async {
        let g = Graph::new(Rc::new(NoEvents), drivers());
        let opts = create
            .with("driver", "qcow2")
            .with("size", SIZE)
            .with("file", QObject::Dict(file_opts(&path)));
        ferrite_block::create::create(&g, &Args::new(opts))
            .await
            .expect("create seed");
        let node = g
            .blockdev_add(&Args::new(
                QDict::new()
                    .with("driver", "qcow2")
                    .with("node-name", "seed")
                    .with("file", QObject::Dict(file_opts(&path))),
            ))
            .await
            .expect("open seed");
        let hold =
            BlockBackend::new(&g, &node, Perm::WRITE | Perm::RESIZE, Perm::all()).expect("attach");
        hold.write(0, vec![0x11; 96 << 10], ReqFlags::empty())
            .await
            .expect("write");
        hold.write(300 << 10, vec![0x22; 5000], ReqFlags::empty())
            .await
            .expect("write");
        hold.write_zeroes(600 << 10, 64 << 10, ReqFlags::MAY_UNMAP)
            .await
            .expect("zero");
        let cs = 64 << 10;
        let compressible: Vec<u8> = (0..cs).map(|i| (i / 512) as u8).collect();
        hold.write_compressed(768 << 10, compressible)
            .await
            .expect("compressed");
        drop(hold);
        g.blockdev_del("seed").await.expect("close seed");
    });
    path
}

/// Opens the damaged image and uses it ([`ferrite_qcow2::testing::exercise`]).
async fn exercise(path: &Path) -> usize {
    let g = Graph::new(Rc::new(NoEvents), drivers());
    ferrite_qcow2::testing::exercise(&g, file_opts(path)).await
}

fn check_damaged(seed: &Path, damage: impl FnOnce(&mut Vec<u8>)) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let path = dir.path().join("damaged.qcow2");
    let mut bytes = std::fs::read(seed).map_err(|e| TestCaseError::fail(e.to_string()))?;
    damage(&mut bytes);
    std::fs::write(&path, &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let before = bytes.len() as u64;
    let finished = run_local(async {
        tokio::time::timeout(Duration::from_secs(20), exercise(&path))
            .await
            .is_ok()
    });
    prop_assert!(finished, "the damaged image hung the driver");
    let after = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    prop_assert!(
        after <= before + GROWTH_LIMIT,
        "the file grew from {before} to {after} bytes"
    );
    Ok(())
}

fn seeds() -> &'static (tempfile::TempDir, Vec<PathBuf>) {
    static SEEDS: std::sync::OnceLock<(tempfile::TempDir, Vec<PathBuf>)> =
        std::sync::OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = vec![
            seed(
                dir.path(),
                "v3-4k.qcow2",
                QDict::new().with("cluster-size", 4096u64),
            ),
            seed(
                dir.path(),
                "v2-512.qcow2",
                QDict::new()
                    .with("cluster-size", 512u64)
                    .with("version", "v2"),
            ),
            seed(
                dir.path(),
                "ext-l2-16k.qcow2",
                QDict::new()
                    .with("cluster-size", 16384u64)
                    .with("extended-l2", true)
                    .with("refcount-bits", 1u64),
            ),
        ];
        (dir, paths)
    })
}

#[test]
fn seeds_read_back_what_was_written() {
    for seed in &seeds().1 {
        let content = run_local(async {
            let g = Graph::new(Rc::new(NoEvents), drivers());
            let node = g
                .blockdev_add(&Args::new(
                    QDict::new()
                        .with("driver", "qcow2")
                        .with("node-name", "q")
                        .with("read-only", true)
                        .with("file", QObject::Dict(file_opts(seed))),
                ))
                .await
                .expect("open");
            BlockBackend::new(&g, &node, Perm::CONSISTENT_READ, Perm::all())
                .expect("attach")
                .read(0, SIZE as usize)
                .await
                .expect("read")
        });
        assert!(content[..96 << 10].iter().all(|&b| b == 0x11));
        assert!(
            content[300 << 10..(300 << 10) + 5000]
                .iter()
                .all(|&b| b == 0x22)
        );
        assert_eq!(content[(768 << 10) + 513], 1);
    }
}

/// The damage must leave most images usable, or the property tests would only ever see
/// images refused at open and prove nothing about the request paths.
#[test]
fn damaged_tables_still_mostly_open() {
    let seed = &seeds().1[0];
    let bytes = std::fs::read(seed).expect("seed");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.qcow2");
    let (mut tried, mut used) = (0, 0);
    for word in (16..bytes.len().min(24576) / 8).step_by(7) {
        let mut b = bytes.clone();
        b[word * 8..word * 8 + 8].copy_from_slice(&0x0000_0000_0010_0000u64.to_be_bytes());
        std::fs::write(&path, &b).expect("write");
        tried += 1;
        if run_local(exercise(&path)) > 0 {
            used += 1;
        }
    }
    assert!(
        used * 2 > tried,
        "only {used} of {tried} damaged images could be read"
    );
}

/// A dirty image (lazy refcounts left unflushed) whose L2 table refers to a cluster far past
/// the end of the file: the repair on opening it counts that reference as QEMU's check does,
/// not at all, instead of walking every cluster up to it (found by the qcow2_image fuzz
/// target: it hung the daemon).
#[test]
fn repair_skips_references_far_past_the_end() {
    let seed = &seeds().1[0];
    check_damaged(seed, |b| {
        let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
        b[72..80].copy_from_slice(&1u64.to_be_bytes());
        let l1 = be64(b, 40) as usize;
        let l2 = (be64(b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
        b[l2 + 8..l2 + 16].copy_from_slice(&((1u64 << 63) | (1 << 50)).to_be_bytes());
    })
    .expect("the dirty image is repaired in bounded time");
}

/// Header fields (offset, width) and values that stress them.
const FIELDS: &[(usize, usize)] = &[
    (4, 4),   // version
    (8, 8),   // backing file offset
    (16, 4),  // backing file size
    (20, 4),  // cluster bits
    (24, 8),  // size
    (32, 4),  // crypt method
    (36, 4),  // L1 size
    (40, 8),  // L1 offset
    (48, 8),  // refcount table offset
    (56, 4),  // refcount table clusters
    (60, 4),  // snapshots
    (64, 8),  // snapshots offset
    (72, 8),  // incompatible features
    (80, 8),  // compatible features
    (88, 8),  // autoclear features
    (96, 4),  // refcount order
    (100, 4), // header length
    (104, 1), // compression type
];

fn hostile() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::from(u32::MAX)),
        Just(1 << 63),
        Just(512),
        Just(4096),
        Just(65536),
        any::<u64>(),
        0u64..64,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random bytes in the metadata area (header, refcount table and block, L1, L2).
    #[test]
    fn random_bytes_in_metadata_never_panic(
        which in 0usize..3,
        edits in prop::collection::vec((0usize..24576, any::<u8>()), 1..12),
    ) {
        let seed = &seeds().1[which];
        check_damaged(seed, |b| {
            for (at, v) in edits {
                let at = at % b.len().max(1);
                if let Some(x) = b.get_mut(at) {
                    *x = v;
                }
            }
        })?;
    }

    /// A header field set to a hostile value.
    #[test]
    fn hostile_header_fields_never_panic(
        which in 0usize..3,
        field in 0usize..FIELDS.len(),
        value in hostile(),
    ) {
        let seed = &seeds().1[which];
        let (at, width) = FIELDS[field];
        check_damaged(seed, |b| {
            let bytes = value.to_be_bytes();
            if b.len() >= at + width {
                b[at..at + width].copy_from_slice(&bytes[8 - width..]);
            }
        })?;
    }

    /// Table entries (8-byte words past the header) set to hostile values.
    #[test]
    fn hostile_table_entries_never_panic(
        which in 0usize..3,
        word in 16usize..3072,
        value in hostile(),
    ) {
        let seed = &seeds().1[which];
        check_damaged(seed, |b| {
            let at = word * 8;
            if b.len() >= at + 8 {
                b[at..at + 8].copy_from_slice(&value.to_be_bytes());
            }
        })?;
    }
}
