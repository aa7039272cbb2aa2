//! Test-only failure injection at the block layer's `fdatasync` calls.
//!
//! A test marks a file (by device and inode, so tests running in parallel
//! do not see each other's faults) to fail its next N data syncs with EIO;
//! the engines and the overlay ask [`sync_fails`] before each sync. Outside
//! `cfg(test)` it is a constant `false` the compiler removes.

#[cfg(test)]
pub use imp::{fail_syncs, sync_fails};

#[cfg(not(test))]
#[inline(always)]
pub fn sync_fails(_file: &std::fs::File) -> bool {
    false
}

/// `fdatasync` of `file`, or the injected failure.
pub fn sync_data(file: &std::fs::File) -> std::io::Result<()> {
    if sync_fails(file) {
        return Err(std::io::Error::from_raw_os_error(libc::EIO));
    }
    file.sync_data()
}

#[cfg(test)]
mod imp {
    use std::collections::HashMap;
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;
    use std::sync::Mutex;

    static FAULTS: Mutex<Option<HashMap<(u64, u64), u32>>> = Mutex::new(None);

    fn key(file: &File) -> Option<(u64, u64)> {
        file.metadata().ok().map(|m| (m.dev(), m.ino()))
    }

    /// The next `n` data syncs of `file` (any descriptor of it) fail.
    pub fn fail_syncs(file: &File, n: u32) {
        let k = key(file).expect("stat the file to fail");
        FAULTS
            .lock()
            .unwrap()
            .get_or_insert_with(HashMap::new)
            .insert(k, n);
    }

    /// True (and one fault used up) when this sync of `file` must fail.
    pub fn sync_fails(file: &File) -> bool {
        let mut g = FAULTS.lock().unwrap();
        let Some(map) = g.as_mut() else {
            return false;
        };
        let Some(k) = key(file) else { return false };
        match map.get_mut(&k) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}
