//! vdiskctl: the command-line client of vdiskd's control socket.
//!
//! The control socket arrives with the image cache and catalog; until then
//! this binary only knows where the socket would be and says so.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "vdiskctl", version, about = "Control a running vdiskd")]
struct Args {
    /// The control socket (also $VDISK_CONTROL).
    #[arg(long, env = "VDISK_CONTROL", default_value = vdisk::config::DEFAULT_CONTROL)]
    control: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// NOUN VERB ...: image, volume, export, migrate, pool, set, stats, watch.
    #[arg(trailing_var_arg = true)]
    command: Vec<String>,
}

/// Exit codes: 0 done, 1 the request failed, 2 a usage error (clap's own).
fn main() -> ExitCode {
    let args = Args::parse();
    if args.command.is_empty() {
        eprintln!("vdiskctl: give a command, e.g. `vdiskctl export list`; see --help");
        return ExitCode::from(2);
    }
    eprintln!(
        "vdiskctl: `{}` needs vdiskd's control socket ({}), which this version of vdiskd does not serve yet; \
         exports are configured with vdiskd --export or /etc/vdisk/vdiskd.toml",
        args.command.join(" "),
        args.control.display()
    );
    let _ = args.json;
    ExitCode::FAILURE
}
