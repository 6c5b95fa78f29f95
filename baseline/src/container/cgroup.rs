//! Which container a process is in, from its cgroup path: the id and the runtime that named
//! it, for the formats of the common runtimes. Shared by the watcher (who made a change) and
//! container discovery (which containers run here).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The container runtime a cgroup path's format belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    /// containerd (`cri-containerd-<id>.scope`).
    Containerd,
    /// CRI-O (`crio-<id>.scope`).
    CriO,
    /// Docker (`docker-<id>.scope`, `/docker/<id>`).
    Docker,
    /// podman (`libpod-<id>`).
    Podman,
    /// A kubelet-managed cgroup whose runtime the path does not say (`/kubepods/.../<id>`).
    Kubernetes,
    /// A 64-hex-digit id in a path of no known format.
    Unknown,
}

/// The container id and runtime a cgroup path names, for the formats of the common
/// runtimes: systemd-managed (`docker-<id>.scope`, `cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, `libpod-<id>.scope`) and cgroupfs-managed (`/docker/<id>`,
/// `/kubepods/.../<id>`, `/libpod_parent/libpod-<id>`). Conmon's own cgroup is not a container.
pub fn container_of(cgroup: &str) -> Option<(String, Runtime)> {
    const PREFIXES: [(&str, Option<Runtime>); 5] = [
        ("cri-containerd-", Some(Runtime::Containerd)),
        ("crio-", Some(Runtime::CriO)),
        ("docker-", Some(Runtime::Docker)),
        ("libpod-", Some(Runtime::Podman)),
        ("", None),
    ];
    for segment in cgroup.rsplit('/') {
        let segment = segment.strip_suffix(".scope").unwrap_or(segment);
        if segment.starts_with("libpod-conmon-") || segment.starts_with("crio-conmon-") {
            return None;
        }
        for (prefix, runtime) in PREFIXES {
            if let Some(id) = segment.strip_prefix(prefix)
                && id.len() == 64
                && id.bytes().all(|b| b.is_ascii_hexdigit())
            {
                let runtime = match runtime {
                    Some(r) => r,
                    None if cgroup.contains("/docker/") => Runtime::Docker,
                    None if cgroup.contains("kubepods") => Runtime::Kubernetes,
                    None => Runtime::Unknown,
                };
                return Some((id.to_owned(), runtime));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_from_runtime_cgroup_paths() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        for (path, runtime) in [
            (format!("/system.slice/docker-{id}.scope"), Runtime::Docker),
            (format!("/docker/{id}"), Runtime::Docker),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podx.slice/cri-containerd-{id}.scope"
                ),
                Runtime::Containerd,
            ),
            (format!("/kubepods.slice/kubepods-pod1.slice/crio-{id}.scope"), Runtime::CriO),
            (format!("/kubepods/burstable/pod1234/{id}"), Runtime::Kubernetes),
            (format!("/machine.slice/libpod-{id}.scope/container"), Runtime::Podman),
            (format!("/libpod_parent/libpod-{id}"), Runtime::Podman),
        ] {
            assert_eq!(container_of(&path), Some((id.to_owned(), runtime)), "{path}");
        }
        assert_eq!(container_of("/user.slice/user-0.slice/session-1.scope"), None);
        assert_eq!(container_of(&format!("/machine.slice/libpod-conmon-{id}.scope")), None);
        assert_eq!(container_of("/"), None);
    }
}
