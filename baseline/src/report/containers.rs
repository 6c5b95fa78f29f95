//! The JSON shape of `verify --containers --format json`: one object per checked container,
//! naming the container, its image and its pod, with its changes against its image in
//! verify's own shape ([`ChangeView`]), so a reader of host reports reads these too.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{UnverifiedView, VerifyReportView, VerifySummary};
use crate::container::cgroup::Runtime;
use crate::container::discover::{PodRef, RunningContainer};
use crate::policy::Policy;
use crate::verify::VerifyReport;

/// The document `kubefim verify --containers --format json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "ContainersReport", deny_unknown_fields)]
pub struct ContainersReportView {
    /// The counts over every checked container.
    pub summary: ContainersSummary,
    /// Every container a workload policy selected, by id.
    pub containers: Vec<ContainerReportView>,
}

/// The counts of a containers check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ContainersSummary {
    /// Running containers found on the node.
    pub running: u64,
    /// Containers a workload policy selected (each is in `containers`).
    pub checked: u64,
    /// Checked containers with at least one change against their image.
    pub drifted: u64,
    /// Checked containers that could not be checked whole (an error, or entries in `errors`).
    pub unverified: u64,
    /// True only when every checked container matches its image and could be checked whole.
    pub clean: bool,
}

/// A container, as reports name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "ContainerRef", deny_unknown_fields)]
pub struct ContainerRefView {
    /// Its id (64 hex digits).
    pub id: String,
    /// Its name, when its runtime recorded one.
    pub name: Option<String>,
    /// Its image's name, when recorded.
    pub image: Option<String>,
    /// Its image's id, when recorded.
    pub image_id: Option<String>,
    /// The runtime its cgroup names.
    pub runtime: Runtime,
}

/// A container's pod, as its runtime recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "PodRef", deny_unknown_fields)]
pub struct PodRefView {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The pod's uid, when recorded.
    pub uid: Option<String>,
}

/// One container checked against its image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "ContainerReport", deny_unknown_fields)]
pub struct ContainerReportView {
    /// The container.
    pub container: ContainerRefView,
    /// Its pod, on Kubernetes; null elsewhere.
    pub pod: Option<PodRefView>,
    /// Always `container`: what the changes are in.
    pub origin: String,
    /// Always `image`: what the changes are against (the merged layers of its image).
    pub baseline: String,
    /// The workload policy whose rules were applied.
    pub policy: String,
    /// Why the container could not be checked at all (its root is not an overlay...); then
    /// `changes` is empty and it is not clean.
    pub error: Option<String>,
    /// The counts.
    pub summary: VerifySummary,
    /// Every difference from the image, paths as seen inside the container.
    pub changes: Vec<super::ChangeView>,
    /// Entries that could not be checked.
    pub errors: Vec<UnverifiedView>,
}

impl ContainerRefView {
    /// The reference to `c`.
    pub fn new(c: &RunningContainer) -> Self {
        ContainerRefView {
            id: c.id.clone(),
            name: c.name.clone(),
            image: c.image.clone(),
            image_id: c.image_id.clone(),
            runtime: c.runtime,
        }
    }
}

impl PodRefView {
    /// The view of `pod`.
    pub fn new(pod: &PodRef) -> Self {
        PodRefView { namespace: pod.namespace.clone(), name: pod.name.clone(), uid: pod.uid.clone() }
    }
}

impl ContainerReportView {
    /// The report of `container` checked under `policy` (a workload policy's rules): its
    /// comparison, or why there is none.
    pub fn new(
        container: &RunningContainer,
        policy_name: &str,
        policy: &Policy,
        report: Result<&VerifyReport, &str>,
    ) -> Self {
        let (view, error) = match report {
            Ok(r) => (VerifyReportView::new(r, policy), None),
            Err(e) => (VerifyReportView::new(&VerifyReport::default(), policy), Some(e.to_owned())),
        };
        let mut summary = view.summary;
        summary.clean &= error.is_none();
        ContainerReportView {
            container: ContainerRefView::new(container),
            pod: container.pod.as_ref().map(PodRefView::new),
            origin: "container".into(),
            baseline: "image".into(),
            policy: policy_name.to_owned(),
            error,
            summary,
            changes: view.changes,
            errors: view.errors,
        }
    }

    /// Whether it has changes.
    pub fn drifted(&self) -> bool {
        !self.changes.is_empty()
    }

    /// Whether it could not be checked whole.
    pub fn unverified(&self) -> bool {
        self.error.is_some() || !self.errors.is_empty()
    }
}

impl ContainersReportView {
    /// The document over `containers` (those checked) of `running` found.
    pub fn new(running: usize, containers: Vec<ContainerReportView>) -> Self {
        let drifted = containers.iter().filter(|c| c.drifted()).count() as u64;
        let unverified = containers.iter().filter(|c| c.unverified()).count() as u64;
        ContainersReportView {
            summary: ContainersSummary {
                running: running as u64,
                checked: containers.len() as u64,
                drifted,
                unverified,
                clean: drifted == 0 && unverified == 0,
            },
            containers,
        }
    }
}
