//! Results and events as people read them.

use serde_json::Value;

use super::table::{fields, size, time, Align, Table};
use crate::control::protocol::{
    Call, ExportInfo, ImageFormat, ImageInfo, PoolInfo, PoolList, Response, StatsResult,
    VolumeInfo, VolumeKind, VolumeState,
};

use Align::{Left, Right};

/// The text to print for a successful call.
pub fn response(call: &Call, r: &Response) -> String {
    match r {
        Response::Image(i) => image(i),
        Response::Images(l) => images(&l.images),
        Response::Volume(v) => volume(v),
        Response::Volumes(l) => volumes(&l.volumes),
        Response::RawExported(x) => format!(
            "exported volume {} to {} ({})\n",
            x.name,
            x.file.display(),
            size(x.size)
        ),
        Response::Export(e) => export(e),
        Response::Exports(l) => exports(&l.exports),
        Response::Stats(s) => stats(s),
        Response::Watching(_) => String::new(),
        Response::Version(v) => format!(
            "vdiskd {} (protocol {}), vdiskctl {}\n",
            v.vdisk,
            v.protocol,
            env!("CARGO_PKG_VERSION")
        ),
        Response::Done(_) => done(call),
        Response::Pool(p) => pool(p),
        Response::Pools(l) => pools(l),
    }
}

fn pool(p: &PoolInfo) -> String {
    fields(&[
        ("image", p.digest.clone()),
        ("names", p.names.join(", ")),
        ("priority", p.priority.to_string()),
        (
            "copies wanted",
            if p.by_rule {
                format!("{} (by the priority rule)", p.wanted)
            } else {
                p.wanted.to_string()
            },
        ),
        ("ready", p.ready.to_string()),
        ("being made", p.making.to_string()),
        (
            "bytes each",
            format!("{} ({} bytes)", size(p.bytes_each), p.bytes_each),
        ),
        ("hits", p.hits.to_string()),
        ("misses", p.misses.to_string()),
        (
            "last claim",
            p.last_claim.map_or_else(|| "-".to_string(), time),
        ),
    ])
}

fn pools(l: &PoolList) -> String {
    let mut t = Table::new(&[
        ("IMAGE", Left),
        ("NAMES", Left),
        ("PRIORITY", Right),
        ("WANTED", Right),
        ("READY", Right),
        ("MAKING", Right),
        ("EACH", Right),
        ("HITS", Right),
        ("MISSES", Right),
    ]);
    for p in &l.entries {
        t.row(vec![
            short_digest(&p.digest),
            p.names.join(","),
            p.priority.to_string(),
            p.wanted.to_string(),
            p.ready.to_string(),
            p.making.to_string(),
            size(p.bytes_each),
            p.hits.to_string(),
            p.misses.to_string(),
        ]);
    }
    format!(
        "{}\ncopies by priority: {}; {} free, reserve {}\n",
        t.render(),
        l.rule,
        size(l.free_bytes),
        size(l.reserve_bytes)
    )
}

fn done(call: &Call) -> String {
    match call {
        Call::ImageRemove(p) => format!("removed image {}\n", p.image),
        Call::VolumeDelete(p) => format!("deleted volume {}\n", p.name),
        Call::ExportStop(p) => format!("stopped exporting {}\n", p.volume),
        Call::PoolUnset(p) => format!("no more ready copies of {}\n", p.image),
        other => format!("{}: done\n", other.method()),
    }
}

/// `sha256:` and the first 12 hex digits, as image IDs are usually shown.
fn short_digest(d: &str) -> String {
    let hex = d.strip_prefix("sha256:").unwrap_or(d);
    format!("sha256:{}", hex.get(..12).unwrap_or(hex))
}

fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Raw => "raw",
        ImageFormat::Qcow2 => "qcow2",
    }
}

fn kind_name(k: VolumeKind) -> &'static str {
    match k {
        VolumeKind::Overlay => "overlay",
        VolumeKind::Raw => "raw",
    }
}

fn state_name(s: VolumeState) -> &'static str {
    match s {
        VolumeState::Creating => "creating",
        VolumeState::Ready => "ready",
        VolumeState::Deleting => "deleting",
        VolumeState::Migrating => "migrating",
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

fn or_dash(s: Option<&str>) -> String {
    s.map_or_else(|| "-".into(), str::to_string)
}

fn image(i: &ImageInfo) -> String {
    fields(&[
        ("digest", i.digest.clone()),
        ("names", i.names.join(", ")),
        ("size", format!("{} ({} bytes)", size(i.size), i.size)),
        ("format", format_name(i.format).into()),
        ("source", i.source.clone()),
        ("created", time(i.created)),
    ])
}

fn images(list: &[ImageInfo]) -> String {
    let mut t = Table::new(&[
        ("DIGEST", Left),
        ("NAMES", Left),
        ("SIZE", Right),
        ("FORMAT", Left),
        ("CREATED", Left),
    ]);
    for i in list {
        t.row(vec![
            short_digest(&i.digest),
            i.names.join(","),
            size(i.size),
            format_name(i.format).into(),
            time(i.created),
        ]);
    }
    t.render()
}

fn volume(v: &VolumeInfo) -> String {
    fields(&[
        ("name", v.name.clone()),
        ("kind", kind_name(v.kind).into()),
        ("base", or_dash(v.base.as_deref())),
        ("size", format!("{} ({} bytes)", size(v.size), v.size)),
        (
            "allocated",
            format!("{} ({} bytes)", size(v.allocated_bytes), v.allocated_bytes),
        ),
        ("state", state_name(v.state).into()),
        ("exported", yes_no(v.exported)),
        ("from pool", yes_no(v.from_pool)),
    ])
}

fn volumes(list: &[VolumeInfo]) -> String {
    let mut t = Table::new(&[
        ("NAME", Left),
        ("KIND", Left),
        ("SIZE", Right),
        ("ALLOCATED", Right),
        ("BASE", Left),
        ("STATE", Left),
        ("EXPORTED", Left),
    ]);
    for v in list {
        t.row(vec![
            v.name.clone(),
            kind_name(v.kind).into(),
            size(v.size),
            size(v.allocated_bytes),
            v.base.as_deref().map_or_else(|| "-".into(), short_digest),
            state_name(v.state).into(),
            yes_no(v.exported),
        ]);
    }
    t.render()
}

fn export(e: &ExportInfo) -> String {
    let s = &e.stats;
    fields(&[
        ("volume", e.volume.clone()),
        ("socket", e.socket.display().to_string()),
        ("queues", e.queues.to_string()),
        ("readonly", yes_no(e.readonly)),
        ("serial", or_dash(e.serial.as_deref())),
        ("connected", yes_no(e.connected)),
        ("reads", format!("{} ({})", s.reads, size(s.read_bytes))),
        ("writes", format!("{} ({})", s.writes, size(s.write_bytes))),
        ("errors", s.errors.to_string()),
    ])
}

fn exports(list: &[ExportInfo]) -> String {
    let mut t = Table::new(&[
        ("VOLUME", Left),
        ("SOCKET", Left),
        ("QUEUES", Right),
        ("MODE", Left),
        ("CONNECTED", Left),
        ("READS", Right),
        ("WRITES", Right),
        ("READ", Right),
        ("WRITTEN", Right),
        ("ERRORS", Right),
    ]);
    for e in list {
        let s = &e.stats;
        t.row(vec![
            e.volume.clone(),
            e.socket.display().to_string(),
            e.queues.to_string(),
            if e.readonly { "ro" } else { "rw" }.into(),
            yes_no(e.connected),
            s.reads.to_string(),
            s.writes.to_string(),
            size(s.read_bytes),
            size(s.write_bytes),
            s.errors.to_string(),
        ]);
    }
    t.render()
}

fn stats(s: &StatsResult) -> String {
    let mut t = Table::new(&[
        ("VOLUME", Left),
        ("READ/S", Right),
        ("WRITE/S", Right),
        ("READ B/S", Right),
        ("WRITE B/S", Right),
        ("P50 US", Right),
        ("P99 US", Right),
        ("ERRORS", Right),
    ]);
    let rate = |x: f64| size(x.max(0.0) as u64);
    let micros = |x: Option<u64>| x.map_or_else(|| "-".into(), |v| v.to_string());
    for v in &s.volumes {
        t.row(vec![
            v.volume.clone(),
            format!("{:.0}", v.read_iops),
            format!("{:.0}", v.write_iops),
            rate(v.read_bytes_per_sec),
            rate(v.write_bytes_per_sec),
            micros(v.latency_p50_us),
            micros(v.latency_p99_us),
            v.io.errors.to_string(),
        ]);
    }
    let mut failed = String::new();
    for v in &s.volumes {
        if let Some(why) = &v.flush_error {
            failed.push_str(&format!("{}: FLUSHES FAIL: {why}\n", v.volume));
        }
    }
    if !s.pool.images.is_empty() {
        let ready: u32 = s.pool.images.iter().map(|i| i.ready).sum();
        let wanted: u32 = s.pool.images.iter().map(|i| i.wanted).sum();
        failed.push_str(&format!(
            "\npool: {ready} ready copies of {wanted} wanted, {} evicted, {} free (reserve {})\n",
            s.pool.evictions,
            size(s.pool.free_bytes),
            size(s.pool.reserve_bytes)
        ));
    }
    let c = &s.cache;
    let budget = c.budget.map_or_else(
        || "(no budget)".to_string(),
        |b| format!("of {} budget", size(b)),
    );
    format!(
        "{}{failed}\ncache: {} used {budget}, {} images, {} free on its filesystem\n",
        t.render(),
        size(c.used_bytes),
        c.images,
        size(c.fs_free_bytes)
    )
}

/// One event as a line: its time, type and the other fields as key=value.
pub fn event(e: &Value) -> String {
    let Value::Object(obj) = e else {
        return format!("{e}\n");
    };
    let at = obj
        .get("at")
        .and_then(Value::as_u64)
        .map_or_else(String::new, time);
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or("?");
    let mut line = format!("{at} {kind}");
    for (k, v) in obj {
        if k == "at" || k == "type" {
            continue;
        }
        match v {
            Value::String(s) => line.push_str(&format!(" {k}={s}")),
            other => line.push_str(&format!(" {k}={other}")),
        }
    }
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn cache_line_with_and_without_budget() {
        let mut s = StatsResult::default();
        s.cache.used_bytes = 3 << 30;
        s.cache.images = 2;
        assert!(stats(&s).contains("cache: 3.0G used (no budget), 2 images, 0B free"));
        s.cache.budget = Some(10 << 30);
        assert!(stats(&s).contains("cache: 3.0G used of 10.0G budget, 2 images"));
    }

    #[test]
    fn event_line() {
        let e = json!({"type": "volume.created", "at": 0, "name": "vm1"});
        assert_eq!(event(&e), "1970-01-01 00:00:00Z volume.created name=vm1\n");
    }
}
