//! Every line `kubefim watch` prints, as types: one [`Event`] per line, its `kind` telling
//! a change (`added`, `removed`, `modified`, `renamed`) or a mount over monitored paths
//! (`mounted-over`, in `model/mount.rs`), a container's check (`container-watched`,
//! `container-gone`, `drift-exec`, `layer-modified`) from a line about the watcher itself (`rescan`,
//! `lost`, `degraded`, `error`, `verify`, and the baseline's lifecycle). The JSON
//! is their serde form and the JSON Schema (`kubefim schema events`) is generated from them;
//! human output is their `Display`. The vocabularies (ops, reasons, results, origins) are
//! enums: code never compares their names.

use std::fmt;
use std::time::SystemTime;

use kubefim_baseline::report::{EscapedField, EscapedPath, FieldKeys, RecordView};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod mount;
pub use mount::{MountTargetKeys, MountedOver};

/// What the kernel saw a process do to a path (`ops` of a change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileOp {
    /// write, pwrite, writev, copy_file_range, sendfile, splice into the file.
    Write,
    /// truncate, ftruncate, or an open with O_TRUNC.
    Truncate,
    /// fallocate.
    Fallocate,
    /// rename, renameat, renameat2 (also RENAME_EXCHANGE).
    Rename,
    /// unlink, unlinkat.
    Unlink,
    /// rmdir, unlinkat with AT_REMOVEDIR.
    Rmdir,
    /// link, linkat.
    Link,
    /// symlink, symlinkat.
    Symlink,
    /// chmod family.
    Chmod,
    /// chown family.
    Chown,
    /// setxattr family.
    Setxattr,
    /// removexattr family.
    Removexattr,
    /// utimes, utimensat, futimesat.
    Utimes,
    /// A store through a shared writable mapping (or the mmap that made it).
    Mmap,
    /// An io_uring request.
    IoUring,
    /// An open with O_CREAT that created the file.
    Create,
    /// mkdir, mkdirat.
    Mkdir,
    /// mknod, mknodat.
    Mknod,
    /// mount(2) at, above or below the path.
    Mount,
    /// move_mount(2) (attaching what fsmount(2) or open_tree(2) made, or moving a mount).
    MoveMount,
    /// mount_setattr(2).
    MountSetattr,
    /// umount2(2).
    Umount,
    /// A Linux AIO write (io_submit).
    Aio,
    /// A change of inode flags (chattr: FS_IOC_SETFLAGS, FS_IOC_FSSETXATTR, file_setattr).
    Setflags,
}

impl FileOp {
    /// The op a kernel event names, if it names one (opens for writing and closes do not:
    /// they change nothing by themselves; inode dirtying is decided by who dirtied it).
    pub fn of_kernel(op: kubefim_common::Op) -> Option<FileOp> {
        use kubefim_common::Op as K;
        Some(match op {
            K::Write => FileOp::Write,
            K::Truncate => FileOp::Truncate,
            K::Fallocate => FileOp::Fallocate,
            K::Rename => FileOp::Rename,
            K::Unlink => FileOp::Unlink,
            K::Rmdir => FileOp::Rmdir,
            K::Link => FileOp::Link,
            K::Symlink => FileOp::Symlink,
            K::Chmod => FileOp::Chmod,
            K::Chown => FileOp::Chown,
            K::Setxattr => FileOp::Setxattr,
            K::Removexattr => FileOp::Removexattr,
            K::Utimes => FileOp::Utimes,
            K::Mmap => FileOp::Mmap,
            K::IoUring => FileOp::IoUring,
            K::Create => FileOp::Create,
            K::Mkdir => FileOp::Mkdir,
            K::Mknod => FileOp::Mknod,
            K::Mount => FileOp::Mount,
            K::MoveMount => FileOp::MoveMount,
            K::MountSetattr => FileOp::MountSetattr,
            K::Umount => FileOp::Umount,
            K::Aio => FileOp::Aio,
            K::SetFlags => FileOp::Setflags,
            K::OpenWrite | K::Close | K::Dirty | K::Exec => return None,
        })
    }

    /// The name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            FileOp::Write => "write",
            FileOp::Truncate => "truncate",
            FileOp::Fallocate => "fallocate",
            FileOp::Rename => "rename",
            FileOp::Unlink => "unlink",
            FileOp::Rmdir => "rmdir",
            FileOp::Link => "link",
            FileOp::Symlink => "symlink",
            FileOp::Chmod => "chmod",
            FileOp::Chown => "chown",
            FileOp::Setxattr => "setxattr",
            FileOp::Removexattr => "removexattr",
            FileOp::Utimes => "utimes",
            FileOp::Mmap => "mmap",
            FileOp::IoUring => "io_uring",
            FileOp::Create => "create",
            FileOp::Mkdir => "mkdir",
            FileOp::Mknod => "mknod",
            FileOp::Mount => "mount",
            FileOp::MoveMount => "move_mount",
            FileOp::MountSetattr => "mount_setattr",
            FileOp::Umount => "umount",
            FileOp::Aio => "aio",
            FileOp::Setflags => "setflags",
        }
    }
}

impl fmt::Display for FileOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a rescan ran (`reason` of a `rescan` line, and the metric's label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RescanReason {
    /// Once ready: what changed while the watcher was not running.
    Startup,
    /// `--rescan-interval`.
    Interval,
    /// Part of a `verify` (`--verify-interval`).
    Verify,
    /// The kernel or the watcher dropped events.
    LostEvents,
    /// io_uring changed the namespace by path, which no event describes.
    IoUring,
    /// A path too long to be sent whole: what it could name is rescanned.
    TruncatedPath,
    /// A rule root or a directory above it was renamed, removed or mounted over, or a mount
    /// was made in a monitored tree: what the paths lead to now is rescanned and watched.
    Moved,
    /// The self-check found the kernel filter tampered with or the canary unseen: the
    /// filter was refilled, and what changed meanwhile is found by this rescan.
    SelfCheck,
}

impl RescanReason {
    /// Every reason, for metrics that must exist at zero.
    pub const ALL: [RescanReason; 8] = [
        RescanReason::Startup,
        RescanReason::Interval,
        RescanReason::Verify,
        RescanReason::LostEvents,
        RescanReason::IoUring,
        RescanReason::TruncatedPath,
        RescanReason::Moved,
        RescanReason::SelfCheck,
    ];

    /// The name in lines and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RescanReason::Startup => "startup",
            RescanReason::Interval => "interval",
            RescanReason::Verify => "verify",
            RescanReason::LostEvents => "lost_events",
            RescanReason::IoUring => "io_uring",
            RescanReason::TruncatedPath => "truncated_path",
            RescanReason::Moved => "moved",
            RescanReason::SelfCheck => "self_check",
        }
    }
}

/// How a change was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DetectedBy {
    /// A kernel event on the path and a targeted rehash.
    Event,
    /// A comparison of what is on disk with what the watcher knew (a rescan, or the listing
    /// of a directory whose entries changed) with no event on the path itself.
    Rescan,
}

/// How sure the watcher is of who made a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Attribution {
    /// Each listed process made a syscall the kernel tied to this path.
    Exact,
    /// A listed process's path could not be resolved as it saw it (it had exited, or the
    /// path was too long to be sent whole): the path was inferred from names or from a
    /// rescan of what the path could name. Or no op on the path was seen (the events were
    /// lost) and the processes listed are those that had it open for writing. Or (a
    /// container's change) the file changed again after the listed processes' last event on
    /// it: what was read may also be a later process's doing.
    Inferred,
    /// No process is known to have made the change (found by a rescan or a listing).
    None,
}

/// RFC 3339 UTC time with milliseconds.
pub fn time_string(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A process, as the kernel named it when it acted, and /proc while it lived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Process {
    /// Process id (the kernel's tgid), in the host's pid namespace.
    pub pid: u32,
    /// Its parent's process id.
    pub ppid: u32,
    /// Real user id.
    pub uid: u32,
    /// Real group id.
    pub gid: u32,
    /// Command name (`task->comm`, at most 15 bytes).
    pub comm: String,
    /// Executable, when /proc still had it.
    pub exe: Option<String>,
    /// Command line, arguments joined by spaces, when /proc still had it.
    pub cmdline: Option<String>,
}

pub use kubefim_baseline::container::cgroup::Runtime;

/// The container a process runs in, or (with `--containers`) the container a change is in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Container {
    /// The container id (64 hex digits).
    pub id: String,
    /// The runtime that named its cgroup.
    pub runtime: Runtime,
    /// Its cgroup v2 path.
    pub cgroup: Option<String>,
    /// Its name, as its runtime recorded it (containers checked against their image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its image's name, when recorded (containers checked against their image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Its image's id, when recorded (containers checked against their image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
}

/// What a change is measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reference {
    /// The node's signed baseline (and the journal's later states).
    Signed,
    /// The container's image: the merged lower layers of its root (`--containers`); `path`
    /// is then as seen inside the container.
    Image,
}

/// The pod a container belongs to, as the Kubernetes API says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Pod {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The pod's uid.
    pub uid: String,
    /// The container's name in the pod spec (null when the pod was found by the uid in the
    /// cgroup path before the API listed the container).
    pub container: Option<String>,
    /// The container's image, as its status reports it.
    pub image: Option<String>,
}

/// Where a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Outside any container.
    Host,
    /// In a container whose pod is not known.
    Container,
    /// In a container of a known pod.
    Pod,
}

/// One process that changed a path, with what it did to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Writer {
    /// The process.
    #[serde(flatten)]
    pub process: Process,
    /// What it did to this path, in the order first seen.
    pub ops: Vec<FileOp>,
    /// Its container, null on the host.
    pub container: Option<Container>,
    /// Its pod, when known.
    pub pod: Option<Pod>,
    /// Where it runs.
    pub origin: Origin,
}

/// The keys `to` and `to_hex` of a rename's destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToKeys;

impl FieldKeys for ToKeys {
    const TEXT: &'static str = "to";
    const HEX: &'static str = "to_hex";
    const WHAT: &'static str = "Where a renamed path went.";
}

/// One line of `kubefim watch`: when, and what.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    /// RFC 3339 UTC time with milliseconds: of the latest kernel event for a change, of the
    /// line otherwise.
    pub time: String,
    /// What the line says.
    #[serde(flatten)]
    pub line: Line,
}

/// What a line says; `kind` tells which.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Line {
    /// A path not known before exists now.
    Added(Change),
    /// A known path is gone.
    Removed(Change),
    /// A monitored attribute of a path changed.
    Modified(Change),
    /// A file was renamed (`path` to `to`), with the same inode.
    Renamed(Change),
    /// A mount was made, moved, changed or removed at, above or below a monitored path.
    MountedOver(MountedOver),
    /// A rescan ended.
    Rescan(Rescan),
    /// Events were lost; a rescan of everything follows.
    Lost(Lost),
    /// The watcher sees less than it should.
    Degraded(Degraded),
    /// A path could not be rehashed.
    Error(PathError),
    /// Everything compared with the signed baseline.
    Verify(Verify),
    /// No signed baseline yet: this node's signing request, waiting for its signature.
    AwaitingSignature(AwaitingSignature),
    /// A signature that was not taken.
    SignatureRejected(SignatureRejected),
    /// A newly signed baseline was installed.
    BaselineInstalled(BaselineInstalled),
    /// A container a workload policy selects was found and checked against its image; its
    /// drift, if any, was reported just before (changes with `baseline: image`).
    ContainerWatched(ContainerWatched),
    /// A checked container's process exited: what was kept for it is released.
    ContainerGone(ContainerGone),
    /// A container whose workload policy asks (`drift.exec`) executed a file that is not its
    /// image's: added to its layer or changed there.
    DriftExec(DriftExec),
    /// A file of an image layer that running checked containers use was changed on the node
    /// (a layer is a host directory every container of the image shares).
    LayerModified(LayerModified),
    /// A workload policy object from the Kubernetes API that cannot be applied: the policies
    /// applied before it stay in force, and it is taken again once it changes.
    PolicyRejected(PolicyRejected),
}

/// A change to one path.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Change {
    /// The path.
    #[serde(flatten)]
    pub path: EscapedPath,
    /// Where a `renamed` path went.
    #[serde(flatten)]
    pub to: Option<EscapedField<ToKeys>>,
    /// The monitored attributes that differ (empty for added and removed).
    pub changed: Vec<kubefim_baseline::policy::Attribute>,
    /// Every op the kernel saw on this path since its last report, in the order first seen.
    pub ops: Vec<FileOp>,
    /// The last known record (null for added).
    pub old: Option<RecordView>,
    /// The record now (null for removed).
    pub new: Option<RecordView>,
    /// A unified diff against the last known content, where the rule keeps content (never
    /// for `secret: true`).
    pub diff: Option<String>,
    /// The changed 64 KiB ranges of the content, `[start, end)` byte offsets.
    pub changed_ranges: Option<Vec<[u64; 2]>>,
    /// Whether the path now equals the signed baseline in every monitored attribute but
    /// those a restore cannot bring back (mtime, ctime, inode number).
    pub baseline_match: bool,
    /// The process whose op the kernel saw last, when known (one of `processes`).
    pub process: Option<Process>,
    /// `process`'s container, null on the host.
    pub container: Option<Container>,
    /// `process`'s pod, when known.
    pub pod: Option<Pod>,
    /// Where `process` runs; null when no process is known.
    pub origin: Option<Origin>,
    /// Every process that changed the path since its last report, in order, each with its
    /// own ops.
    pub processes: Vec<Writer>,
    /// How sure the naming of `processes` is.
    pub attribution: Attribution,
    /// How the change was found.
    pub detected_by: DetectedBy,
    /// What the change is against: the signed baseline, or (a container's change) its image.
    pub baseline: Reference,
    /// For a container's change: the workload policy whose rules apply (`namespace/name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The journal of an earlier run had already recorded the path in exactly this state:
    /// a deviation from the signed baseline reported again at start. Every start reports every
    /// deviation, whatever the journal says (it is unsigned: any `kubefim watch` run with the
    /// public key can write it), so `true` means "seen before by some watcher", never "fine".
    pub already_known: bool,
}

/// A path a rescan could not check.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Unverified {
    /// The path.
    pub path: String,
    /// Why.
    pub error: String,
}

/// A rescan ended.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Rescan {
    /// Why it ran.
    pub reason: RescanReason,
    /// What it covered: empty for everything the policy names, else these subtrees.
    pub scope: Vec<String>,
    /// Entries scanned.
    pub scanned: u64,
    /// Changes it reported (those with events of their own are reported as events).
    pub changes: u64,
    /// Paths it could not check.
    pub unverified: Vec<Unverified>,
    /// How long it took, scan and reports.
    pub seconds: f64,
}

/// Who dropped events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LostBy {
    /// The kernel: its ring buffer was full.
    Kernel,
    /// The watcher: its queue between the reader and the rest was full.
    Watcher,
    /// The kernel, for a process (not root's) over its budget of events (2000 a second, a
    /// burst of 4000): one process cannot delay everyone else's reports.
    Budget,
}

impl LostBy {
    /// The name in lines and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            LostBy::Kernel => "kernel",
            LostBy::Watcher => "watcher",
            LostBy::Budget => "budget",
        }
    }
}

/// Events were lost.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Lost {
    /// How many since the last `lost` line.
    pub events: u64,
    /// Where.
    pub dropped_by: LostBy,
    /// How many were lost at this place (`dropped_by`) since the programs were loaded.
    pub total: u64,
    /// What follows.
    pub action: String,
}

/// Why the watcher is degraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DegradedReason {
    /// Tracepoints this kernel does not have: the rescans cover what they would see.
    MissingTracepoints,
    /// The in-kernel filter is full: changes beyond it are found by rescans only.
    FilterFull,
    /// No Kubernetes API: changes are attributed to containers, not pods.
    NoKubernetesApi,
    /// A write to the watcher's canary file by a helper process produced no event in time:
    /// the programs or their filter no longer see writes (detached, or entries deleted).
    /// Not ready until a canary is seen again.
    CanaryMissed,
    /// Entries the watcher put in the in-kernel filter are missing or changed (another root
    /// process edited the maps): they were put back and a rescan follows. Not ready until
    /// a canary is seen again.
    FilterTampered,
}

/// The watcher sees less than it should.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Degraded {
    /// Why.
    pub reason: DegradedReason,
    /// What it means, for people.
    pub message: String,
    /// The missing tracepoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    /// The filter's capacity, in inodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
    /// The error behind it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A path that could not be rehashed: nothing is concluded about it.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PathError {
    /// The path.
    #[serde(flatten)]
    pub path: EscapedPath,
    /// Why.
    pub error: String,
}

/// Why a verify ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VerifyReason {
    /// Once, at start.
    Startup,
    /// `--verify-interval`.
    Interval,
}

/// What a verify found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VerifyResult {
    /// Everything equals the signed baseline.
    Clean,
    /// Something differs.
    Changed,
    /// Something could not be checked (whatever else was found).
    Error,
}

impl VerifyResult {
    /// The name in lines and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyResult::Clean => "clean",
            VerifyResult::Changed => "changed",
            VerifyResult::Error => "error",
        }
    }
}

/// How a path deviates from the signed baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviationKind {
    /// Not in the baseline.
    Added,
    /// Gone.
    Removed,
    /// A monitored attribute differs.
    Modified,
}

/// One path that deviates from the signed baseline.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Deviation {
    /// The path.
    #[serde(flatten)]
    pub path: EscapedPath,
    /// How.
    pub kind: DeviationKind,
}

/// Everything compared with the signed baseline.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Verify {
    /// Why it ran.
    pub reason: VerifyReason,
    /// What it found.
    pub result: VerifyResult,
    /// Paths not in the baseline.
    pub added: u64,
    /// Baseline paths gone.
    pub removed: u64,
    /// Baseline paths modified.
    pub modified: u64,
    /// Paths that could not be checked.
    pub errors: u64,
    /// Up to 100 deviating paths (the counts are complete).
    pub deviations: Vec<Deviation>,
    /// Whether `deviations` was cut at 100.
    pub deviations_truncated: bool,
    /// Records in the signed baseline.
    pub baseline_entries: u64,
    /// How long it took.
    pub seconds: f64,
}

/// This node's signing request, waiting for its signature.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct AwaitingSignature {
    /// The node.
    pub node: String,
    /// Where the signature is expected.
    pub signature_file: String,
    /// What the operator does.
    pub what_to_do: String,
    /// The request to sign.
    pub request: kubefim_baseline::request::SigningRequest,
}

/// A signature that was not taken.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SignatureRejected {
    /// The node.
    pub node: String,
    /// The digest the signature is for, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Why it was not taken.
    pub error: String,
}

/// A newly signed baseline was installed.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct BaselineInstalled {
    /// The node.
    pub node: String,
    /// Where.
    pub db: String,
    /// The digest its signature covers.
    pub digest: String,
}

/// How a container was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FoundBy {
    /// Running when the watcher started.
    Startup,
    /// The exec of its first process (the kernel's `sched_process_exec`).
    Exec,
    /// Running already, and selected by a workload policy added or changed since.
    Policy,
}

/// A container checked against its image.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ContainerWatched {
    /// The container.
    pub container: Container,
    /// Its pod, as its runtime recorded it (on Kubernetes).
    pub pod: Option<Pod>,
    /// The workload policies that select it (`namespace/name`).
    pub policies: Vec<String>,
    /// How it was found.
    pub found_by: FoundBy,
    /// Seconds from the exec that revealed it to its check's end (`found_by: exec`).
    pub seconds_since_exec: Option<f64>,
    /// Entries of its layer compared with the image (over every policy).
    pub scanned: u64,
    /// Changes against the image reported for it (the lines before this one).
    pub changes: u64,
    /// Its monitored entries the kernel watches: changes to them (and new entries in its
    /// watched directories) are compared with the image as they happen.
    pub watched: u64,
    /// Records of image files its comparison took from the layer cache (read before, for
    /// this or another container of the image).
    pub image_records_cached: u64,
    /// Records of image files its comparison had to read from the layers (then cached).
    pub image_records_read: u64,
    /// Why it could not be checked at all (its root is not an overlay...), per policy.
    pub errors: Vec<String>,
    /// Paths that could not be compared.
    pub unverified: Vec<Unverified>,
}

/// A container executed a file that is not its image's.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct DriftExec {
    /// What was executed, as seen inside the container (`/proc/PID/exe`).
    #[serde(flatten)]
    pub path: EscapedPath,
    /// BLAKE3 of what was executed (hex).
    pub hash: String,
    /// BLAKE3 of the image's file at that path (hex); null when the image has none there
    /// (the file was added by the container).
    pub image_hash: Option<String>,
    /// The process that executed it.
    pub process: Process,
    /// The container.
    pub container: Container,
    /// Its pod, when known.
    pub pod: Option<Pod>,
    /// `container`, or `pod` when the pod is known.
    pub origin: Origin,
    /// The workload policies that ask for it (`namespace/name`).
    pub policies: Vec<String>,
}

/// A workload policy object that cannot be applied.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PolicyRejected {
    /// `WorkloadFimPolicy` or `ClusterWorkloadFimPolicy`.
    pub policy_kind: String,
    /// The object's namespace (a WorkloadFimPolicy's).
    pub namespace: Option<String>,
    /// The object's name.
    pub name: String,
    /// The object's `metadata.resourceVersion`: the version rejected.
    pub resource_version: Option<String>,
    /// Why, and what to change.
    pub error: String,
}

/// A file of an image layer in use changed on the node.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct LayerModified {
    /// The layer's directory on the node.
    pub layer: String,
    /// The file, as the image (and its containers) name it.
    #[serde(flatten)]
    pub path: EscapedPath,
    /// Every op the kernel saw on it since its last report.
    pub ops: Vec<FileOp>,
    /// BLAKE3 of the layer's file now (hex); null when it is gone or no regular file (or
    /// could not be read: `error` says why).
    pub hash: Option<String>,
    /// Why the file could not be read now.
    pub error: Option<String>,
    /// The process whose op the kernel saw last.
    pub process: Option<Process>,
    /// Every process that changed it, in order, each with its own ops.
    pub processes: Vec<Writer>,
    /// The checked containers that use the layer.
    pub containers: Vec<Container>,
    /// Their pods, when known.
    pub pods: Vec<Pod>,
}

/// A checked container's process exited.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ContainerGone {
    /// The container.
    pub container: Container,
    /// Its pod, when known.
    pub pod: Option<Pod>,
}

impl Event {
    /// A line about now.
    pub fn now(line: Line) -> Event {
        Event { time: time_string(SystemTime::now()), line }
    }
}
