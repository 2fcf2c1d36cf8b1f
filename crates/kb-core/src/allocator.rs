//! Allocator policy: training keeps freed memory for reuse; serving hands it back.
//!
//! Training: a training step allocates and frees the same large buffers (activations, gradients of up to
//! vocabulary × d_model floats) every step. glibc serves allocations above its mmap threshold
//! (at most 32 MiB) with fresh `mmap`s and unmaps them on free, so every step pays page faults
//! and the kernel's zeroing of those pages again — measured at about a fifth of a KoBART-v1
//! step on the CPU. Telling glibc never to use `mmap` for the heap and never to trim it makes
//! the buffers of one step reuse the memory of the previous one.

/// Makes the allocator retain freed memory for reuse (glibc on Linux; elsewhere a no-op).
/// The process's resident memory then stays at its peak, which suits a training run; a server
/// combines it with [`release_freed_memory`] after each batch, so that the steps of one batch
/// reuse each other's buffers (one page fault per page per batch instead of per step) while
/// the memory still goes back between batches.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only adjusts allocator parameters; called before heavy allocation.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

/// Serving: returns memory freed by the last batch to the operating system (glibc's
/// `malloc_trim`), so the server's resident size tracks what it holds — the weights and the
/// batch in flight — rather than the largest batch it ever ran. Costs about a millisecond.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only returns unused heap pages to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Serving: caps glibc's per-thread heaps at `arenas`, so that the many threads of an async
/// server do not each keep a heap of freed batch buffers.
pub fn limit_arenas(arenas: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only adjusts allocator parameters; called at start-up.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = arenas;
}
