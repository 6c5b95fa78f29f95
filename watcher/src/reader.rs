//! The ring buffer's reader, on a thread of its own so that nothing else the watcher does (a
//! rehash on a slow disk, a rescan, a verify) ever stops it draining. For each record it
//! does only what cannot wait: decode it, name its process (from /proc, before the process
//! can exit) and look at a path event's paths as the process sees them (`resolve`). The
//! result goes to the rest of the watcher through a bounded queue; when the queue is full the
//! event is dropped and counted, and the count, like the kernel's own counts of events its
//! ring buffer had no room for and of events over a process's budget, becomes a `lost`
//! message (a rescan of everything follows).

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use kubefim_baseline::root::HostRoot;
use tokio::sync::mpsc::{Sender, error::TrySendError};

use crate::actor::{Actor, Attribution};
use crate::event::KernelEvent;
use crate::metrics::Metrics;
use crate::model::LostBy;
use crate::programs::EventSource;
use crate::resolve::{HostView, Seen, look};

/// How often the kernel's lost-event counter is read, and how long a poll waits.
const TICK: Duration = Duration::from_millis(100);

/// How long the reader lets records gather after a drain that found some. The kernel wakes
/// the reader for a record only when the buffer was empty (`bpf_ringbuf_commit`), and each
/// wake-up costs the writing process an irq_work and a context switch: draining the moment
/// each record lands would make a storm of writes pay one per write. A record in a quiet
/// moment is still read at once (the poll wakes for it).
const GATHER: Duration = Duration::from_millis(1);

/// One kernel event with what could only be learnt at once.
#[derive(Debug)]
pub(crate) struct Observation {
    /// The event.
    pub event: KernelEvent,
    /// Who.
    pub actor: Arc<Actor>,
    /// What each path of a path event named, as the actor saw it (`None`: gone, or not a
    /// path event).
    pub seen: [Option<Seen>; 2],
    /// When (wall time).
    pub time: SystemTime,
}

/// What the reader sends.
#[derive(Debug)]
pub(crate) enum Message {
    /// An event.
    Event(Box<Observation>),
    /// Events were dropped.
    Lost {
        /// How many.
        events: u64,
        /// Where.
        by: LostBy,
        /// How many were lost at this place since the programs were loaded.
        total: u64,
    },
}

/// The reader thread.
pub(crate) struct Reader {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Wall time minus boot time, to turn `bpf_ktime_get_boot_ns` into wall time.
fn boot_offset() -> Duration {
    let boot = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let boot = Duration::new(u64::try_from(boot.tv_sec).unwrap_or(0), u32::try_from(boot.tv_nsec).unwrap_or(0));
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().saturating_sub(boot)
}

/// What the reader works with.
pub(crate) struct ReaderParts {
    /// The ring buffer and the lost counter.
    pub source: EventSource,
    /// Who acted.
    pub attribution: Attribution,
    /// Where the policy's paths are on disk.
    pub host: HostRoot,
    /// Events by op.
    pub metrics: Arc<Metrics>,
    /// To the rest of the watcher.
    pub tx: Sender<Message>,
}

impl Reader {
    /// Starts reading.
    pub fn start(parts: ReaderParts) -> std::io::Result<Reader> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("kubefim-reader".into()).spawn(move || run(parts, &flag))?;
        Ok(Reader { stop, thread: Some(thread) })
    }

    /// Drains what the kernel has sent so far, delivers it all (waiting for room), and stops.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn run(mut parts: ReaderParts, stop: &AtomicBool) {
    let mut repeat = Repeat::default();
    let boot = boot_offset();
    let host_view = HostView::new(&parts.host);
    let mut kernel_seen = 0u64;
    let mut kernel_lost = 0u64;
    let mut budget_seen = 0u64;
    let mut budget_lost = 0u64;
    let mut dropped = 0u64;
    let mut dropped_total = 0u64;
    let mut checked = Instant::now();
    let Ok(ring) = parts.source.events.as_fd().try_clone_to_owned() else {
        tracing::error!("cannot poll the ring buffer: no descriptor left");
        return;
    };
    loop {
        let stopping = stop.load(Ordering::Acquire);
        if !stopping {
            let mut fds = [rustix::event::PollFd::new(&ring, rustix::event::PollFlags::IN)];
            let timeout = rustix::event::Timespec { tv_sec: 0, tv_nsec: i64::try_from(TICK.as_nanos()).unwrap_or(0) };
            // An interrupted poll is just an early wake-up.
            let _ = rustix::event::poll(&mut fds, Some(&timeout));
        }
        let mut drained = 0usize;
        loop {
            let event = {
                let Some(item) = parts.source.events.next() else { break };
                KernelEvent::decode(&item)
            };
            drained += 1;
            let Some(event) = event else { continue };
            parts.metrics.event(event.op.name());
            if repeat.is_repeat(&event) {
                continue;
            }
            let observation = observe(&mut parts, host_view.as_ref(), event, boot);
            let message = Message::Event(Box::new(observation));
            if stopping {
                if parts.tx.blocking_send(message).is_err() {
                    return;
                }
                continue;
            }
            match parts.tx.try_send(message) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => dropped += 1,
                Err(TrySendError::Closed(_)) => return,
            }
        }
        if stopping || checked.elapsed() >= TICK {
            checked = Instant::now();
            let total = parts.source.lost_total();
            kernel_lost += total.saturating_sub(kernel_seen);
            kernel_seen = kernel_seen.max(total);
            let total = parts.source.lost_over_budget();
            budget_lost += total.saturating_sub(budget_seen);
            budget_seen = budget_seen.max(total);
        }
        let counts =
            [(&mut kernel_lost, LostBy::Kernel), (&mut dropped, LostBy::Watcher), (&mut budget_lost, LostBy::Budget)];
        for (count, by) in counts {
            if *count == 0 {
                continue;
            }
            let total = match by {
                LostBy::Kernel => kernel_seen,
                LostBy::Budget => budget_seen,
                LostBy::Watcher => dropped_total + *count,
            };
            let message = Message::Lost { events: *count, by, total };
            let sent =
                if stopping { parts.tx.blocking_send(message).is_ok() } else { parts.tx.try_send(message).is_ok() };
            // Not sent (the queue is still full): counted again in the next message.
            if sent {
                if by == LostBy::Watcher {
                    dropped_total = total;
                }
                *count = 0;
            }
        }
        if stopping {
            return;
        }
        if drained > 0 {
            std::thread::sleep(GATHER);
        }
    }
}

/// Decodes what only the moment can tell: the actor, and what its paths name.
/// How long the same op by the same thread on the same inode is one observation: a process
/// writing a file in a tight loop sends an event a write, each telling what the first told
/// (who, what, where); passing them all on would fill the queue and lose other processes'
/// events. The debounce queue still sees the storm go on (one observation each window).
const REPEAT_WINDOW: Duration = Duration::from_millis(5);

/// The last inode event passed on, to drop its repeats within [`REPEAT_WINDOW`].
#[derive(Default)]
struct Repeat {
    last: Option<(u32, u32, kubefim_common::InodeKey, Instant)>,
}

impl Repeat {
    /// Whether `event` repeats the last one passed on (an inode event only: a path event's
    /// paths may differ); otherwise it becomes the last one.
    fn is_repeat(&mut self, event: &KernelEvent) -> bool {
        if event.header.flags & kubefim_common::EVENT_HAS_TARGET == 0 || !event.paths.is_empty() {
            return false;
        }
        let key = (event.header.tid, event.header.op, event.header.target);
        let now = Instant::now();
        if let Some((tid, op, target, at)) = self.last
            && (tid, op, target) == key
            && now.duration_since(at) < REPEAT_WINDOW
        {
            return true;
        }
        self.last = Some((key.0, key.1, key.2, now));
        false
    }
}

fn observe(parts: &mut ReaderParts, host_view: Option<&HostView>, event: KernelEvent, boot: Duration) -> Observation {
    // The paths first: of all this, their directories are what an exiting actor takes along.
    let mut seen = [None, None];
    for (i, path) in event.paths.iter().enumerate().take(2) {
        if !path.is_empty() {
            seen[i] = look(&parts.host, host_view, &event, i);
        }
    }
    let actor = parts.attribution.actor(&event);
    let time = SystemTime::UNIX_EPOCH + boot + Duration::from_nanos(event.header.time_ns);
    Observation { event, actor, seen, time }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    use kubefim_common::{InodeKey, Op};

    use super::*;
    use crate::programs::Programs;

    #[test]
    fn the_reader_keeps_draining_when_nobody_takes_what_it_read_and_counts_what_it_drops() {
        if !rustix::process::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "the reader test loads eBPF programs: CI runs as root");
            eprintln!("skipped: needs root");
            return;
        }
        // Watched by a watcher of another pid, so this test's own writes are events.
        let programs = Programs::load(0, 1 << 10, 1 << 10, None, false).expect("load the programs");
        let (_attached, mut filter, source, _cgroups) = programs.into_parts();
        let dir = tempfile::tempdir().expect("temp dir");
        // Two files written in turn: each write is news (repeats of one are passed on once
        // a window, see `Repeat`).
        let mut files: Vec<std::fs::File> = ["drained-a.txt", "drained-b.txt"]
            .into_iter()
            .map(|name| {
                let file = std::fs::File::create(dir.path().join(name)).expect("create");
                let meta = file.metadata().expect("stat");
                assert!(filter.watch(InodeKey::from_stat(meta.dev(), meta.ino()), false, name.as_bytes()));
                file
            })
            .collect();
        // A queue of 8 that nobody reads until the end: the loop stuck on a slow disk.
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let metrics = Arc::new(Metrics::new());
        let parts = ReaderParts {
            source,
            attribution: Attribution::default(),
            host: HostRoot::identity(),
            metrics: metrics.clone(),
            tx,
        };
        let reader = Reader::start(parts).expect("start the reader");
        const WRITES: u64 = 5000;
        for i in 0..WRITES {
            files[(i % 2) as usize].write_all(b"x").expect("write");
        }
        // Everything the kernel sent left its ring buffer (none lost there), though only 8
        // could be queued: the rest is dropped by the watcher and said so.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut events = 0u64;
        let (mut dropped, mut kernel) = (0u64, 0u64);
        while events + dropped < WRITES {
            assert!(Instant::now() < deadline, "{events} events and {dropped} dropped of {WRITES} writes");
            match rx.try_recv() {
                Ok(Message::Event(o)) if o.event.op == Op::Write => events += 1,
                Ok(Message::Event(_)) => {}
                Ok(Message::Lost { events: n, by: LostBy::Watcher, .. }) => dropped += n,
                Ok(Message::Lost { events: n, by: LostBy::Kernel, .. }) => kernel += n,
                Ok(Message::Lost { by: LostBy::Budget, .. }) => {}
                Err(_) => {
                    // Let the queue fill up before taking from it again, as a stuck loop would.
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        assert_eq!(kernel, 0, "the kernel's ring buffer overflowed: the reader stopped draining");
        assert!(dropped > 0, "the queue of 8 never overflowed");
        reader.stop();
    }
}
