//! Output files, written atomically: the bytes go to a temp file in the target's folder, renamed
//! into place only once complete, so a failed or interrupted command never leaves a partial
//! output. While a temp file exists its path is registered, and the handler the binaries install
//! with [`remove_temp_files_on_signal`] deletes every registered temp file on SIGINT, SIGTERM or
//! SIGHUP before the process dies of the signal (Unix; elsewhere an interrupted write can leave
//! a temp file behind, never a partial output).

use crate::error::{Error, Result};
use std::fs::File;
use std::path::{Path, PathBuf};

/// An output file being written: a registered temp file next to `path`, renamed to it by
/// [`Pending::commit`]; dropped without a commit, the temp file is removed.
pub struct Pending {
    path: PathBuf,
    /// `None` once committed.
    tmp: Option<tempfile::NamedTempFile>,
    slot: Option<registry::Slot>,
}

impl Pending {
    /// Create the temp file now, in `path`'s folder (`.NAME.XXXXXX.tmp`): a command that writes
    /// its output after a long computation creates it first, so an unwritable folder is an error
    /// before the work, and an interrupt at any time finds a temp file to remove.
    pub fn create(path: &Path) -> Result<Pending> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        let mut slot = None;
        // each candidate name is registered before the file is created (O_EXCL), so a signal
        // never finds the temp file unregistered
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .make_in(dir, |candidate| {
                if let Some(s) = slot.take() {
                    registry::unregister(s);
                }
                slot = registry::register(candidate);
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(candidate)
            });
        let tmp = match tmp {
            Ok(t) => t,
            Err(e) => {
                if let Some(s) = slot {
                    registry::unregister(s);
                }
                return Err(Error::io(dir, e));
            }
        };
        Ok(Pending {
            path: path.to_path_buf(),
            tmp: Some(tmp),
            slot,
        })
    }

    fn tmp(&self) -> &tempfile::NamedTempFile {
        self.tmp.as_ref().expect("present until committed")
    }

    /// The temp file, to write the output into.
    pub fn file(&mut self) -> &mut File {
        self.tmp.as_mut().expect("present until committed").as_file_mut()
    }

    /// The temp file's path.
    pub fn temp_path(&self) -> &Path {
        self.tmp().path()
    }

    /// Rename the temp file to the output path.
    pub fn commit(mut self) -> Result<()> {
        let tmp = self.tmp.take().expect("present until committed");
        tmp.persist(&self.path)
            .map(drop)
            .map_err(|e| Error::io(&self.path, e.error))
    }
}

impl Drop for Pending {
    /// Unregisters the temp path after the rename (commit) or the removal (`tmp`'s own drop).
    fn drop(&mut self) {
        drop(self.tmp.take());
        if let Some(s) = self.slot.take() {
            registry::unregister(s);
        }
    }
}

/// Write `bytes` to `path` atomically (see [`Pending`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut out = Pending::create(path)?;
    out.file().write_all(bytes).map_err(|e| Error::io(path, e))?;
    out.commit()
}

/// Install the handler that removes registered temp files on SIGINT, SIGTERM and SIGHUP, then
/// lets the signal end the process as it would have (exit status: killed by that signal).
/// Call once at startup; other platforms: no-op.
pub fn remove_temp_files_on_signal() {
    registry::install();
}

#[cfg(unix)]
mod registry {
    //! Temp paths as C strings in a fixed array of atomic pointers: the signal handler may only
    //! call async-signal-safe functions (`unlink`, `signal`, `raise`, `_exit`) and read atomics.
    use std::ffi::{c_char, CString};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;
    use std::ptr::null_mut;
    use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering::SeqCst};

    const SLOTS: usize = 16;
    static PATHS: [AtomicPtr<c_char>; SLOTS] = [const { AtomicPtr::new(null_mut()) }; SLOTS];
    /// Handlers running: while one is, unregistered strings are leaked rather than freed
    /// (the handler may be reading them).
    static IN_HANDLER: AtomicUsize = AtomicUsize::new(0);

    pub struct Slot(usize);

    /// Register `path`; `None` when every slot is taken (more than 16 outputs being written at
    /// once) or the path holds a NUL byte: the file is then still written atomically, only not
    /// removed on a signal.
    pub fn register(path: &Path) -> Option<Slot> {
        let raw = CString::new(path.as_os_str().as_bytes()).ok()?.into_raw();
        for (i, s) in PATHS.iter().enumerate() {
            if s.compare_exchange(null_mut(), raw, SeqCst, SeqCst).is_ok() {
                return Some(Slot(i));
            }
        }
        // SAFETY: `raw` came from `CString::into_raw` above and was never shared.
        drop(unsafe { CString::from_raw(raw) });
        None
    }

    pub fn unregister(slot: Slot) {
        let raw = PATHS[slot.0].swap(null_mut(), SeqCst);
        if !raw.is_null() && IN_HANDLER.load(SeqCst) == 0 {
            // SAFETY: `raw` came from `CString::into_raw` in `register`; it is out of the
            // array, and no handler started before the swap (one that starts later sees null).
            drop(unsafe { CString::from_raw(raw) });
        }
    }

    extern "C" fn on_signal(sig: libc::c_int) {
        IN_HANDLER.fetch_add(1, SeqCst);
        for s in &PATHS {
            let p = s.load(SeqCst);
            if !p.is_null() {
                // SAFETY: a NUL-terminated string from `CString::into_raw`, never freed while a
                // handler runs (see `unregister`); unlink is async-signal-safe.
                unsafe { libc::unlink(p) };
            }
        }
        // SAFETY: async-signal-safe calls. The handler was installed with SA_RESETHAND and
        // SA_NODEFER: the disposition is back to the default and the signal is not blocked, so
        // raise ends the process as the signal would have; _exit is the fallback.
        unsafe {
            libc::raise(sig);
            libc::_exit(128 + sig);
        }
    }

    pub fn install() {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: a zeroed sigaction with the handler and flags set, installed for one signal.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as *const () as usize;
                sa.sa_flags = libc::SA_RESETHAND | libc::SA_NODEFER;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    }
}

#[cfg(not(unix))]
mod registry {
    use std::path::Path;

    pub struct Slot;

    pub fn register(_: &Path) -> Option<Slot> {
        None
    }
    pub fn unregister(_: Slot) {}
    pub fn install() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_output_appears_only_on_commit_and_its_temp_file_goes() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m.tcv");
        let mut p = Pending::create(&out).unwrap();
        let tmp = p.temp_path().to_path_buf();
        assert_eq!(
            tmp.parent(),
            Some(dir.path()),
            "the temp file is in the output's folder"
        );
        assert!(tmp.file_name().unwrap().to_string_lossy().starts_with(".m.tcv."));
        std::io::Write::write_all(p.file(), b"abc").unwrap();
        assert!(!out.exists());
        p.commit().unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"abc");
        assert!(!tmp.exists());
        // dropped without a commit: no output, no temp file
        let other = dir.path().join("n.tcv");
        let p = Pending::create(&other).unwrap();
        let tmp = p.temp_path().to_path_buf();
        assert!(tmp.exists());
        drop(p);
        assert!(!tmp.exists() && !other.exists());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("m.tcv")]);
        // a folder that does not exist is an error at creation, naming it
        let e = Pending::create(&dir.path().join("nope/x.tcv"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn registered_slots_are_released() {
        // more outputs than slots over time: each commit or drop frees its slot
        let dir = tempfile::tempdir().unwrap();
        for i in 0..40 {
            let p = Pending::create(&dir.path().join(format!("{i}.bin"))).unwrap();
            assert!(p.slot.is_some(), "output {i} got no slot");
            if i % 2 == 0 {
                p.commit().unwrap();
            }
        }
    }
}
