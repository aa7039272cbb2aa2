//! The flush-error latch of one disk.
//!
//! After `fdatasync` fails, the kernel may already have dropped the dirty
//! pages it could not write and cleared the error: a second `fdatasync`
//! then succeeds although the data is gone. So the first failure is
//! latched, as QEMU does: from then on every flush of that disk fails at
//! once, until the export is restarted (the disk reopened), and the reason
//! is kept for `stats`, the log and an event.

use std::io;
use std::sync::{Arc, Mutex, OnceLock};

/// Called once, with the reason, when the latch trips.
pub type LatchObserver = Box<dyn Fn(&str) + Send + Sync>;

/// Shared by every engine of one disk.
pub struct FlushLatch {
    /// The disk, for messages.
    what: String,
    /// Set once: the errno of the failed flush and a sentence saying why.
    failed: OnceLock<(i32, String)>,
    observer: Mutex<Option<LatchObserver>>,
}

impl std::fmt::Debug for FlushLatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlushLatch")
            .field("failed", &self.failed.get())
            .finish_non_exhaustive()
    }
}

impl FlushLatch {
    /// The latch of the disk named `what` (its path) in messages.
    pub fn new(what: impl Into<String>) -> Arc<FlushLatch> {
        Arc::new(FlushLatch {
            what: what.into(),
            failed: OnceLock::new(),
            observer: Mutex::new(None),
        })
    }

    /// `Err` (the original errno, EIO if it had none) once a flush failed.
    pub fn check(&self) -> io::Result<()> {
        match self.failed.get() {
            None => Ok(()),
            Some((errno, _)) => Err(io::Error::from_raw_os_error(*errno)),
        }
    }

    /// Why flushes fail, once one did.
    pub fn reason(&self) -> Option<&str> {
        self.failed.get().map(|(_, why)| why.as_str())
    }

    /// Records a failed flush; the first one wins. Returns the error to
    /// hand back to the caller.
    pub fn trip(&self, err: io::Error) -> io::Error {
        let errno = err.raw_os_error().unwrap_or(libc::EIO);
        let why = format!(
            "flushing {} failed ({err}); every later flush fails until the export is restarted",
            self.what
        );
        if self.failed.set((errno, why.clone())).is_ok() {
            log::error!("{why}");
            if let Some(obs) = self
                .observer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                obs(&why);
            }
        }
        io::Error::from_raw_os_error(errno)
    }

    /// Passes the result of a flush through the latch: an error trips it,
    /// and once tripped every result is an error.
    pub fn pass<T>(&self, r: io::Result<T>) -> io::Result<T> {
        match r {
            Err(e) => Err(self.trip(e)),
            Ok(v) => self.check().map(|()| v),
        }
    }

    /// Who to tell when the latch trips (the service publishes an event).
    pub fn set_observer(&self, obs: LatchObserver) {
        *self.observer.lock().unwrap_or_else(|e| e.into_inner()) = Some(obs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn first_failure_sticks_and_is_told_once() {
        let l = FlushLatch::new("disk.img");
        let told = Arc::new(AtomicUsize::new(0));
        let t = told.clone();
        l.set_observer(Box::new(move |why| {
            assert!(why.contains("flushing disk.img failed"), "{why}");
            t.fetch_add(1, Ordering::SeqCst);
        }));
        assert!(l.check().is_ok());
        assert!(l.pass(Ok(())).is_ok());
        let e = l
            .pass::<()>(Err(io::Error::from_raw_os_error(libc::ENOSPC)))
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        // A later flush that "succeeds" is still a failure.
        assert_eq!(
            l.pass(Ok(())).unwrap_err().raw_os_error(),
            Some(libc::ENOSPC)
        );
        let _ = l.pass::<()>(Err(io::Error::from_raw_os_error(libc::EIO)));
        assert_eq!(l.check().unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        assert!(l
            .reason()
            .unwrap()
            .contains("until the export is restarted"));
        assert_eq!(told.load(Ordering::SeqCst), 1);
    }
}
