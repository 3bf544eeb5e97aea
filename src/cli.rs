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

/// Keep freed activation buffers in the process. The interpreter allocates each op's output
/// (up to a few MB at batch 64) and frees it after its last use; glibc's defaults hand such
/// blocks back to the kernel, so every run page-faults them in and zeroes them again (about a
/// quarter of a ResNet run). A fixed 32 MB mmap threshold and a 1 GB trim threshold make the
/// next run reuse them. Fastbins are off (`M_MXFAST` 0): with them, every allocation of 1 KiB
/// or more first merged the small blocks freed since (shapes, `Arc`s), a sixth of a batch-1 ViT
/// run in `malloc_consolidate`; small blocks still come from glibc's per-thread cache. Call
/// once at startup, before any threads; other platforms: no-op.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation policy; called before threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_MXFAST, 0);
    }
}

/// One line of a long job's progress on stderr, printed now: above `bar` when the bar is drawn
/// (a terminal), as a plain line otherwise (a log file, CI, a pipe), so that what happens shows
/// as it happens.
pub fn say(bar: &indicatif::ProgressBar, line: &str) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// A progress bar on stderr (drawn only when stderr is a terminal).
pub fn progress(len: usize, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len as u64);
    let style = indicatif::ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")
        .expect("valid template")
        .progress_chars("=> ");
    pb.set_style(style);
    pb.set_prefix(what.to_string());
    pb
}
