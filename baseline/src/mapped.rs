//! Hashing large files through read-only mappings, as b3sum does, without b3sum's risk: a
//! file truncated while it is mapped makes the next access to a page past its new end raise
//! SIGBUS, which would kill the process. Here every mapping is registered for the time it is
//! read; a SIGBUS inside a registered range is answered by mapping a zero page over the
//! faulting page and flagging the range, and the caller then treats the file as changed
//! while read (and reads it again). A SIGBUS anywhere else gets the default action, as if
//! this module did not exist. Mappings are made window by window so that the resident set
//! stays small whatever the file size. The watcher, which hashes files that are changing
//! right now, uses plain reads instead.

use std::fs::File;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::hash::{DigestBuilder, ReadDigest, SUBTREE_LEN};

/// Bytes mapped at a time: a whole number of subtrees, large enough that the map/unmap
/// cost is lost in the hashing, small enough to keep the resident set small.
const WINDOW: usize = 128 * SUBTREE_LEN;

/// One registered mapping: [start, end) and whether a SIGBUS hit it.
struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

/// More slots than threads that hash at once (rayon's pool is one per core).
const SLOTS: usize = 256;

#[expect(clippy::declare_interior_mutable_const, reason = "only used to initialise the array below")]
const FREE: Slot = Slot { start: AtomicUsize::new(0), end: AtomicUsize::new(0), faulted: AtomicBool::new(false) };
static REGISTRY: [Slot; SLOTS] = [FREE; SLOTS];
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Only async-signal-safe work here: atomics, mmap, signal.
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &REGISTRY {
        let (start, end) = (slot.start.load(Ordering::Acquire), slot.end.load(Ordering::Acquire));
        if start != 0 && (start..end).contains(&addr) {
            let page_size = PAGE.load(Ordering::Relaxed);
            let page = addr & !(page_size - 1);
            // SAFETY: the page lies inside a mapping this module owns and only reads; putting
            // a private zero page over it changes what the hasher reads (flagged below), not
            // memory anything else uses.
            let zero = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    page_size,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if zero != libc::MAP_FAILED {
                slot.faulted.store(true, Ordering::Release);
                return;
            }
        }
    }
    // Not ours: the default action on return, when the faulting access repeats.
    // SAFETY: signal(2) is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

fn install_handler() -> bool {
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if let Ok(page) = usize::try_from(page)
            && page.is_power_of_two()
        {
            PAGE.store(page, Ordering::Relaxed);
        }
        // SAFETY: a zeroed sigaction is a valid starting point; the handler has the
        // SA_SIGINFO signature.
        let ok = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) == 0
        };
        INSTALLED.store(ok, Ordering::Release);
    });
    INSTALLED.load(Ordering::Acquire)
}

/// A registration of one mapping with the SIGBUS handler, released on drop.
struct Registered(&'static Slot);

impl Registered {
    fn new(start: usize, len: usize) -> Option<Registered> {
        REGISTRY.iter().find_map(|slot| {
            slot.start.compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed).ok()?;
            slot.faulted.store(false, Ordering::Release);
            slot.end.store(start + len, Ordering::Release);
            Some(Registered(slot))
        })
    }

    fn faulted(&self) -> bool {
        self.0.faulted.load(Ordering::Acquire)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.0.end.store(0, Ordering::Release);
        self.0.start.store(0, Ordering::Release);
    }
}

/// What hashing through mappings gave.
pub enum Mapped {
    /// The digest of the first `len` bytes (the size the caller saw in `fstat`).
    Digest(ReadDigest),
    /// The file shrank while mapped; read it again.
    Truncated,
    /// Mapping is not possible here (no handler, no free slot, mmap refused): read instead.
    Unavailable,
}

/// Hashes the first `len` bytes of `file` through read-only mappings, window by window.
pub fn digest_mapped(file: &File, len: u64) -> Mapped {
    if !install_handler() {
        return Mapped::Unavailable;
    }
    let mut builder = DigestBuilder::new();
    let mut offset = 0;
    while offset < len {
        let Ok(n) = usize::try_from((WINDOW as u64).min(len - offset)) else { return Mapped::Unavailable };
        // SAFETY: the mapping is read-only and private to this function; a concurrent
        // truncation is what the SIGBUS handler is for, and the caller's fstat after the
        // read catches any other concurrent change.
        let map = unsafe { memmap2::MmapOptions::new().offset(offset).len(n).populate().map(file) };
        let Ok(map) = map else { return Mapped::Unavailable };
        let Some(registered) = Registered::new(map.as_ptr() as usize, n) else { return Mapped::Unavailable };
        builder.update(&map);
        let faulted = registered.faulted();
        drop(registered);
        drop(map);
        if faulted {
            return Mapped::Truncated;
        }
        offset += n as u64;
    }
    Mapped::Digest(ReadDigest { len: builder.len(), digest: builder.finish(), content: None })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn mapped_digest_equals_blake3() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3 * WINDOW + 12345).map(|i| u8::try_from(i % 241).unwrap()).collect();
        f.write_all(&data).unwrap();
        match digest_mapped(&f, data.len() as u64) {
            Mapped::Digest(d) => assert_eq!(d.digest.hash, *blake3::hash(&data).as_bytes()),
            _ => panic!("mapping a plain file failed"),
        }
    }

    #[test]
    fn truncation_while_mapped_is_caught_not_fatal() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 * WINDOW as u64).unwrap();
        let map = unsafe { memmap2::MmapOptions::new().len(WINDOW).map(&f) }.unwrap();
        assert!(install_handler());
        let registered = Registered::new(map.as_ptr() as usize, map.len()).unwrap();
        f.set_len(0).unwrap();
        // Past the new end of file: SIGBUS, answered with a zero page.
        let byte = unsafe { std::ptr::read_volatile(map.as_ptr().add(5000)) };
        assert_eq!(byte, 0);
        assert!(registered.faulted());
    }
}
