//! Criterion benchmarks of kubefim's hot paths (filled in below as the pieces land).
fn main() {}
