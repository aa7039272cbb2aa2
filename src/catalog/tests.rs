use std::path::PathBuf;
use std::sync::Arc;

use super::*;

fn digest(fill: char) -> String {
    std::iter::repeat_n(fill, 64).collect()
}

fn image(d: &str, names: &[&str]) -> ImageRecord {
    ImageRecord {
        digest: d.into(),
        size: 1 << 20,
        format: "raw".into(),
        source: "/tmp/src.img".into(),
        created: 1_700_000_000,
        names: names.iter().map(|s| s.to_string()).collect(),
    }
}

fn overlay(name: &str, base: &str) -> VolumeRecord {
    VolumeRecord {
        name: name.into(),
        kind: VolumeKind::Overlay,
        base: Some(base.into()),
        size: 1 << 30,
        path: PathBuf::from(format!("/var/lib/vdisk/volumes/{name}")),
        state: VolumeState::Ready,
        created: 1_700_000_100,
    }
}

fn export(volume: &str, socket: &str) -> ExportRecord {
    ExportRecord {
        volume: volume.into(),
        socket: socket.into(),
        queues: 2,
        readonly: false,
        serial: Some("disk0".into()),
    }
}

fn open() -> (tempfile::TempDir, Catalog) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cat = Catalog::open(dir.path()).expect("open catalog");
    (dir, cat)
}

#[test]
fn catalog_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Catalog>();
}

#[test]
fn opens_in_wal_mode_with_schema_version() {
    let (dir, cat) = open();
    assert!(dir.path().join(CATALOG_FILE).exists());
    let conn = cat.lock();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("journal_mode");
    assert_eq!(mode, "wal");
    let sync: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .expect("synchronous");
    assert_eq!(sync, 2, "synchronous=FULL");
    let version: i64 = conn
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .expect("schema_version");
    assert_eq!(version, SCHEMA_VERSION);
}

#[test]
fn newer_schema_is_refused() {
    let (dir, cat) = open();
    cat.lock()
        .execute("UPDATE schema_version SET version = 99", [])
        .expect("bump");
    drop(cat);
    match Catalog::open(dir.path()) {
        Err(CatalogError::SchemaTooNew { found: 99, .. }) => {}
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

#[test]
fn image_round_trip_and_lookup() {
    let (_dir, cat) = open();
    let d = format!("{}{}", "0123456789ab", &digest('c')[12..]);
    let stored = cat
        .put_image(&image(&d, &["debian", "debian:12"]))
        .expect("put");
    assert_eq!(stored, image(&d, &["debian", "debian:12"]));
    assert_eq!(cat.image("debian").expect("by name"), stored);
    assert_eq!(cat.image(&d).expect("by digest"), stored);
    assert_eq!(cat.image("0123456789ab").expect("by prefix"), stored);
    assert_eq!(cat.image("0123456789AB").expect("prefix, any case"), stored);
    assert!(matches!(
        cat.image("0123456789a"),
        Err(CatalogError::NotFound { .. })
    ));
    assert_eq!(cat.images().expect("list"), vec![stored]);
}

#[test]
fn put_image_twice_adds_names_and_keeps_fields() {
    let (_dir, cat) = open();
    let d = digest('a');
    cat.put_image(&image(&d, &["one"])).expect("first");
    let mut again = image(&d, &["two"]);
    again.source = "http://example.invalid/other".into();
    again.created = 5;
    let stored = cat.put_image(&again).expect("second");
    assert_eq!(stored.names, vec!["one", "two"]);
    assert_eq!(stored.source, "/tmp/src.img");
    assert_eq!(stored.created, 1_700_000_000);
    let mut other_size = image(&d, &[]);
    other_size.size = 7;
    assert!(matches!(
        cat.put_image(&other_size),
        Err(CatalogError::Invalid { .. })
    ));
}

#[test]
fn ambiguous_prefix_lists_matches() {
    let (_dir, cat) = open();
    let a = format!("{}{}", "abcdefabcdef0", &digest('1')[13..]);
    let b = format!("{}{}", "abcdefabcdef1", &digest('2')[13..]);
    cat.put_image(&image(&a, &[])).expect("a");
    cat.put_image(&image(&b, &[])).expect("b");
    match cat.image("abcdefabcdef") {
        Err(CatalogError::Ambiguous { matches, .. }) => assert_eq!(matches, vec![a.clone(), b]),
        other => panic!("expected Ambiguous, got {other:?}"),
    }
    assert_eq!(cat.image("abcdefabcdef0").expect("longer prefix").digest, a);
}

#[test]
fn retag_moves_a_name() {
    let (_dir, cat) = open();
    let (a, b) = (digest('a'), digest('b'));
    cat.put_image(&image(&a, &["latest"])).expect("a");
    cat.put_image(&image(&b, &[])).expect("b");
    cat.tag("latest", &b).expect("retag");
    assert_eq!(cat.image("latest").expect("latest").digest, b);
    assert!(cat.image(&a).expect("a").names.is_empty());
    // put_image moves a name too.
    cat.put_image(&image(&a, &["latest"])).expect("put moves");
    assert_eq!(cat.image("latest").expect("latest").digest, a);
    cat.untag("latest").expect("untag");
    assert!(matches!(
        cat.image("latest"),
        Err(CatalogError::NotFound { .. })
    ));
    assert!(matches!(
        cat.tag("x", &digest('f')),
        Err(CatalogError::NotFound { .. })
    ));
}

#[test]
fn bad_names_and_digests_are_refused() {
    let (_dir, cat) = open();
    for name in ["", "a/b", "..", ".hidden", "sp ace", "deadbeefdeadbeef"] {
        assert!(
            matches!(
                cat.put_image(&image(&digest('a'), &[name])),
                Err(CatalogError::BadName { .. })
            ),
            "{name:?}"
        );
    }
    for d in ["abc", &digest('A'), &digest('g')] {
        assert!(matches!(
            cat.put_image(&image(d, &[])),
            Err(CatalogError::BadDigest(_))
        ));
    }
    assert!(matches!(
        cat.begin_volume(&overlay("../x", &digest('a'))),
        Err(CatalogError::BadName { .. })
    ));
    assert!(cat.images().expect("list").is_empty());
}

#[test]
fn volume_lifecycle() {
    let (_dir, cat) = open();
    let d = digest('d');
    cat.put_image(&image(&d, &["base"])).expect("image");
    let rec = overlay("vm1", &d);
    cat.begin_volume(&rec).expect("begin");
    let got = cat.volume("vm1").expect("volume");
    assert_eq!(got.state, VolumeState::Creating);
    assert_eq!(cat.incomplete_volumes().expect("incomplete"), vec![got]);
    cat.finish_volume("vm1").expect("finish");
    assert_eq!(cat.volume("vm1").expect("volume"), rec);
    assert!(cat.incomplete_volumes().expect("incomplete").is_empty());
    cat.set_volume_size("vm1", 2 << 30).expect("resize");
    assert_eq!(cat.volume("vm1").expect("volume").size, 2 << 30);
    assert!(matches!(
        cat.begin_volume(&rec),
        Err(CatalogError::Exists { .. })
    ));
    let empty = VolumeRecord {
        name: "scratch".into(),
        kind: VolumeKind::Empty,
        base: None,
        ..overlay("scratch", &d)
    };
    cat.begin_volume(&empty).expect("empty volume");
    let names: Vec<_> = cat
        .volumes()
        .expect("list")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, vec!["scratch", "vm1"]);
    let removed = cat.remove_volume("scratch").expect("remove");
    assert_eq!(removed.name, "scratch");
    assert!(matches!(
        cat.volume("scratch"),
        Err(CatalogError::NotFound { .. })
    ));
    assert!(matches!(
        cat.finish_volume("nope"),
        Err(CatalogError::NotFound { .. })
    ));
}

#[test]
fn volume_kind_and_base_must_agree() {
    let (_dir, cat) = open();
    let d = digest('d');
    let no_base = VolumeRecord {
        base: None,
        ..overlay("v", &d)
    };
    assert!(matches!(
        cat.begin_volume(&no_base),
        Err(CatalogError::Invalid { .. })
    ));
    let empty_with_base = VolumeRecord {
        kind: VolumeKind::Empty,
        ..overlay("v", &d)
    };
    assert!(matches!(
        cat.begin_volume(&empty_with_base),
        Err(CatalogError::Invalid { .. })
    ));
    // The base must be a known image.
    assert!(matches!(
        cat.begin_volume(&overlay("v", &d)),
        Err(CatalogError::NotFound { what: "image", .. })
    ));
    assert!(cat.volumes().expect("list").is_empty());
}

#[test]
fn image_in_use_by_volumes_is_not_removed() {
    let (_dir, cat) = open();
    let d = digest('e');
    cat.put_image(&image(&d, &["base"])).expect("image");
    cat.begin_volume(&overlay("vm2", &d)).expect("vm2");
    cat.begin_volume(&overlay("vm1", &d)).expect("vm1");
    match cat.remove_image(&d) {
        Err(CatalogError::InUse { dependants }) => assert_eq!(dependants, vec!["vm1", "vm2"]),
        other => panic!("expected InUse, got {other:?}"),
    }
    cat.remove_volume("vm1").expect("vm1");
    cat.remove_volume("vm2").expect("vm2");
    let removed = cat.remove_image(&d).expect("remove image");
    assert_eq!(removed.names, vec!["base"]);
    assert!(matches!(
        cat.image("base"),
        Err(CatalogError::NotFound { .. })
    ));
}

#[test]
fn exports_round_trip_and_pin_their_volume() {
    let (_dir, cat) = open();
    let d = digest('f');
    cat.put_image(&image(&d, &[])).expect("image");
    cat.begin_volume(&overlay("vm1", &d)).expect("vm1");
    cat.begin_volume(&overlay("vm2", &d)).expect("vm2");
    let e = export("vm1", "/run/vdisk/vm1.sock");
    cat.put_export(&e).expect("export");
    assert_eq!(cat.exports().expect("list"), vec![e.clone()]);
    // Same socket for another volume: refused.
    assert!(matches!(
        cat.put_export(&export("vm2", "/run/vdisk/vm1.sock")),
        Err(CatalogError::Exists { .. })
    ));
    // Replacing the volume's own export is fine.
    let e2 = ExportRecord {
        queues: 4,
        readonly: true,
        serial: None,
        ..e.clone()
    };
    cat.put_export(&e2).expect("replace");
    assert_eq!(cat.exports().expect("list"), vec![e2]);
    match cat.remove_volume("vm1") {
        Err(CatalogError::InUse { dependants }) => {
            assert_eq!(dependants, vec!["export /run/vdisk/vm1.sock"])
        }
        other => panic!("expected InUse, got {other:?}"),
    }
    assert!(matches!(
        cat.put_export(&export("ghost", "/run/g.sock")),
        Err(CatalogError::NotFound { .. })
    ));
    cat.remove_export("vm1").expect("remove export");
    assert!(matches!(
        cat.remove_export("vm1"),
        Err(CatalogError::NotFound { .. })
    ));
    cat.remove_volume("vm1").expect("now removable");
}

#[test]
fn reopen_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = digest('1');
    let (img, vol, exp);
    {
        let cat = Catalog::open(dir.path()).expect("open");
        img = cat.put_image(&image(&d, &["a", "b"])).expect("image");
        cat.begin_volume(&overlay("vm", &d)).expect("volume");
        cat.finish_volume("vm").expect("finish");
        cat.begin_volume(&overlay("half", &d)).expect("half-made");
        vol = cat.volumes().expect("volumes");
        exp = export("vm", "/run/vm.sock");
        cat.put_export(&exp).expect("export");
    }
    let cat = Catalog::open(dir.path()).expect("reopen");
    assert_eq!(cat.images().expect("images"), vec![img]);
    assert_eq!(cat.volumes().expect("volumes"), vol);
    assert_eq!(cat.exports().expect("exports"), vec![exp]);
    assert_eq!(
        cat.incomplete_volumes().expect("incomplete")[0].name,
        "half"
    );
}

#[test]
fn failure_midway_leaves_nothing() {
    let (_dir, cat) = open();
    // Make the second name's insert fail after the image row and the
    // first name went in.
    cat.lock()
        .execute_batch(
            "CREATE TRIGGER boom BEFORE INSERT ON image_names WHEN NEW.name = 'boom'
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
        )
        .expect("trigger");
    let d = digest('9');
    match cat.put_image(&image(&d, &["fine", "boom"])) {
        Err(CatalogError::Db { .. }) => {}
        other => panic!("expected the injected failure, got {other:?}"),
    }
    assert!(cat.images().expect("images").is_empty());
    assert!(matches!(
        cat.image("fine"),
        Err(CatalogError::NotFound { .. })
    ));
    // An error from our own code inside a transaction rolls back too.
    let r: Result<(), CatalogError> = cat.write("test", |tx| {
        tx.execute(
            "INSERT INTO images (digest, size, format, source, created)
             VALUES (?1, 1, 'raw', 'x', 0)",
            [&d],
        )
        .map_err(db("insert"))?;
        Err(CatalogError::BadDigest("injected".into()))
    });
    assert!(r.is_err());
    assert!(cat.images().expect("images").is_empty());
}

#[test]
fn threads_share_one_catalog() {
    let (_dir, cat) = open();
    let cat = Arc::new(cat);
    let handles: Vec<_> = (0..4u8)
        .map(|i| {
            let cat = Arc::clone(&cat);
            std::thread::spawn(move || {
                let d = digest(char::from(b'a' + i));
                cat.put_image(&image(&d, &[&format!("img{i}")]))
                    .expect("put");
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    assert_eq!(cat.images().expect("images").len(), 4);
}
