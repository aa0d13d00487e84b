//! A counting global allocator (mimalloc underneath) so benchmarks can report the peak heap memory of each run
//! they compare inside one process. The counters are process-wide by nature; nothing else reads them.
//!
//! The `mor` binary installs it with `#[global_allocator]`; library users may do the same.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};

use mimalloc::MiMalloc;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// mimalloc with live/peak byte counters. mimalloc measurably speeds up candle's allocation-heavy backward (a
/// 15-25% shorter training step than the system allocator, measured on this project's 2-core machines).
pub struct CountingAlloc;

// SAFETY: every method forwards to mimalloc's `GlobalAlloc` with the caller's own arguments, so the contract the
// caller upholds for us is the one mimalloc needs; the counters are side bookkeeping.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout (see the impl).
        let p = unsafe { MiMalloc.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (i.e. mimalloc) with `layout`.
        unsafe { MiMalloc.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { MiMalloc.alloc_zeroed(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from mimalloc with `layout`; the caller guarantees `new_size` is valid for it.
        let p = unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = CURRENT.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                    + (new_size - layout.size());
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

/// mimalloc v3's `mi_option_purge_delay` (its `mi_option_e` enum has no Rust binding).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed memory mapped instead of returning it to the OS. candle allocates and frees tensors of the same sizes
/// every step; with purging on, each step re-faults and re-zeroes those pages (measured: ~150× more page faults and
/// 15–25% slower training steps on this machine).
pub fn keep_freed_memory() {
    // SAFETY: sets a process-wide allocator option; valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Back this process's memory with 4 KiB pages from now on: no transparent huge pages (Linux `PR_SET_THP_DISABLE`;
/// a no-op elsewhere). mimalloc asks for huge pages for its arenas, and a 2 MiB page is resident as a whole once
/// any of it is touched, so the activation buffers of an inference run, each touched in part, cost whole huge pages:
/// peak RSS of `mor bench model --prompt-len 512` on SmolLM2-135M was 27–37 MiB higher with them (Q4_1 255 → 228
/// MiB, Q8_0 307 → 270, F32 683 → 653), with no measurable change in speed (docs/benchmarks.md). For inference
/// commands; training keeps huge pages, and the loader gives dense weights huge pages anyway
/// ([`collapse_to_huge_pages`]).
pub fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE takes integer arguments only and changes a process attribute.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Back the whole 2 MiB pages inside `buf` with transparent huge pages now (Linux `MADV_COLLAPSE`; a no-op
/// elsewhere), even under [`no_huge_pages`]: for buffers read whole on every token, such as dense weights, where huge
/// pages save TLB misses and cost no partly used pages. Returns the bytes collapsed (0 when the kernel refuses).
pub fn collapse_to_huge_pages<T>(buf: &[T]) -> usize {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (buf.as_ptr() as usize).next_multiple_of(HUGE);
        let end = (buf.as_ptr() as usize + std::mem::size_of_val(buf)) / HUGE * HUGE;
        if end <= start {
            return 0;
        }
        // SAFETY: prctl takes integer arguments and changes a process attribute; madvise only changes how the pages
        // of [start, end), which lie inside `buf`, are backed, never their contents.
        let ok = unsafe {
            let disabled = libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1;
            if disabled {
                libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0);
            }
            let r = libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_COLLAPSE);
            if disabled {
                libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
            }
            r == 0
        };
        if ok {
            return end - start;
        }
    }
    0
}

/// While alive, memory the process frees goes back to the OS at once; when the last one alive is dropped, what is
/// still held is collected and the setting from before the first one is restored (normally [`keep_freed_memory`]).
/// For loading a model for inference: the file's raw tensors, metadata and the tokenizer's conversion are freed once
/// the engine holds its weights, and kept mapped they would stay in the resident set for the life of the process
/// (mimalloc never revisits memory freed while purging was off).
pub struct ReturnFreedMemory(());

/// Guards alive and the purge delay from before the first of them (the allocator option is process-wide, so
/// overlapping guards on several threads share one save and restore).
static RETURNING: std::sync::Mutex<(usize, std::os::raw::c_long)> = std::sync::Mutex::new((0, 0));

impl ReturnFreedMemory {
    /// Start returning freed memory to the OS.
    pub fn new() -> Self {
        let mut g = RETURNING.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 == 0 {
            // SAFETY: reads and sets a process-wide allocator option; valid at any time.
            g.1 = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
            // SAFETY: as above.
            unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
        }
        g.0 += 1;
        ReturnFreedMemory(())
    }
}

impl Default for ReturnFreedMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ReturnFreedMemory {
    fn drop(&mut self) {
        let mut g = RETURNING.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: `mi_collect` frees the empty pages of this thread's heap (purged at once while the delay is 0).
        unsafe { libmimalloc_sys::mi_collect(true) };
        g.0 -= 1;
        if g.0 == 0 {
            // SAFETY: sets a process-wide allocator option; valid at any time.
            unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, g.1) };
        }
    }
}

/// A vector of `n` copies of `T::default()` written into reused memory. `vec![0; n]` asks the allocator for zeroed
/// memory, which mimalloc serves from fresh OS pages rather than from freed (dirty) ones, so a hot loop of such
/// buffers keeps faulting in and clearing new pages and grows the resident set (measured on the quantized
/// prefill: a third of its time in the kernel's page clearing).
pub fn filled_vec<T: Clone + Default>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    v.resize(n, T::default());
    v
}

/// Bytes currently allocated through [`CountingAlloc`] (0 if it is not the global allocator).
pub fn current_bytes() -> usize {
    CURRENT.load(Ordering::Relaxed)
}

/// Highest [`current_bytes`] since the last [`reset_peak`].
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Start a new peak measurement from the current level.
pub fn reset_peak() {
    PEAK.store(CURRENT.load(Ordering::Relaxed), Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapsing_to_huge_pages_keeps_the_contents() {
        let v: Vec<u32> = (0..3 << 20)
            .map(|i: u32| i.wrapping_mul(2654435761))
            .collect();
        let done = collapse_to_huge_pages(&v);
        // Whole 2 MiB pages inside the buffer only; some of them where the kernel has MADV_COLLAPSE (Linux 6.1) and
        // transparent huge pages are not switched off.
        assert!(done <= std::mem::size_of_val(&v[..]) && done.is_multiple_of(2 << 20));
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut version = release
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse::<u32>().ok());
        let new_kernel = (version.next().unwrap_or(0), version.next().unwrap_or(0)) >= (6, 1);
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|s| !s.contains("[never]"));
        if cfg!(target_os = "linux") && new_kernel && thp {
            assert!(done >= 8 << 20, "collapsed {done} bytes of 12 MiB");
        }
        assert!(v
            .iter()
            .enumerate()
            .all(|(i, &x)| x == (i as u32).wrapping_mul(2654435761)));
        assert_eq!(
            collapse_to_huge_pages(&v[..1000]),
            0,
            "a buffer under 2 MiB holds no whole huge page"
        );
    }

    fn purge_delay() -> std::os::raw::c_long {
        // SAFETY: reads a process-wide allocator option.
        unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
    }

    // The only test in this crate's unit tests that creates these guards (nothing here loads a model), so no other
    // guard changes the option meanwhile.
    #[test]
    fn overlapping_guards_restore_the_setting_from_before_the_first() {
        keep_freed_memory();
        let a = ReturnFreedMemory::new();
        assert_eq!(purge_delay(), 0);
        let b = ReturnFreedMemory::new();
        drop(a);
        assert_eq!(purge_delay(), 0, "still returning while one guard is alive");
        drop(b);
        assert_eq!(purge_delay(), -1);
    }
}
