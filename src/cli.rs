//! Small helpers shared by the two binaries.

/// Let `tabconv inspect … | head` end quietly: Rust ignores SIGPIPE by default, which turns a
/// closed pipe into a panic on the next `println!`.
pub fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: resetting a signal disposition to its default at startup, before any threads.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
