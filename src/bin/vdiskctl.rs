//! vdiskctl: the command-line client of vdiskd's control socket.
//! Everything lives in `vdisk::control::cli`; exit codes: 0 done, 1 the
//! daemon returned an error, 2 a usage error, 3 the daemon cannot be reached.

fn main() -> std::process::ExitCode {
    vdisk::control::cli::main()
}
