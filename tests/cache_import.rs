//! `ImageCache::import`, removal, usage and the clean-up at open.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use vdisk::cache::{CacheError, ImageCache, Problem};
use vdisk::catalog::{Catalog, VolumeKind, VolumeRecord, VolumeState};

const MIB: u64 = 1 << 20;
/// Small enough to hash quickly in a debug build.
const IMAGE_SIZE: u64 = 16 * MIB;

fn sha256_file(path: &Path) -> String {
    let data = std::fs::read(path).expect("read");
    Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

fn no_progress(_: u64, _: Option<u64>) {}

struct Fixture {
    dir: tempfile::TempDir,
    catalog: Arc<Catalog>,
    cache: ImageCache,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let catalog = Arc::new(Catalog::open(dir.path()).expect("catalog"));
        let cache = ImageCache::open(dir.path(), Arc::clone(&catalog), None).expect("cache");
        Fixture {
            dir,
            catalog,
            cache,
        }
    }

    fn src(&self, name: &str) -> PathBuf {
        let d = self.dir.path().join("src");
        std::fs::create_dir_all(&d).expect("mkdir");
        d.join(name)
    }
}

/// A 16 MiB sparse raw image: 1 MiB of data at 0, 1 MiB at 12 MiB, and
/// an explicitly written (allocated) run of zeros in between.
fn sparse_raw(path: &Path) {
    let f = File::create(path).expect("create");
    f.set_len(IMAGE_SIZE).expect("set_len");
    let data: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
    f.write_all_at(&data, 0).expect("write");
    f.write_all_at(&data, 12 * MIB).expect("write");
    f.write_all_at(&vec![0u8; (2 * MIB) as usize], 4 * MIB)
        .expect("write zeros");
    f.sync_all().expect("sync");
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed for these tests");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn overlay(name: &str, base: &str) -> VolumeRecord {
    VolumeRecord {
        name: name.into(),
        kind: VolumeKind::Overlay,
        base: Some(base.into()),
        size: IMAGE_SIZE,
        path: PathBuf::from(format!("/nonexistent/{name}")),
        state: VolumeState::Ready,
        created: 0,
    }
}

#[test]
fn raw_import_keeps_holes() {
    let fx = Fixture::new();
    let src = fx.src("disk.raw");
    sparse_raw(&src);
    let src_alloc = allocated(&src);
    assert!(
        src_alloc < 8 * MIB,
        "the test filesystem must support sparse files ({src_alloc} bytes allocated)"
    );

    let rec = fx
        .cache
        .import(&src, Some("disk"), &no_progress)
        .expect("import");
    assert_eq!(rec.digest, sha256_file(&src));
    assert_eq!(rec.size, IMAGE_SIZE);
    assert_eq!(rec.names, vec!["disk"]);
    assert_eq!(rec.format, "raw");

    let img = fx.cache.path(&rec.digest);
    assert_eq!(sha256_file(&img), rec.digest);
    let img_alloc = allocated(&img);
    // The data extents (2 MiB) are copied; the holes and the written
    // zeros are not.
    assert!(
        img_alloc <= src_alloc,
        "image allocates {img_alloc} bytes, source {src_alloc}"
    );
    assert!(
        img_alloc < 3 * MIB,
        "zero blocks were written: {img_alloc} bytes"
    );

    // Importing the same content again only adds the name.
    let again = fx
        .cache
        .import(&src, Some("disk-copy"), &no_progress)
        .expect("again");
    assert_eq!(again.digest, rec.digest);
    assert_eq!(again.names, vec!["disk", "disk-copy"]);
    assert_eq!(fx.cache.list().expect("list").len(), 1);
    let tmp_entries: Vec<_> = std::fs::read_dir(fx.cache.tmp_dir())
        .expect("tmp")
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n != ".lock")
        .collect();
    assert!(tmp_entries.is_empty(), "{tmp_entries:?}");

    let usage = fx.cache.usage().expect("usage");
    assert_eq!(usage.images, 1);
    assert_eq!(usage.used_bytes, img_alloc);
    assert_eq!(usage.budget, None);
    assert!(usage.fs_free_bytes > 0);
}

#[test]
fn qcow2_import_matches_raw() {
    let fx = Fixture::new();
    let raw = fx.src("disk.raw");
    sparse_raw(&raw);
    let qcow = fx.src("disk.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().expect("utf-8"),
        qcow.to_str().expect("utf-8"),
    ]);

    let from_qcow = fx
        .cache
        .import(&qcow, Some("from-qcow2"), &no_progress)
        .expect("qcow2 import");
    let from_raw = fx
        .cache
        .import(&raw, Some("from-raw"), &no_progress)
        .expect("raw import");
    assert_eq!(from_qcow.digest, from_raw.digest);
    assert_eq!(from_qcow.digest, sha256_file(&raw));
    assert_eq!(from_qcow.size, IMAGE_SIZE);
    assert_eq!(from_raw.names, vec!["from-qcow2", "from-raw"]);
    assert!(
        allocated(&fx.cache.path(&from_qcow.digest)) < 3 * MIB,
        "the converted image is sparse"
    );
}

#[test]
fn qcow2_without_qemu_img_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let catalog = Arc::new(Catalog::open(dir.path()).expect("catalog"));
    let cache = ImageCache::open(dir.path(), catalog, None)
        .expect("cache")
        .with_qemu_img("/nonexistent/qemu-img");
    let raw = dir.path().join("d.raw");
    File::create(&raw)
        .and_then(|f| f.set_len(MIB))
        .expect("raw");
    let qcow = dir.path().join("d.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().expect("utf-8"),
        qcow.to_str().expect("utf-8"),
    ]);
    let err = cache
        .import(&qcow, None, &no_progress)
        .expect_err("no qemu-img");
    assert!(
        matches!(err, CacheError::Qcow2NeedsQemuImg { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("qemu-img"), "{err}");
    assert!(cache.list().expect("list").is_empty());
}

#[test]
fn qcow2_with_a_backing_file_is_refused() {
    let fx = Fixture::new();
    let base = fx.src("base.raw");
    File::create(&base)
        .and_then(|f| f.set_len(MIB))
        .expect("base");
    let child = fx.src("child.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().expect("utf-8"),
        "-F",
        "raw",
        child.to_str().expect("utf-8"),
    ]);
    let err = fx
        .cache
        .import(&child, None, &no_progress)
        .expect_err("backing file");
    assert!(
        matches!(err, CacheError::Qcow2Unsupported { .. }),
        "{err:?}"
    );
}

#[test]
fn remove_is_refused_while_a_volume_depends_on_the_image() {
    let fx = Fixture::new();
    let src = fx.src("disk.raw");
    sparse_raw(&src);
    let rec = fx
        .cache
        .import(&src, Some("base"), &no_progress)
        .expect("import");
    fx.catalog
        .begin_volume(&overlay("vm1", &rec.digest))
        .expect("volume");
    fx.catalog
        .begin_volume(&overlay("vm2", &rec.digest))
        .expect("volume");

    let err = fx.cache.remove("base").expect_err("in use");
    match &err {
        CacheError::InUse { dependants, .. } => assert_eq!(dependants, &["vm1", "vm2"]),
        other => panic!("expected InUse, got {other:?}"),
    }
    assert!(err.to_string().contains("vm1, vm2"), "{err}");
    assert!(fx.cache.path(&rec.digest).exists(), "the file stays");
    assert_eq!(fx.cache.show("base").expect("still there"), rec);

    fx.catalog.remove_volume("vm1").expect("vm1");
    fx.catalog.remove_volume("vm2").expect("vm2");
    // By digest prefix this time.
    let removed = fx.cache.remove(&rec.digest[..12]).expect("remove");
    assert_eq!(removed.digest, rec.digest);
    assert!(!fx.cache.path(&rec.digest).exists());
    assert!(fx.cache.list().expect("list").is_empty());
}

#[test]
fn open_cleans_up_and_check_reports_missing_files() {
    let fx = Fixture::new();
    let src = fx.src("disk.raw");
    sparse_raw(&src);
    let kept = fx
        .cache
        .import(&src, Some("kept"), &no_progress)
        .expect("kept");
    let other = fx.src("other.raw");
    std::fs::write(&other, b"other image").expect("write");
    let lost = fx
        .cache
        .import(&other, Some("lost"), &no_progress)
        .expect("lost");
    let (dir, catalog, cache) = (fx.dir, fx.catalog, fx.cache);
    let tmp = cache.tmp_dir().to_path_buf();
    let images = cache.dir().to_path_buf();
    drop(cache);

    // A crash left: a temporary import, a fetch's part, an image file
    // whose row was never written, and a row whose file is gone.
    std::fs::write(tmp.join("import-1-1"), b"junk").expect("tmp");
    let part = tmp.join(format!("{}.part", "ab".repeat(32)));
    std::fs::write(&part, b"partial").expect("part");
    let orphan = images.join("cd".repeat(32));
    std::fs::write(&orphan, b"orphan").expect("orphan");
    let lost_path = images.join(&lost.digest);
    std::fs::remove_file(&lost_path).expect("lose a file");

    let cache = ImageCache::open(dir.path(), Arc::clone(&catalog), None).expect("reopen");
    assert!(!tmp.join("import-1-1").exists(), "stale temp removed");
    assert!(part.exists(), ".part kept for resume");
    assert!(!orphan.exists(), "file without a row removed");
    assert!(cache.path(&kept.digest).exists());
    assert_eq!(
        cache.check().expect("check"),
        vec![Problem::Missing {
            digest: lost.digest.clone(),
            path: lost_path,
        }]
    );

    // A second handle on the same state directory is refused.
    assert!(matches!(
        ImageCache::open(dir.path(), catalog, None),
        Err(CacheError::Locked { .. })
    ));
}

#[test]
fn budget_is_enforced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let catalog = Arc::new(Catalog::open(dir.path()).expect("catalog"));
    let cache = ImageCache::open(dir.path(), catalog, Some(MIB)).expect("cache");
    let src = dir.path().join("disk.raw");
    sparse_raw(&src);
    let err = cache
        .import(&src, None, &no_progress)
        .expect_err("2 MiB of data does not fit 1 MiB");
    assert!(matches!(err, CacheError::OverBudget { .. }), "{err:?}");
    assert!(cache.list().expect("list").is_empty());
    let usage = cache.usage().expect("usage");
    assert_eq!(
        (usage.budget, usage.images, usage.used_bytes),
        (Some(MIB), 0, 0)
    );
    let small = dir.path().join("small.raw");
    std::fs::write(&small, vec![7u8; 8192]).expect("small");
    cache.import(&small, None, &no_progress).expect("fits");
}

#[test]
fn import_refuses_what_is_not_a_file() {
    let fx = Fixture::new();
    let err = fx
        .cache
        .import(fx.dir.path(), None, &no_progress)
        .expect_err("a directory");
    assert!(matches!(err, CacheError::NotAFile { .. }), "{err:?}");
    let err = fx
        .cache
        .import(Path::new("/nonexistent/disk.raw"), None, &no_progress)
        .expect_err("missing");
    assert!(matches!(err, CacheError::Io { .. }), "{err:?}");
}
