//! `ImageCache::fetch` against a real HTTP server on 127.0.0.1 and
//! against `file://` URLs.

#[path = "common/http.rs"]
mod http;

use std::cell::Cell;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use vdisk::cache::{CacheError, ImageCache};
use vdisk::catalog::Catalog;

use http::HttpServer;

const MIB: usize = 1 << 20;

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Deterministic bytes with a zero run in the middle (so that the sparse
/// writer has something to skip).
fn image_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let zeros = len / 4..len / 2;
    v[zeros].fill(0);
    v
}

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

    fn part(&self, digest: &str) -> PathBuf {
        self.cache.tmp_dir().join(format!("{digest}.part"))
    }

    /// Everything in `images/` but the `tmp` directory, and everything in
    /// `tmp/` but the lock file.
    fn leftovers(&self) -> (Vec<String>, Vec<String>) {
        let names = |p: &Path, skip: &str| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(p)
                .expect("read_dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .filter(|n| n != skip)
                .collect();
            v.sort();
            v
        };
        (
            names(self.cache.dir(), "tmp"),
            names(self.cache.tmp_dir(), ".lock"),
        )
    }
}

fn no_progress(_: u64, _: Option<u64>) {}

#[test]
fn fetch_over_http() {
    let fx = Fixture::new();
    let server = HttpServer::start();
    let data = image_bytes(3 * MIB + 1000, 1);
    let digest = sha256_hex(&data);
    server.put("/img.raw", data.clone());

    let last = Cell::new((0u64, None));
    let rec = fx
        .cache
        .fetch(
            &server.url("/img.raw"),
            &digest.to_uppercase(),
            Some("debian"),
            &|done, total| last.set((done, total)),
        )
        .expect("fetch");
    assert_eq!(rec.digest, digest);
    assert_eq!(rec.size, data.len() as u64);
    assert_eq!(rec.names, vec!["debian"]);
    assert_eq!(rec.format, "raw");
    assert_eq!(rec.source, server.url("/img.raw"));
    assert_eq!(
        last.get(),
        (data.len() as u64, Some(data.len() as u64)),
        "last progress report"
    );

    let path = fx.cache.path(&digest);
    assert_eq!(std::fs::read(&path).expect("read image"), data);
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o444);
    assert_eq!(fx.cache.show("debian").expect("show"), rec);
    assert_eq!(fx.leftovers(), (vec![digest.clone()], vec![]));
    // No Range on a fresh fetch.
    assert_eq!(server.seen().len(), 1);
    assert_eq!(server.seen()[0].range, None);

    // Fetching content already cached adds the name and downloads nothing.
    let again = fx
        .cache
        .fetch(
            &server.url("/img.raw"),
            &digest,
            Some("stable"),
            &no_progress,
        )
        .expect("fetch again");
    assert_eq!(again.names, vec!["debian", "stable"]);
    assert_eq!(server.seen().len(), 1);
}

#[test]
fn interrupted_fetch_resumes_with_range() {
    let fx = Fixture::new();
    let server = HttpServer::start();
    let data = image_bytes(4 * MIB, 2);
    let digest = sha256_hex(&data);
    server.put("/big.raw", data.clone());

    let cut = MIB + 12345;
    server.cut_next_after(cut);
    let err = fx
        .cache
        .fetch(&server.url("/big.raw"), &digest, Some("big"), &no_progress)
        .expect_err("the connection was cut");
    match &err {
        CacheError::Interrupted { got, expected, .. } => {
            assert_eq!(*expected, Some(data.len() as u64));
            assert!(*got <= cut as u64, "got {got}");
        }
        other => panic!("expected Interrupted, got {other:?}"),
    }
    assert!(err.to_string().contains("resumes"), "{err}");

    // The part is kept; nothing entered the cache.
    let part = fx.part(&digest);
    let part_len = std::fs::metadata(&part).expect("part kept").len();
    assert!(part_len > 0 && part_len <= cut as u64, "part is {part_len}");
    assert_eq!(
        std::fs::read(&part).expect("read part"),
        data[..part_len as usize],
        "the part holds the first bytes"
    );
    assert!(fx.catalog.images().expect("images").is_empty());
    assert_eq!(fx.leftovers().0, Vec::<String>::new());

    // A restart of the cache keeps the part.
    drop(fx.cache);
    let cache = ImageCache::open(fx.dir.path(), Arc::clone(&fx.catalog), None).expect("reopen");
    assert!(part.exists(), "open keeps .part files");

    let rec = cache
        .fetch(&server.url("/big.raw"), &digest, Some("big"), &no_progress)
        .expect("resumed fetch");
    assert_eq!(rec.digest, digest);
    assert_eq!(rec.size, data.len() as u64);
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[1].range_start,
        Some(part_len),
        "resume asks for the rest: {:?}",
        seen[1]
    );
    assert_eq!(std::fs::read(cache.path(&digest)).expect("image"), data);
    assert!(!part.exists());
}

#[test]
fn server_without_ranges_starts_over() {
    let fx = Fixture::new();
    let server = HttpServer::start();
    let data = image_bytes(2 * MIB, 3);
    let digest = sha256_hex(&data);
    server.put("/x", data.clone());
    server.cut_next_after(MIB / 2);
    fx.cache
        .fetch(&server.url("/x"), &digest, None, &no_progress)
        .expect_err("cut");
    assert!(fx.part(&digest).exists());

    server.ignore_range(true);
    let rec = fx
        .cache
        .fetch(&server.url("/x"), &digest, None, &no_progress)
        .expect("200 instead of 206");
    assert_eq!(rec.digest, digest);
    assert!(server.seen()[1].range.is_some(), "it did ask for a range");
    assert_eq!(std::fs::read(fx.cache.path(&digest)).expect("image"), data);
}

#[test]
fn complete_part_is_verified_without_downloading_again() {
    let fx = Fixture::new();
    let server = HttpServer::start();
    let data = image_bytes(MIB, 4);
    let digest = sha256_hex(&data);
    server.put("/done", data.clone());
    // An earlier fetch got everything but stopped before the rename.
    std::fs::write(fx.part(&digest), &data).expect("write part");
    let rec = fx
        .cache
        .fetch(&server.url("/done"), &digest, None, &no_progress)
        .expect("fetch");
    assert_eq!(rec.size, data.len() as u64);
    assert_eq!(server.seen()[0].range_start, Some(data.len() as u64));
}

#[test]
fn wrong_digest_leaves_nothing() {
    let fx = Fixture::new();
    let server = HttpServer::start();
    let data = image_bytes(MIB + 17, 5);
    let actual = sha256_hex(&data);
    let claimed = sha256_hex(b"something else");
    server.put("/img", data);
    let err = fx
        .cache
        .fetch(&server.url("/img"), &claimed, Some("x"), &no_progress)
        .expect_err("digest differs");
    match &err {
        CacheError::DigestMismatch { expected, got, .. } => {
            assert_eq!(expected, &claimed);
            assert_eq!(got, &actual);
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&claimed) && msg.contains(&actual), "{msg}");
    assert_eq!(fx.leftovers(), (vec![], vec![]), "nothing in images/");
    assert!(fx.catalog.images().expect("images").is_empty());
    assert!(fx.cache.show("x").is_err());
}

#[test]
fn not_found_is_a_clear_error() {
    let fx = Fixture::new();
    let server = HttpServer::start();
    let err = fx
        .cache
        .fetch(
            &server.url("/missing.img"),
            &sha256_hex(b"x"),
            None,
            &no_progress,
        )
        .expect_err("404");
    assert!(
        matches!(err, CacheError::Http { status: 404, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("404") && msg.contains("/missing.img"), "{msg}");
    assert_eq!(fx.leftovers(), (vec![], vec![]), "no empty .part left");
}

#[test]
fn fetch_file_url() {
    let fx = Fixture::new();
    let src_dir = tempfile::tempdir().expect("tempdir");
    let src = src_dir.path().join("an image.raw");
    let data = image_bytes(MIB + 3, 6);
    std::fs::write(&src, &data).expect("write source");
    let digest = sha256_hex(&data);
    let url = format!(
        "file://{}",
        src.to_str().expect("utf-8 path").replace(' ', "%20")
    );
    let rec = fx
        .cache
        .fetch(&url, &digest, Some("local"), &no_progress)
        .expect("file:// fetch");
    assert_eq!(rec.digest, digest);
    assert_eq!(rec.source, url);
    assert_eq!(std::fs::read(fx.cache.path(&digest)).expect("image"), data);

    let err = fx
        .cache
        .fetch(
            "file:///nonexistent/x.img",
            &sha256_hex(b"y"),
            None,
            &no_progress,
        )
        .expect_err("missing file");
    assert!(matches!(err, CacheError::Io { .. }), "{err:?}");
}

#[test]
fn bad_arguments_are_refused_before_any_transfer() {
    let fx = Fixture::new();
    let server = HttpServer::start();
    let d = sha256_hex(b"z");
    assert!(matches!(
        fx.cache.fetch(&server.url("/a"), "abc", None, &no_progress),
        Err(CacheError::Catalog(_))
    ));
    assert!(matches!(
        fx.cache
            .fetch(&server.url("/a"), &d, Some("a/b"), &no_progress),
        Err(CacheError::Catalog(_))
    ));
    assert!(matches!(
        fx.cache.fetch("ftp://127.0.0.1/a", &d, None, &no_progress),
        Err(CacheError::BadUrl { .. })
    ));
    assert!(server.seen().is_empty());
}

#[test]
fn fetched_qcow2_is_verified_then_converted() {
    let fx = Fixture::new();
    let server = HttpServer::start();
    let work = tempfile::tempdir().expect("tempdir");
    let raw = work.path().join("d.raw");
    let raw_data = image_bytes(MIB, 7);
    std::fs::write(&raw, &raw_data).expect("raw");
    let qcow = work.path().join("d.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .output()
        .expect("qemu-img must be installed for this test");
    assert!(out.status.success(), "{out:?}");
    let qcow_data = std::fs::read(&qcow).expect("qcow2");
    server.put("/d.qcow2", qcow_data.clone());

    // The digest given is the download's; the image's is the raw content's.
    let rec = fx
        .cache
        .fetch(
            &server.url("/d.qcow2"),
            &sha256_hex(&qcow_data),
            Some("cloud"),
            &no_progress,
        )
        .expect("fetch qcow2");
    assert_eq!(rec.digest, sha256_hex(&raw_data));
    assert_eq!(rec.size, raw_data.len() as u64);
    assert_eq!(fx.leftovers(), (vec![rec.digest.clone()], vec![]));
}

#[test]
fn image_cache_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<ImageCache>();
}
