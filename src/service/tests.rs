//! The service's own behaviour where a real client cannot reach it: a disk
//! whose fdatasync fails (an injected fault) says so in `stats` and on the
//! event bus.

use std::time::Duration;

use super::*;
use crate::control::protocol::{ExportStart, Size, VolumeCreate};

fn created(d: &Daemon, name: &str) {
    d.volume_create(
        &VolumeCreate {
            name: name.into(),
            image: None,
            size: Some(Size(1 << 20)),
            full: false,
        },
        &|_, _| {},
    )
    .unwrap();
}

#[test]
fn a_failed_flush_shows_in_stats_and_as_an_event() {
    let dir = tempfile::tempdir().unwrap();
    let bus = EventBus::new();
    let mut sub = bus.subscribe();
    let d = Daemon::open(&dir.path().join("state"), dir.path(), bus).unwrap();
    created(&d, "vm1");
    d.export_start(&ExportStart {
        volume: "vm1".into(),
        socket: Some(dir.path().join("vm1.sock")),
        queues: None,
        readonly: false,
        serial: None,
    })
    .unwrap();
    assert_eq!(d.metrics().volumes[0].flush_error, None);

    let disk = d.lock().get("vm1").unwrap().disk.clone();
    let data = File::open(dir.path().join("state/volumes/vm1/data")).unwrap();
    crate::block::failpoint::fail_syncs(&data, 1);
    assert!(disk.sync().is_err());
    assert!(disk.sync().is_err(), "a later flush must fail too");

    let stats = d.metrics();
    let why = stats.volumes[0]
        .flush_error
        .clone()
        .expect("flush_error set");
    assert!(why.contains("until the export is restarted"), "{why}");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let failed = rt.block_on(async {
        loop {
            let e = tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .expect("an event within 5 s")
                .expect("the bus is open");
            if let EventKind::ExportFlushFailed { volume, reason } = e.kind {
                return (volume, reason);
            }
        }
    });
    assert_eq!(failed.0, "vm1");
    assert_eq!(failed.1, why);

    // Restarting the export reopens the disk: flushes work again.
    d.export_stop("vm1").unwrap();
    d.export_start(&ExportStart {
        volume: "vm1".into(),
        socket: Some(dir.path().join("vm1.sock")),
        queues: None,
        readonly: false,
        serial: None,
    })
    .unwrap();
    assert_eq!(d.metrics().volumes[0].flush_error, None);
    d.shutdown();
}
