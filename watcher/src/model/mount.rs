//! The `mounted-over` line: a mount made, moved, changed or removed at, above or below a
//! monitored path. A bind mount over a file or a tmpfs over a directory changes no file, yet
//! every reader sees other content there: the line says who did it and what is mounted there
//! now; the changes it makes visible follow as `modified`, `added` and `removed` lines of the
//! rescan it starts (reason `moved`).

use kubefim_baseline::report::{EscapedField, FieldKeys};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Container, FileOp, Origin, Pod, Process};

/// The keys `target` and `target_hex` of a mount's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountTargetKeys;

impl FieldKeys for MountTargetKeys {
    const TEXT: &'static str = "target";
    const HEX: &'static str = "target_hex";
    const WHAT: &'static str = "Where the mount was made, as the policy names paths.";
}

/// A mount at, above or below monitored paths.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct MountedOver {
    /// The syscall: `mount`, `move_mount`, `mount_setattr` or `umount`.
    pub op: FileOp,
    /// The mount's target.
    #[serde(flatten)]
    pub target: EscapedField<MountTargetKeys>,
    /// Whether something is mounted at the target now, in the watcher's mount namespace (a
    /// mount made in another namespace hides nothing the watcher reads).
    pub mounted: bool,
    /// The file system type mounted there now (`tmpfs`, `ext4`, ...), when mounted.
    pub fs_type: Option<String>,
    /// Its source as the kernel recorded it (a device, or any word for a virtual file
    /// system), when mounted.
    pub source: Option<String>,
    /// The monitored subtrees rescanned because of it: what they show now is reported as
    /// changes, attributed to this process.
    pub rescanned: Vec<String>,
    /// The process that made the syscall.
    pub process: Process,
    /// Its container, null on the host.
    pub container: Option<Container>,
    /// Its pod, when known.
    pub pod: Option<Pod>,
    /// Where it runs.
    pub origin: Origin,
}
