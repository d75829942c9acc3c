//! Giving freed heap memory back to the system after a peak.
//!
//! glibc's malloc keeps what a burst freed for later: a heap whose top is in use, or whose free
//! chunks lie between live ones, is never shrunk, so a process stays at the size of its largest
//! burst. `malloc_trim(0)` returns every whole free page of every arena (`madvise`), and costs a
//! walk of the free lists: it is for after a burst, not for every free.

/// Returns the heap's free pages to the system, where the C library can (glibc); elsewhere a
/// no-op.
pub fn give_back_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's own free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
