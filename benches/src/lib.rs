//! What the benchmark binaries share: the one sampler that runs a measured child and reads
//! its `wait4` rusage (`sampler`), the one median (`stats`), the one Markdown writer
//! (`markdown`), what they read of a process from /proc (`procfs`), the machine they run on
//! (`host`), the generated trees of small files (`tree`) and the kubefim binary, keys,
//! policies and baselines (`fixture`). The binaries are `fimbench` (kubefim against no
//! monitor, auditd, b3sum and aide) and `watch_scale` (the watcher against the baseline size).

pub mod fixture;
pub mod host;
pub mod markdown;
pub mod procfs;
pub mod sampler;
pub mod stats;
pub mod tree;
