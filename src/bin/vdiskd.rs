fn main() -> std::process::ExitCode {
    vdisk::daemon::main()
}
