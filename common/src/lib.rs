//! The kernel <-> user-space ABI of kubefim: the `#[repr(C)]` event and key types that the
//! eBPF programs (ebpf/) write and the watcher (watcher/) reads, and the map names both
//! sides agree on. It is `no_std` so the BPF target can use it; the `user` feature adds
//! what only user space needs. Filled in by the watch-mode work (issue 3).
#![no_std]
