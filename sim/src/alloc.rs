//! The simulator binary's allocator: mimalloc, except for blocks of [`MAPPED_FROM`] bytes or more,
//! which are mapped from the kernel and unmapped when freed.
//!
//! mimalloc is for the many small buffers the simulated nodes allocate and free all the time (HTTP/2
//! frames, TLS records, futures, log entries): with glibc's malloc and free that was about a tenth of
//! a run (`sim/README.md`, "Speed"). The large blocks are each simulated node's store (sled) page
//! tables, megabytes that must start zeroed and of which a node touches a few entries. mimalloc hands
//! back the memory an earlier seed's stores freed and clears all of it, faulting its pages in again;
//! a fresh mapping is zero already, and the kernel supplies only the pages that are touched. Over
//! `--seeds 0..16 --jobs 1` that halves the page faults (24,000 to 11,000) and takes about 2.5% off
//! the run. Only the `coyote-sim` binary installs it; `coyote` keeps the system allocator.

use std::alloc::{GlobalAlloc, Layout};

use mimalloc::MiMalloc;

/// Blocks this large (and aligned to at most a page) are mapped from the kernel.
pub const MAPPED_FROM: usize = 1 << 20;

/// See the module docs.
pub struct SimAllocator;

fn mapped(layout: Layout) -> bool {
    layout.size() >= MAPPED_FROM && layout.align() <= 4096
}

fn map(size: usize) -> *mut u8 {
    // SAFETY: a new anonymous private mapping touches no memory of this process.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        std::ptr::null_mut()
    } else {
        p.cast()
    }
}

// SAFETY: whether a block is mapped follows from its layout alone (`mapped`), and the caller passes
// `dealloc` and `realloc` the layout the block was allocated with, so each block is freed the way it
// was allocated. Mappings are page-aligned, which covers every alignment `mapped` accepts, and a new
// mapping is zero-filled, as `alloc_zeroed` must return. Everything else is mimalloc's.
unsafe impl GlobalAlloc for SimAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if mapped(layout) {
            map(layout.size())
        } else {
            // SAFETY: the caller's guarantees for `layout`, passed on.
            unsafe { MiMalloc.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if mapped(layout) {
            map(layout.size())
        } else {
            // SAFETY: as for `alloc`.
            unsafe { MiMalloc.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if mapped(layout) {
            // SAFETY: `ptr` is a mapping of `layout.size()` bytes made by `map` (see above).
            unsafe { libc::munmap(ptr.cast(), layout.size()) };
        } else {
            // SAFETY: `ptr` came from mimalloc with this layout (see above).
            unsafe { MiMalloc.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees that `new_size` is non-zero and, rounded up to the alignment,
        // does not overflow `isize`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (mapped(layout), mapped(new_layout)) {
            // SAFETY: a mimalloc block stays one.
            (false, false) => unsafe { MiMalloc.realloc(ptr, layout, new_size) },
            (true, true) => {
                // SAFETY: `ptr` is a mapping of `layout.size()` bytes; mremap keeps its contents.
                let p = unsafe { libc::mremap(ptr.cast(), layout.size(), new_size, libc::MREMAP_MAYMOVE) };
                if p == libc::MAP_FAILED {
                    std::ptr::null_mut()
                } else {
                    p.cast()
                }
            }
            _ => {
                // SAFETY: `new_layout` is valid (above); on success the old block is copied up to
                // the smaller size and freed with its own layout, as `dealloc` requires.
                unsafe {
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills `len` bytes at `p` with a pattern that depends on the offset.
    unsafe fn fill(p: *mut u8, len: usize) {
        for i in 0..len {
            unsafe { *p.add(i) = (i % 251) as u8 };
        }
    }

    unsafe fn holds_pattern(p: *const u8, len: usize) -> bool {
        (0..len).all(|i| unsafe { *p.add(i) } == (i % 251) as u8)
    }

    #[test]
    fn large_blocks_are_zeroed_kept_across_growth_and_shrinking_and_freed() {
        let a = SimAllocator;
        let big = Layout::from_size_align(3 * MAPPED_FROM, 8).unwrap();
        unsafe {
            let p = a.alloc_zeroed(big);
            assert!(!p.is_null());
            assert_eq!(p as usize % 4096, 0, "a mapping is page-aligned");
            assert!((0..big.size()).step_by(4096).all(|i| *p.add(i) == 0), "fresh blocks are zero");
            fill(p, big.size());
            // Grows (mremap), keeping the contents.
            let grown = a.realloc(p, big, 5 * MAPPED_FROM);
            assert!(!grown.is_null());
            assert!(holds_pattern(grown, big.size()));
            // Shrinks below the threshold (into mimalloc), keeping what fits.
            let grown_layout = Layout::from_size_align(5 * MAPPED_FROM, 8).unwrap();
            let small = a.realloc(grown, grown_layout, 1000);
            assert!(!small.is_null());
            assert!(holds_pattern(small, 1000));
            // And grows past it again (a new mapping).
            let small_layout = Layout::from_size_align(1000, 8).unwrap();
            let again = a.realloc(small, small_layout, 2 * MAPPED_FROM);
            assert!(holds_pattern(again, 1000));
            a.dealloc(again, Layout::from_size_align(2 * MAPPED_FROM, 8).unwrap());
        }
    }

    #[test]
    fn small_and_over_aligned_blocks_go_to_mimalloc() {
        let a = SimAllocator;
        assert!(!mapped(Layout::from_size_align(MAPPED_FROM - 1, 8).unwrap()));
        assert!(!mapped(Layout::from_size_align(MAPPED_FROM, 8192).unwrap()));
        assert!(mapped(Layout::from_size_align(MAPPED_FROM, 4096).unwrap()));
        let aligned = Layout::from_size_align(MAPPED_FROM, 8192).unwrap();
        unsafe {
            let p = a.alloc_zeroed(aligned);
            assert!(!p.is_null());
            assert_eq!(p as usize % 8192, 0);
            assert!((0..aligned.size()).all(|i| *p.add(i) == 0));
            a.dealloc(p, aligned);
        }
    }
}
