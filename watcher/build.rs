//! Builds the eBPF programs of ../ebpf for the BPF target with aya-build and leaves the
//! object in OUT_DIR, where src/programs.rs embeds it. Stable rustc with RUSTC_BOOTSTRAP=1
//! (for `-Z build-std=core`) and a bpf-linker built against the toolchain's LLVM are needed
//! (scripts/setup.sh installs both). Without them the build fails here and says what is
//! missing; AYA_BUILD_SKIP=1 instead builds a kubefim whose `watch` refuses to run and says
//! why.

use std::path::Path;
use std::process::Command;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = std::env::var("OUT_DIR")?;
    let object = Path::new(&out_dir).join("kubefim");
    let skip = std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // An empty object: the watcher reports that it was built without its programs.
        std::fs::write(&object, b"")?;
        println!("cargo:warning=AYA_BUILD_SKIP is set: this kubefim's `watch` will not run");
        return Ok(());
    }
    if Command::new("bpf-linker").arg("--version").output().is_err() {
        anyhow::bail!(
            "bpf-linker is not on PATH: kubefim's eBPF programs cannot be built. Run `bash scripts/setup.sh` \
             (it builds bpf-linker against the LLVM inside the Rust toolchain), or set AYA_BUILD_SKIP=1 to \
             build a kubefim without watch mode"
        );
    }
    let ebpf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf").canonicalize()?;
    for entry in ["src", "Cargo.toml", "Cargo.lock", "../common/src"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(entry).display());
    }
    // The eBPF crate is its own workspace (it only builds for the BPF target); aya-build runs
    // `cargo build --package` from the current directory, so run it from there.
    std::env::set_current_dir(&ebpf_dir)?;
    // SAFETY (set_var): the build script is single-threaded at this point.
    // Stable rustc allows `-Z build-std=core` only with RUSTC_BOOTSTRAP=1; aya-build passes
    // it on when this is set.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    let root = ebpf_dir.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    let package = aya_build::Package { name: "kubefim-ebpf", root_dir: root, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain)).map_err(|e| {
        anyhow::anyhow!(
            "building the eBPF programs failed: {e:#}\nIs rust-src installed (`rustup component add rust-src`) \
             and bpf-linker built against this toolchain's LLVM? `bash scripts/setup.sh` does both."
        )
    })?;
    if !object.exists() {
        anyhow::bail!("aya-build left no {} behind", object.display());
    }
    Ok(())
}
