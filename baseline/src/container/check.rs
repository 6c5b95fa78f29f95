//! One running container checked: the workload policies that select it (its labels, name,
//! image and pod namespace as a [`Workload`]) and, under each, its layer compared with its
//! image. `verify --containers` and `watch --containers` both check containers this way.

use crate::container::discover::RunningContainer;
use crate::container::drift;
use crate::container::image::Image;
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
/// when none does.
pub fn check<'p>(c: &RunningContainer, policies: &'p WorkloadPolicies) -> Vec<Checked<'p>> {
    let w = workload(c);
    policies
        .for_workload(&w)
        .into_iter()
        .map(|policy| {
            let report = c.root.as_ref().map_err(Clone::clone).map(|root| {
                let image = Image { layers: root.lower.clone() };
                drift::compare(root, &image, &policy.policy, &|path| policy.exempt(path, w.image))
            });
            Checked { policy, report }
        })
        .collect()
}
