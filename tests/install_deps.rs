//! scripts/install-deps.sh as a fresh machine and a ready one see it: the
//! script runs for real, with PATH shims standing in for `dpkg-query` (which
//! packages are installed) and `apt-get` (which records its arguments), and
//! with apt's configuration in a temporary directory.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install-deps.sh");

/// A sample of Debian 12's own deb822 source file, as a cloud image has it.
const DEBIAN_SOURCES: &str = "\
Types: deb deb-src
URIs: mirror+file:///etc/apt/mirrors/debian.list
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb deb-src
URIs: mirror+file:///etc/apt/mirrors/debian-security.list
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

const BASE: &[&str] = &[
    "fio",
    "busybox-static",
    "cpio",
    "linux-image-amd64",
    "kmod",
    "gzip",
    "systemd",
    "util-linux",
];
const QEMU: &[&str] = &["qemu-system-x86", "qemu-utils"];

enum Dpkg {
    /// dpkg has never heard of any package: `dpkg-query -W` exits 1.
    Fresh,
    /// Every package is installed, QEMU from backports.
    AllPresent,
}

struct Machine {
    dir: tempfile::TempDir,
}

impl Machine {
    fn new(dpkg: Dpkg, apt_get_fails: bool) -> Machine {
        let dir = tempfile::tempdir().unwrap();
        let m = Machine { dir };
        fs::create_dir_all(m.p("bin")).unwrap();
        fs::create_dir_all(m.p("apt/sources.list.d")).unwrap();
        fs::write(m.p("apt/sources.list.d/debian.sources"), DEBIAN_SOURCES).unwrap();
        fs::write(
            m.p("os-release"),
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_CODENAME=bookworm\nID=debian\n",
        )
        .unwrap();
        let dpkg_query = match dpkg {
            Dpkg::Fresh => "#!/bin/sh\n# the last argument is the package\nfor p; do :; done\necho \"dpkg-query: no packages found matching $p\" >&2\nexit 1\n".to_string(),
            Dpkg::AllPresent => "#!/bin/sh\nfor p; do :; done\ncase $p in qemu-*) echo \"installed 1:10.0.2+ds-2~bpo12+1\";; *) echo \"installed 1.0\";; esac\n".to_string(),
        };
        m.shim("dpkg-query", &dpkg_query);
        let log = m.p("apt-get.log");
        let status = if apt_get_fails { 100 } else { 0 };
        m.shim(
            "apt-get",
            &format!(
                "#!/bin/sh\necho \"$*\" >>'{}'\nexit {status}\n",
                log.display()
            ),
        );
        m
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn shim(&self, name: &str, body: &str) {
        let path = self.p(&format!("bin/{name}"));
        fs::write(&path, body).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn run(&self) -> Output {
        let path = format!(
            "{}:{}",
            self.p("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Command::new("bash")
            .arg(SCRIPT)
            .env("PATH", path)
            .env("VDISK_APT_DIR", self.p("apt"))
            .env("VDISK_OS_RELEASE", self.p("os-release"))
            .stdin(Stdio::null())
            .output()
            .expect("run install-deps.sh")
    }

    fn apt_calls(&self) -> Vec<String> {
        match fs::read_to_string(self.p("apt-get.log")) {
            Ok(s) => s.lines().map(str::to_string).collect(),
            Err(_) => Vec::new(),
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

fn skip_unless_root() -> bool {
    // SAFETY: getuid(2) has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid != 0 {
        eprintln!("skipped: install-deps.sh re-executes itself with sudo when not root");
        return true;
    }
    false
}

#[test]
fn fresh_machine_adds_backports_and_installs_everything() {
    if skip_unless_root() {
        return;
    }
    let m = Machine::new(Dpkg::Fresh, false);
    let out = m.run();
    assert!(
        out.status.success(),
        "install-deps.sh failed on a fresh machine: {}\n{}",
        out.status,
        stderr(&out)
    );

    let backports = fs::read_to_string(m.p("apt/sources.list.d/backports.sources"))
        .expect("backports.sources written");
    assert!(
        backports.contains("Suites: bookworm-backports\n"),
        "{backports}"
    );
    assert!(
        backports.contains("URIs: mirror+file:///etc/apt/mirrors/debian.list\n"),
        "the main stanza is the one copied: {backports}"
    );
    assert!(
        !backports.contains("debian-security"),
        "only one stanza is copied: {backports}"
    );
    assert!(backports.contains("Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"));

    let calls = m.apt_calls();
    assert_eq!(calls.len(), 3, "apt-get calls: {calls:?}");
    assert_eq!(words(&calls[0]), ["update", "-q"]);
    let base = words(&calls[1]);
    assert_eq!(
        &base[..4],
        ["install", "-y", "-q", "--no-install-recommends"]
    );
    assert_eq!(&base[4..], BASE, "base packages: {calls:?}");
    let qemu = words(&calls[2]);
    assert_eq!(
        &qemu[..6],
        [
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-t",
            "bookworm-backports"
        ]
    );
    assert_eq!(&qemu[6..], QEMU, "QEMU packages: {calls:?}");
}

#[test]
fn ready_machine_installs_nothing() {
    if skip_unless_root() {
        return;
    }
    let m = Machine::new(Dpkg::AllPresent, false);
    let out = m.run();
    assert!(out.status.success(), "{}\n{}", out.status, stderr(&out));
    assert!(m.apt_calls().is_empty(), "apt-get ran: {:?}", m.apt_calls());
    assert!(!m.p("apt/sources.list.d/backports.sources").exists());
    assert!(
        stderr(&out).contains("all packages present"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn backports_already_configured_is_not_added_twice() {
    if skip_unless_root() {
        return;
    }
    let m = Machine::new(Dpkg::Fresh, false);
    fs::write(
        m.p("apt/sources.list.d/mine.list"),
        "deb http://example.invalid/debian bookworm-backports main\n",
    )
    .unwrap();
    let out = m.run();
    assert!(out.status.success(), "{}\n{}", out.status, stderr(&out));
    assert!(!m.p("apt/sources.list.d/backports.sources").exists());
    assert_eq!(m.apt_calls().len(), 3);
}

/// The last line of stderr says what is missing and what to do.
fn last_line(o: &Output) -> String {
    stderr(o).lines().last().unwrap_or("").to_string()
}

#[test]
fn failed_apt_get_says_what_is_missing() {
    if skip_unless_root() {
        return;
    }
    let m = Machine::new(Dpkg::Fresh, true);
    let out = m.run();
    assert!(!out.status.success());
    let line = last_line(&out);
    assert!(
        line.starts_with("install-deps: apt-get update failed"),
        "{line}"
    );
    assert!(
        line.contains("qemu-system-x86") && line.contains("fio"),
        "{line}"
    );
    assert!(line.contains("run again"), "{line}");
}

#[test]
fn no_source_to_copy_says_what_to_do() {
    if skip_unless_root() {
        return;
    }
    let m = Machine::new(Dpkg::Fresh, false);
    fs::remove_file(m.p("apt/sources.list.d/debian.sources")).unwrap();
    let out = m.run();
    assert!(!out.status.success());
    let line = last_line(&out);
    assert!(
        line.contains("no Debian apt source") && line.contains("bookworm-backports"),
        "{line}"
    );
    assert!(m.apt_calls().is_empty(), "{:?}", m.apt_calls());
    assert_no_tmp(&m.p("apt/sources.list.d"));
}

#[test]
fn source_without_bookworm_stanza_says_what_to_do() {
    if skip_unless_root() {
        return;
    }
    let m = Machine::new(Dpkg::Fresh, false);
    fs::write(
        m.p("apt/sources.list.d/debian.sources"),
        "Types: deb\nURIs: mirror+file:///x\nSuites: trixie\nComponents: main\n",
    )
    .unwrap();
    let out = m.run();
    assert!(!out.status.success());
    let line = last_line(&out);
    assert!(line.contains("found no bookworm stanza"), "{line}");
    assert_no_tmp(&m.p("apt/sources.list.d"));
}

fn assert_no_tmp(dir: &Path) {
    for e in fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name();
        assert!(
            !name.to_string_lossy().ends_with(".tmp"),
            "left behind {name:?}"
        );
    }
}
