//! How glibc's `malloc` keeps freed memory, tuned for a proxy's byte path.
//!
//! HTTP/2 hands every received DATA frame out as its own buffer (h2 splits it off its read buffer and
//! allocates the next one), and the frame is freed on whichever thread consumed it, usually after the
//! connection has already allocated the next. Under glibc's defaults each free that leaves more than
//! 128 KiB at the top of a heap returns that memory to the kernel (`M_TRIM_THRESHOLD`), so the next frame
//! lands on fresh pages that the kernel must fault in and zero: in the in-process bulk bench that was 13 %
//! of the CPU (`clear_page`, page faults and memory-cgroup charging under h2's read). Keeping a few MiB
//! of freed memory per heap makes those buffers reuse warm pages. The cost is bounded: at most
//! [`Tuning::keep_free_bytes`] per malloc arena stays resident after a burst, and an idle proxy is
//! unaffected (nothing it freed at start-up reaches the threshold).
//!
//! Only glibc has these knobs. Elsewhere (musl, other systems) [`tune`] returns
//! [`io::ErrorKind::Unsupported`] and the allocator keeps its own policy.
//!
//! The allocator is process-wide state, which is why only binaries and benches call this, once, before
//! they start threads; libraries never do.

use std::io;

/// What [`tune`] sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Freed memory at the top of a heap that `malloc` keeps for reuse instead of returning it to the
    /// kernel (glibc's `M_TRIM_THRESHOLD`, default 128 KiB and raised on its own as large blocks are
    /// freed). Kept per arena: a process with two busy worker threads may keep twice this.
    pub keep_free_bytes: usize,
    /// Allocations at least this large get a mapping of their own, returned to the kernel when freed
    /// (glibc's `M_MMAP_THRESHOLD`, default 128 KiB and raised on its own). Setting it, like setting
    /// `keep_free_bytes`, also stops glibc from moving either threshold by itself, so the process behaves
    /// the same from its first connection to its millionth.
    pub own_mapping_bytes: usize,
}

impl Tuning {
    /// For a proxy: 2 MiB kept per arena (two HTTP/2 frames of the largest size we accept, 1 MiB, or eight
    /// of the 256 KiB copy buffers of bulk connections), and blocks from 2 MiB up in their own mappings, so
    /// a 1 MiB frame is still served from the heap's warm pages. 4 MiB per arena was no faster in the bulk
    /// bench and pushed a proxy's peak during bulk over 25 MB (issue 7's bound).
    pub const PROXY: Tuning = Tuning {
        keep_free_bytes: 2 << 20,
        own_mapping_bytes: 2 << 20,
    };
}

/// Applies `tuning` to the process's allocator. Call it once, early in `main`, before other threads
/// allocate. Fails with [`io::ErrorKind::Unsupported`] where the allocator is not glibc's, and with
/// [`io::ErrorKind::InvalidInput`] for a value glibc refuses or that does not fit its `int` parameter (the
/// setting before it may already apply).
pub fn tune(tuning: Tuning) -> io::Result<()> {
    imp::tune(tuning)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use std::io;

    use super::Tuning;

    pub(super) fn tune(tuning: Tuning) -> io::Result<()> {
        set("M_TRIM_THRESHOLD", libc::M_TRIM_THRESHOLD, tuning.keep_free_bytes)?;
        set(
            "M_MMAP_THRESHOLD",
            libc::M_MMAP_THRESHOLD,
            tuning.own_mapping_bytes,
        )
    }

    fn set(name: &str, parameter: libc::c_int, bytes: usize) -> io::Result<()> {
        let invalid = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("glibc refused {name} = {bytes} bytes"),
            )
        };
        let value = libc::c_int::try_from(bytes).map_err(|_| invalid())?;
        // SAFETY: `mallopt` takes two integers and changes glibc's allocator parameters under the
        // allocator's own lock; it touches no memory of ours and is safe to call from any thread at any time.
        let accepted = unsafe { libc::mallopt(parameter, value) };
        if accepted == 1 { Ok(()) } else { Err(invalid()) }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    use std::io;

    use super::Tuning;

    fn unsupported() -> io::Error {
        io::Error::new(
            io::ErrorKind::Unsupported,
            "allocator tuning needs glibc's malloc",
        )
    }

    pub(super) fn tune(_tuning: Tuning) -> io::Result<()> {
        Err(unsupported())
    }
}

#[cfg(test)]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    #[test]
    fn glibc_accepts_the_proxy_tuning_and_values_beyond_its_range_are_refused() {
        tune(Tuning::PROXY).unwrap();
        // Beyond what mallopt's `int` can carry: refused before glibc sees it, naming the parameter.
        let error = tune(Tuning {
            keep_free_bytes: 4 << 20,
            own_mapping_bytes: usize::MAX,
        })
        .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(error.to_string().contains("M_MMAP_THRESHOLD"), "{error}");
        let error = tune(Tuning {
            keep_free_bytes: usize::MAX,
            own_mapping_bytes: 4 << 20,
        })
        .unwrap_err();
        assert!(error.to_string().contains("M_TRIM_THRESHOLD"), "{error}");
        tune(Tuning::PROXY).unwrap();
    }
}
