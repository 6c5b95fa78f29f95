//! One running container checked: the workload policies that select it (its labels, name,
//! image and pod namespace as a [`Workload`]) and, under each, its layer compared with its
//! image. `verify --containers` and `watch --containers` both check containers this way.
//! It also tells whether a file a container executes is its image's (`drift.exec`).

use std::fs::File;
use std::io;
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags};

use crate::container::discover::RunningContainer;
use crate::container::drift;
use crate::container::image::Image;
use crate::container::layer_cache::LayerCache;
use crate::container::overlay::{Layer, OverlayRoot};
use crate::verify::VerifyReport;
use crate::workload::{Workload, WorkloadPolicies, WorkloadPolicy};

/// A container checked under one workload policy.
#[derive(Debug)]
pub struct Checked<'p> {
    /// The policy whose rules were applied.
    pub policy: &'p WorkloadPolicy,
    /// The differences from the image, or why the container could not be compared (its root
    /// is not an overlay, its mount table could not be read...).
    pub report: Result<VerifyReport, String>,
}

/// What a workload policy is matched against for `c`.
pub fn workload(c: &RunningContainer) -> Workload<'_> {
    Workload {
        labels: &c.labels,
        container_name: c.name.as_deref().unwrap_or(""),
        image: c.image.as_deref().unwrap_or(""),
        namespace: c.pod.as_ref().map(|p| p.namespace.as_str()),
    }
}

/// Whether any policy selects `c`.
pub fn selected(c: &RunningContainer, policies: &WorkloadPolicies) -> bool {
    let w = workload(c);
    policies.iter().any(|p| p.selects(&w))
}

/// `c` compared with its image under every policy that selects it, in the order read; empty
/// when none does. The image's records come from `cache` where it has them.
pub fn check<'p>(c: &RunningContainer, policies: &'p WorkloadPolicies, cache: Option<&LayerCache>) -> Vec<Checked<'p>> {
    let w = workload(c);
    policies
        .for_workload(&w)
        .into_iter()
        .map(|policy| {
            let report = c.root.as_ref().map_err(Clone::clone).map(|root| {
                let image = Image { layers: root.lower.clone() };
                drift::compare(root, &image, &policy.policy, &|path| policy.exempt(path, w.image), cache)
            });
            Checked { policy, report }
        })
        .collect()
}

/// An executable run in a container that is not its image's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecDrift {
    /// BLAKE3 of what was executed (hex).
    pub hash: String,
    /// BLAKE3 of the image's file at that path (hex); `None` when the image has no regular
    /// file there.
    pub image_hash: Option<String>,
}

/// Whether the file a container's process executes is not its image's: `exe` is that file,
/// open (through `/proc/PID/exe`, so what ran, whatever its name now), `path` where it is in
/// the container. A path the container's own layer has nothing at is the image's, unread;
/// otherwise the content is compared with the image's file there (a copy-up or a chmod of an
/// image binary is still the image's binary).
pub fn exec_drift(root: &OverlayRoot, exe: &mut File, path: &Path) -> io::Result<Option<ExecDrift>> {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let upper = Image { layers: vec![Layer::at(&root.upper).map_err(io::Error::other)?] };
    if upper.lookup(rel)?.is_none() {
        return Ok(None);
    }
    let hash = blake3_hex(exe)?;
    let image = Image { layers: root.lower.clone() };
    let image_hash = match image.lookup(rel)? {
        Some(found) if FileType::from_raw_mode(found.stat.st_mode) == FileType::RegularFile => {
            let fd = rustix::fs::openat(
                &found.parent,
                found.name.as_c_str(),
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            Some(blake3_hex(&mut File::from(fd))?)
        }
        _ => None,
    };
    Ok((image_hash.as_deref() != Some(hash.as_str())).then_some(ExecDrift { hash, image_hash }))
}

fn blake3_hex(file: &mut File) -> io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(file)?;
    Ok(hasher.finalize().to_hex().to_string())
}
