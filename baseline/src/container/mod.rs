//! Containers checked against their images: the image is the container's baseline (no
//! per-container signing: containers live for seconds; trust is anchored in the image's
//! content-addressed layers). `discover` finds the running containers and their roots,
//! `overlay` reads a root's layers and overlay's markers, `image` is the merged view of the
//! image's layers (`layer_cache` keeps their records on disk), `drift` compares the
//! container's own layer with it, `check` applies the workload policies that select a
//! container, `merged` lists its monitored entries as its processes see them (what the
//! watcher's kernel filter watches), and `cgroup` tells which container a process is in.

pub mod cgroup;
pub mod check;
pub mod discover;
pub mod drift;
pub mod image;
pub mod layer_cache;
pub mod merged;
pub mod overlay;
