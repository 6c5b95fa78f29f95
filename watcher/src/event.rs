//! Ring buffer records decoded into [`KernelEvent`]s. The layout is common/'s; this is the
//! one place that turns bytes into it, checking sizes instead of trusting them.

use kubefim_common::{EVENT_HAS_PATHS, EVENT_PATH_TRUNCATED, EventHeader, InodeKey, Op, PATH_CAP, PathEvent};

/// One event from the kernel.
#[derive(Debug, Clone)]
pub struct KernelEvent {
    /// What the kernel saw.
    pub op: Op,
    /// The fixed part, as sent.
    pub header: EventHeader,
    /// The paths of a path event (as the syscall got them), empty otherwise.
    pub paths: Vec<Vec<u8>>,
    /// Which of `paths` did not fit in [`PATH_CAP`] bytes: only their start is known.
    pub truncated: [bool; 2],
}

impl KernelEvent {
    /// Decodes one record; `None` for a record of the wrong size or an unknown op.
    pub fn decode(bytes: &[u8]) -> Option<KernelEvent> {
        if bytes.len() < size_of::<EventHeader>() {
            return None;
        }
        // SAFETY: the length was checked; EventHeader is plain data valid for any bits, and
        // read_unaligned does not require the ring buffer's alignment.
        let header: EventHeader = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let op = Op::from_u32(header.op)?;
        let mut paths = Vec::new();
        let mut truncated = [false; 2];
        if header.flags & EVENT_HAS_PATHS != 0 {
            if bytes.len() < size_of::<PathEvent>() {
                return None;
            }
            let start = size_of::<EventHeader>();
            for i in 0..2 {
                let slot = &bytes[start + i * PATH_CAP..start + (i + 1) * PATH_CAP];
                let len = slot.iter().position(|&b| b == 0).unwrap_or(PATH_CAP);
                // The kernel side flags a path that filled its slot; a path of exactly
                // PATH_CAP - 1 bytes cannot be told from a longer one, so it counts as cut.
                truncated[i] = header.flags & EVENT_PATH_TRUNCATED != 0 && len >= PATH_CAP - 1;
                paths.push(slot[..len].to_vec());
            }
        }
        Some(KernelEvent { op, header, paths, truncated })
    }

    /// The target inode, when the kernel resolved one.
    pub fn target(&self) -> Option<InodeKey> {
        (self.header.flags & kubefim_common::EVENT_HAS_TARGET != 0).then_some(self.header.target)
    }

    /// The actor's command name.
    pub fn comm(&self) -> String {
        let c = &self.header.comm;
        let len = c.iter().position(|&b| b == 0).unwrap_or(c.len());
        String::from_utf8_lossy(&c[..len]).into_owned()
    }
}
