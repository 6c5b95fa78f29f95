//! kubefim watch mode: loads and attaches the eBPF programs of ebpf/, keeps the in-kernel
//! filter maps filled from the baseline, reads the ring buffer, debounces and rehashes the
//! files that changed. Filled in by the watch-mode work (issue 3); today it only owns its
//! place in the workspace.
