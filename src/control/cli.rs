//! vdiskctl: the command line, turned into one control call, and its
//! result printed as a table (or JSON with `--json`).
//!
//! Exit codes: 0 done, 1 the daemon returned an error, 2 a usage error,
//! 3 the daemon cannot be reached.

mod bar;
mod qmp;
mod render;
mod table;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use self::bar::Bar;
use super::client::{Client, ClientError};
use super::protocol::{
    Call, ExportRef, ExportStart, ImageFetch, ImageImport, ImageRef, NoParams, PoolRef, PoolSet,
    Progress, Response, Size, VolumeCreate, VolumeExportRaw, VolumeRef, VolumeResize,
};
use crate::config::DEFAULT_CONTROL;

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_UNREACHABLE: u8 = 3;

#[derive(Debug, Parser)]
#[command(name = "vdiskctl", version, about = "Control a running vdiskd")]
pub struct Args {
    /// The control socket.
    #[arg(long, global = true, env = "VDISK_CONTROL", default_value = DEFAULT_CONTROL)]
    pub control: PathBuf,
    /// Print the result as JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub noun: Noun,
}

#[derive(Debug, Subcommand)]
pub enum Noun {
    /// Master images in the cache.
    Image {
        #[command(subcommand)]
        verb: ImageVerb,
    },
    /// VM disks: overlays over an image, full copies, empty disks.
    Volume {
        #[command(subcommand)]
        verb: VolumeVerb,
    },
    /// vhost-user-blk sockets serving volumes.
    Export {
        #[command(subcommand)]
        verb: ExportVerb,
    },
    /// Ready full copies of images, made before they are asked for.
    Pool {
        #[command(subcommand)]
        verb: PoolVerb,
    },
    /// Per-volume I/O figures and cache usage.
    Stats,
    /// Print events as they happen, until interrupted.
    Watch,
    /// The daemon's version and protocol.
    Version,
}

#[derive(Debug, Subcommand)]
pub enum ImageVerb {
    /// Import a raw or qcow2 file from this host.
    Import {
        file: PathBuf,
        #[arg(long)]
        name: Option<String>,
    },
    /// Download an image (http, https, file) and check its digest.
    Fetch {
        url: String,
        /// The image's expected sha256, 64 hex digits.
        #[arg(long)]
        sha256: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Every cached image.
    List,
    /// One image, by name or digest.
    Show { image: String },
    /// Remove an image no volume depends on.
    Remove { image: String },
}

#[derive(Debug, Subcommand)]
pub enum VolumeVerb {
    /// An overlay over IMAGE, a full copy (--full), or an empty disk (--size only).
    Create {
        name: String,
        /// The base image, by name or digest.
        #[arg(long)]
        image: Option<String>,
        /// Bytes, or with a unit: 512M, 20G (default: the image's size).
        #[arg(long, value_parser = size_arg)]
        size: Option<u64>,
        /// An independent full copy of the image instead of an overlay.
        #[arg(long)]
        full: bool,
    },
    /// Every volume.
    List,
    /// One volume, with its allocated bytes and base.
    Show { name: String },
    /// Delete a volume that is not exported.
    Delete { name: String },
    /// Grow a volume, exported or not (volumes never shrink). An exported
    /// volume's device reports the new size at once; its guest sees it once
    /// the VMM re-reads the device config: with --qmp and --qdev, vdiskctl
    /// asks QEMU to (QMP device-sync-config, QEMU 9.2 and later).
    Resize {
        name: String,
        #[arg(value_parser = size_arg)]
        size: u64,
        /// The VM's QMP socket.
        #[arg(long, value_name = "PATH", requires = "qdev")]
        qmp: Option<PathBuf>,
        /// The vhost-user-blk device's id in that VM (-device ...,id=ID).
        #[arg(long, value_name = "ID", requires = "qmp")]
        qdev: Option<String>,
    },
    /// Write the volume's content, flattened, to a sparse raw file.
    ExportRaw { name: String, file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum PoolVerb {
    /// Keep ready full copies of IMAGE: `volume create --full` then takes
    /// one instead of copying.
    Set {
        image: String,
        /// Importance, 1 (least) to 10: how many copies (see `pool list`)
        /// and which go first when space runs short.
        #[arg(long)]
        priority: u8,
        /// Ready copies to keep (default: by the priority).
        #[arg(long)]
        copies: Option<u32>,
    },
    /// Stop keeping copies of IMAGE and delete the ready ones.
    Unset { image: String },
    /// One image's copies: wanted, ready, being made, hits and misses.
    Show { image: String },
    /// Every image with ready copies, the rule and the space.
    List,
}

#[derive(Debug, Subcommand)]
pub enum ExportVerb {
    /// Serve a volume on a vhost-user-blk socket.
    Start {
        volume: String,
        /// The vhost-user socket to create (default: chosen by vdiskd).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Virtqueues, 1 to 16.
        #[arg(long)]
        queues: Option<u16>,
        /// Refuse the guest's writes.
        #[arg(long)]
        readonly: bool,
        /// The disk's serial as the guest sees it, up to 20 bytes.
        #[arg(long)]
        serial: Option<String>,
    },
    /// Stop serving a volume.
    Stop { volume: String },
    /// Every export, with its connection and I/O counters.
    List,
}

fn size_arg(s: &str) -> Result<u64, String> {
    crate::config::parse_size(s)
        .ok_or_else(|| format!("`{s}` is not a size such as 4096, 512M or 20G"))
}

/// Paths go to the daemon, whose working directory is not ours.
fn absolute(p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))
}

impl Noun {
    pub fn to_call(&self) -> Result<Call, String> {
        let none = NoParams {};
        Ok(match self {
            Noun::Image { verb } => match verb {
                ImageVerb::Import { file, name } => Call::ImageImport(ImageImport {
                    file: absolute(file)?,
                    name: name.clone(),
                }),
                ImageVerb::Fetch { url, sha256, name } => Call::ImageFetch(ImageFetch {
                    url: url.clone(),
                    sha256: sha256.clone(),
                    name: name.clone(),
                }),
                ImageVerb::List => Call::ImageList(none),
                ImageVerb::Show { image } => Call::ImageShow(ImageRef {
                    image: image.clone(),
                }),
                ImageVerb::Remove { image } => Call::ImageRemove(ImageRef {
                    image: image.clone(),
                }),
            },
            Noun::Volume { verb } => match verb {
                VolumeVerb::Create {
                    name,
                    image,
                    size,
                    full,
                } => Call::VolumeCreate(VolumeCreate {
                    name: name.clone(),
                    image: image.clone(),
                    size: size.map(Size),
                    full: *full,
                }),
                VolumeVerb::List => Call::VolumeList(none),
                VolumeVerb::Show { name } => Call::VolumeShow(VolumeRef { name: name.clone() }),
                VolumeVerb::Delete { name } => Call::VolumeDelete(VolumeRef { name: name.clone() }),
                VolumeVerb::Resize { name, size, .. } => Call::VolumeResize(VolumeResize {
                    name: name.clone(),
                    size: Size(*size),
                }),
                VolumeVerb::ExportRaw { name, file } => Call::VolumeExportRaw(VolumeExportRaw {
                    name: name.clone(),
                    file: absolute(file)?,
                }),
            },
            Noun::Export { verb } => match verb {
                ExportVerb::Start {
                    volume,
                    socket,
                    queues,
                    readonly,
                    serial,
                } => Call::ExportStart(ExportStart {
                    volume: volume.clone(),
                    socket: socket.as_deref().map(absolute).transpose()?,
                    queues: *queues,
                    readonly: *readonly,
                    serial: serial.clone(),
                }),
                ExportVerb::Stop { volume } => Call::ExportStop(ExportRef {
                    volume: volume.clone(),
                }),
                ExportVerb::List => Call::ExportList(none),
            },
            Noun::Pool { verb } => match verb {
                PoolVerb::Set {
                    image,
                    priority,
                    copies,
                } => Call::PoolSet(PoolSet {
                    image: image.clone(),
                    priority: *priority,
                    copies: *copies,
                }),
                PoolVerb::Unset { image } => Call::PoolUnset(PoolRef {
                    image: image.clone(),
                }),
                PoolVerb::Show { image } => Call::PoolShow(PoolRef {
                    image: image.clone(),
                }),
                PoolVerb::List => Call::PoolList(none),
            },
            Noun::Stats => Call::Stats(none),
            Noun::Watch => Call::Watch(none),
            Noun::Version => Call::Version(none),
        })
    }
}

/// vdiskctl's `main`.
pub fn main() -> ExitCode {
    ExitCode::from(run(Args::parse()))
}

pub fn run(args: Args) -> u8 {
    let call = match args.noun.to_call() {
        Ok(call) => call,
        Err(e) => {
            eprintln!("vdiskctl: {e}");
            return EXIT_USAGE;
        }
    };
    let mut client = match Client::connect(&args.control) {
        Ok(c) => c,
        Err(e) => return failed(&e),
    };
    let mut bar = match &call {
        Call::ImageFetch(p) => Bar::on_terminal(format!("fetching {}", p.url)),
        Call::VolumeCreate(p) if p.full => Bar::on_terminal(format!("copying into {}", p.name)),
        _ => None,
    };
    let result = match bar.as_mut() {
        Some(bar) => {
            let mut update = |p: Progress| bar.update(p);
            client.call(&call, Some(&mut update))
        }
        None => client.call(&call, None),
    };
    if let Some(bar) = bar.as_mut() {
        bar.finish();
    }
    let result = match result {
        Ok(r) => r,
        Err(e) => return failed(&e),
    };
    if matches!(call, Call::Watch(_)) {
        return watch(&mut client, args.json);
    }
    // After a live grow, ask the VMM to show the guest the new size.
    let mut note = String::new();
    if let Noun::Volume {
        verb: VolumeVerb::Resize { qmp, qdev, .. },
    } = &args.noun
    {
        let exported = result.get("exported").and_then(serde_json::Value::as_bool) == Some(true);
        match (qmp, qdev) {
            (Some(qmp), Some(qdev)) => {
                if let Err(e) = qmp::device_sync_config(qmp, qdev) {
                    eprintln!("vdiskctl: the volume grew, but telling the VM failed: {e}");
                    return EXIT_FAILED;
                }
                note =
                    format!("the VM re-read device {qdev}'s config: the guest sees the new size\n");
            }
            _ if exported => {
                note = "the export reports the new size now; the guest sees it once its VMM \
                        re-reads the device config (QEMU: QMP device-sync-config, or \
                        vdiskctl volume resize ... --qmp SOCKET --qdev ID)\n"
                    .to_string();
            }
            _ => {}
        }
    }
    let text = if args.json {
        format!("{:#}\n", result)
    } else {
        match Response::decode(&call, result) {
            Ok(r) => render::response(&call, &r),
            Err(e) => {
                eprintln!("vdiskctl: unexpected result for {}: {e}", call.method());
                return EXIT_FAILED;
            }
        }
    };
    print(&text);
    if !note.is_empty() && !args.json {
        print(&note);
    }
    0
}

fn watch(client: &mut Client, json: bool) -> u8 {
    loop {
        match client.next_event() {
            Ok(Some(event)) => {
                let text = if json {
                    format!("{event}\n")
                } else {
                    render::event(&event)
                };
                if !print(&text) {
                    return 0;
                }
            }
            Ok(None) => {
                eprintln!("vdiskctl: vdiskd closed the event stream");
                return EXIT_UNREACHABLE;
            }
            Err(e) => return failed(&e),
        }
    }
}

/// Prints to stdout; false when stdout is gone (`vdiskctl watch | head`).
fn print(text: &str) -> bool {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}

fn failed(e: &ClientError) -> u8 {
    match e {
        ClientError::Api { code, message } => {
            eprintln!("error: {code}: {message}");
            EXIT_FAILED
        }
        ClientError::Protocol(_) => {
            eprintln!("vdiskctl: {e}");
            EXIT_FAILED
        }
        ClientError::Connect { source, .. } => {
            eprintln!("vdiskctl: {e}: {source} (is vdiskd running? --control or VDISK_CONTROL name the socket)");
            EXIT_UNREACHABLE
        }
        ClientError::Io { source, .. } => {
            eprintln!("vdiskctl: {e}: {source}");
            EXIT_UNREACHABLE
        }
        ClientError::Closed { .. } => {
            eprintln!("vdiskctl: {e}");
            EXIT_UNREACHABLE
        }
    }
}
