//! The daemon's configuration: the TOML file and `--export SPEC` flags.
//!
//! An export SPEC is comma-separated `key=value`, as qemu-storage-daemon
//! writes its options: `socket=PATH` and one of `file=PATH`, `null=SIZE`
//! or `volume=NAME`, plus `queues=N`, `readonly=on|off`, `serial=TEXT`,
//! `block-size=512|4096`, `direct=on|off` and `engine=io-uring|sync`.
//! The TOML file's `[[export]]` tables take the same keys.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::block::{DiskSource, EngineKind};
use crate::vhost::config::ID_BYTES;

/// Queues per export when none is given: one per core is the usual choice
/// for a guest, two keeps a small host responsive.
pub const DEFAULT_QUEUES: u16 = 1;
/// virtio-blk allows more, but one worker thread per queue on a host
/// running many VMs makes 16 a sane ceiling.
pub const MAX_QUEUES: u16 = 16;
pub const DEFAULT_CONFIG: &str = "/etc/vdisk/vdiskd.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vdisk";
pub const DEFAULT_CONTROL: &str = "/run/vdisk/control.sock";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("export spec: `{0}` is not key=value")]
    NotKeyValue(String),
    #[error("export spec: unknown key `{0}`")]
    UnknownKey(String),
    #[error("export spec: `{key}` given twice")]
    Duplicate { key: String },
    #[error("export spec: bad value `{value}` for `{key}`: {why}")]
    BadValue {
        key: String,
        value: String,
        why: String,
    },
    #[error("export spec: `socket=` is required")]
    NoSocket,
    #[error("export spec: give exactly one of `file=`, `null=` or `volume=`")]
    NoSource,
    #[error("cannot read config file {path}: {why}")]
    File { path: String, why: String },
}

/// Where an export's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExportSource {
    Disk(DiskSource),
    /// A catalog volume (served once the catalog exists).
    Volume(String),
}

/// One vhost-user-blk export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSpec {
    pub socket: PathBuf,
    pub source: ExportSource,
    pub queues: u16,
    pub readonly: bool,
    pub serial: Option<String>,
    pub block_size: u32,
    pub direct: bool,
    pub engine: Option<EngineKind>,
}

impl ExportSpec {
    /// The GET_ID serial: the one given, or the socket's file stem, cut to
    /// 20 bytes.
    pub fn serial_bytes(&self) -> Vec<u8> {
        let s = match &self.serial {
            Some(s) => s.clone(),
            None => self
                .socket
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let mut b = s.into_bytes();
        b.truncate(ID_BYTES);
        b
    }

    fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, String)>,
    ) -> Result<Self, ConfigError> {
        let mut socket = None;
        let mut sources = Vec::new();
        let mut spec = ExportSpec {
            socket: PathBuf::new(),
            source: ExportSource::Volume(String::new()),
            queues: DEFAULT_QUEUES,
            readonly: false,
            serial: None,
            block_size: 512,
            direct: false,
            engine: None,
        };
        let mut seen: Vec<&str> = Vec::new();
        for (key, value) in pairs {
            if seen.contains(&key) {
                return Err(ConfigError::Duplicate { key: key.into() });
            }
            seen.push(key);
            let bad = |why: &str| ConfigError::BadValue {
                key: key.into(),
                value: value.clone(),
                why: why.into(),
            };
            match key {
                "socket" if !value.is_empty() => socket = Some(PathBuf::from(&value)),
                "socket" => return Err(bad("empty path")),
                "file" if !value.is_empty() => {
                    sources.push(ExportSource::Disk(DiskSource::File(value.into())))
                }
                "file" => return Err(bad("empty path")),
                "null" => {
                    let size = parse_size(&value)
                        .ok_or_else(|| bad("expected a size such as 1G, 512M or 4096"))?;
                    if size == 0 || size % 512 != 0 {
                        return Err(bad("size must be a non-zero multiple of 512"));
                    }
                    sources.push(ExportSource::Disk(DiskSource::Null(size)));
                }
                "volume" => {
                    check_name(&value).map_err(&bad)?;
                    sources.push(ExportSource::Volume(value.clone()));
                }
                "queues" => {
                    spec.queues = value
                        .parse()
                        .ok()
                        .filter(|q| (1..=MAX_QUEUES).contains(q))
                        .ok_or_else(|| bad("expected 1 to 16"))?
                }
                "readonly" => {
                    spec.readonly = parse_bool(&value).ok_or_else(|| bad("expected on or off"))?
                }
                "direct" => {
                    spec.direct = parse_bool(&value).ok_or_else(|| bad("expected on or off"))?
                }
                "serial" => {
                    if value.len() > ID_BYTES {
                        return Err(bad("at most 20 bytes"));
                    }
                    if value.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
                        return Err(bad("printable ASCII only"));
                    }
                    spec.serial = Some(value.clone());
                }
                "block-size" => {
                    spec.block_size = match value.as_str() {
                        "512" => 512,
                        "4096" => 4096,
                        _ => return Err(bad("expected 512 or 4096")),
                    }
                }
                "engine" => {
                    spec.engine = Some(match value.as_str() {
                        "io-uring" | "io_uring" => EngineKind::IoUring,
                        "sync" => EngineKind::Sync,
                        _ => return Err(bad("expected io-uring or sync")),
                    })
                }
                other => return Err(ConfigError::UnknownKey(other.into())),
            }
        }
        spec.socket = socket.ok_or(ConfigError::NoSocket)?;
        if sources.len() != 1 {
            return Err(ConfigError::NoSource);
        }
        spec.source = sources.pop().expect("one source");
        if let ExportSource::Disk(DiskSource::Null(size)) = spec.source {
            if size % u64::from(spec.block_size) != 0 {
                return Err(ConfigError::BadValue {
                    key: "null".into(),
                    value: size.to_string(),
                    why: "size must be a multiple of the block size".into(),
                });
            }
        }
        Ok(spec)
    }
}

impl FromStr for ExportSpec {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut pairs = Vec::new();
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| ConfigError::NotKeyValue(part.into()))?;
            pairs.push((k.trim(), v.to_string()));
        }
        ExportSpec::from_pairs(pairs)
    }
}

/// A volume or image name: no path separators, no dot-dot, no control
/// characters.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 128 {
        return Err("names are 1 to 128 characters");
    }
    if name.contains('/') || name.contains("..") || name.starts_with('.') {
        return Err("names may not contain `/` or `..` or start with `.`");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c))
    {
        return Err("names use letters, digits and - _ . : @");
    }
    Ok(())
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// `4096`, `512K`, `64M`, `1G`, `2T` (binary units).
pub fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, mult) = match v.char_indices().last()? {
        (i, 'K' | 'k') => (&v[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&v[..i], 1 << 20),
        (i, 'G' | 'g') => (&v[..i], 1 << 30),
        (i, 'T' | 't') => (&v[..i], 1 << 40),
        _ => (v, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// The TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub state_dir: Option<PathBuf>,
    pub control: Option<PathBuf>,
    /// Log filter, as in VDISK_LOG (`info`, `debug`, `vdisk=trace`...).
    pub log: Option<String>,
    /// Serve Prometheus metrics over http on this address
    /// (`"127.0.0.1:9337"`); off when absent.
    pub metrics: Option<std::net::SocketAddr>,
    /// Ready copies: `reserve` (a size or a percentage of the file system,
    /// default 10%) and `rate` (bytes per second the filler copies at,
    /// default unlimited).
    pub pool: Option<PoolSection>,
    #[serde(default)]
    pub export: Vec<toml::Table>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PoolSection {
    pub reserve: Option<String>,
    pub rate: Option<String>,
    /// `"1-3:0, 4-6:1, 7-8:2, 9-10:4"` (the default).
    pub copies_by_priority: Option<String>,
}

impl PoolSection {
    pub fn settings(&self) -> Result<crate::pool::PoolConfig, ConfigError> {
        let mut cfg = crate::pool::PoolConfig::default();
        let bad = |key: &str, value: &str, why: String| ConfigError::BadValue {
            key: format!("pool.{key}"),
            value: value.to_string(),
            why,
        };
        if let Some(r) = &self.reserve {
            cfg.reserve =
                crate::pool::Reserve::parse(r).map_err(|e| bad("reserve", r, e.to_string()))?;
        }
        if let Some(r) = &self.copies_by_priority {
            cfg.rule = crate::pool::CopiesRule::parse(r)
                .map_err(|e| bad("copies-by-priority", r, e.to_string()))?;
        }
        if let Some(r) = &self.rate {
            cfg.rate = Some(
                parse_size(r)
                    .filter(|v| *v > 0)
                    .ok_or_else(|| bad("rate", r, "bytes per second, such as 200M".into()))?,
            );
        }
        Ok(cfg)
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |why: String| ConfigError::File {
            path: path.display().to_string(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        toml::from_str(&text).map_err(|e| err(e.to_string()))
    }

    /// The `[[export]]` tables as specs.
    pub fn exports(&self) -> Result<Vec<ExportSpec>, ConfigError> {
        self.export
            .iter()
            .map(|t| {
                let pairs = t.iter().map(|(k, v)| {
                    let v = match v {
                        toml::Value::String(s) => s.clone(),
                        toml::Value::Boolean(b) => if *b { "on" } else { "off" }.to_string(),
                        other => other.to_string(),
                    };
                    (k.as_str(), v)
                });
                ExportSpec::from_pairs(pairs)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_spec() {
        let s: ExportSpec =
            "socket=/run/a.sock,file=/d.img,queues=4,readonly=on,serial=abc,block-size=4096,direct=on,engine=sync"
                .parse()
                .unwrap();
        assert_eq!(s.socket, PathBuf::from("/run/a.sock"));
        assert_eq!(
            s.source,
            ExportSource::Disk(DiskSource::File("/d.img".into()))
        );
        assert_eq!(
            (s.queues, s.readonly, s.block_size, s.direct),
            (4, true, 4096, true)
        );
        assert_eq!(s.serial_bytes(), b"abc");
        assert_eq!(s.engine, Some(EngineKind::Sync));
    }

    #[test]
    fn defaults_and_null_sizes() {
        let s: ExportSpec = "socket=/run/vm-7.sock,null=1G".parse().unwrap();
        assert_eq!(s.source, ExportSource::Disk(DiskSource::Null(1 << 30)));
        assert_eq!(
            (s.queues, s.readonly, s.block_size, s.direct),
            (1, false, 512, false)
        );
        assert_eq!(s.serial_bytes(), b"vm-7");
    }

    #[test]
    fn refuses_bad_specs() {
        let bad = [
            ("file=/x", ConfigError::NoSocket),
            ("socket=/s", ConfigError::NoSource),
            ("socket=/s,file=/x,null=1G", ConfigError::NoSource),
            (
                "socket=/s,file=/x,bogus=1",
                ConfigError::UnknownKey("bogus".into()),
            ),
            (
                "socket=/s,file=/x,file=/y",
                ConfigError::Duplicate { key: "file".into() },
            ),
            ("socket=/s,file", ConfigError::NotKeyValue("file".into())),
        ];
        for (spec, want) in bad {
            assert_eq!(spec.parse::<ExportSpec>().unwrap_err(), want, "{spec}");
        }
        for spec in [
            "socket=/s,file=/x,queues=0",
            "socket=/s,file=/x,queues=17",
            "socket=/s,file=/x,block-size=1024",
            "socket=/s,file=/x,readonly=maybe",
            "socket=/s,file=/x,serial=123456789012345678901",
            "socket=/s,null=1000",
            "socket=/s,null=0",
            "socket=/s,null=1M,block-size=4096,queues=x",
            "socket=/s,volume=../etc",
            "socket=/s,volume=a/b",
        ] {
            assert!(
                matches!(
                    spec.parse::<ExportSpec>(),
                    Err(ConfigError::BadValue { .. })
                ),
                "{spec}"
            );
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("2t"), Some(2 << 40));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn toml_exports_take_the_same_keys() {
        let cfg: FileConfig = toml::from_str(
            r#"
            log = "debug"
            state-dir = "/tmp/s"
            [[export]]
            socket = "/run/vdisk/a.sock"
            file = "/a.img"
            queues = 2
            readonly = true
            "#,
        )
        .unwrap();
        let e = cfg.exports().unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].queues, e[0].readonly), (2, true));
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
    }
}
