//! Compiles every `*.bpf.c` in this crate's directory with clang into `$OUT_DIR/<name>.bpf.o`,
//! against a `vmlinux.h` generated from the running kernel's BTF (CO-RE relocations make the
//! objects portable to other kernels).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    if let Err(message) = build() {
        // A build script's panic message is what cargo shows; make it say what to do.
        panic!("\n\nbuilding Weft's eBPF programs failed:\n{message}\n");
    }
}

fn build() -> Result<(), String> {
    let crate_dir = PathBuf::from(env("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", crate_dir.join("lib").display());
    println!("cargo:rerun-if-env-changed=WEFT_VMLINUX_BTF");

    let btf =
        std::env::var("WEFT_VMLINUX_BTF").unwrap_or_else(|_| "/sys/kernel/btf/vmlinux".into());
    let vmlinux_h = out_dir.join("vmlinux.h");
    let dumped = Command::new("bpftool")
        .args(["btf", "dump", "file", &btf, "format", "c"])
        .output()
        .map_err(|error| {
            format!("cannot run bpftool ({error}); install it with `make deps` (Debian package bpftool)")
        })?;
    if !dumped.status.success() {
        return Err(format!(
            "bpftool could not dump the kernel BTF at {btf}: {}\nthe kernel needs CONFIG_DEBUG_INFO_BTF, or point WEFT_VMLINUX_BTF at a BTF file",
            String::from_utf8_lossy(&dumped.stderr)
        ));
    }
    std::fs::write(&vmlinux_h, &dumped.stdout)
        .map_err(|error| format!("cannot write {}: {error}", vmlinux_h.display()))?;

    let mut sources = std::fs::read_dir(&crate_dir)
        .map_err(|error| format!("cannot list {}: {error}", crate_dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.to_string_lossy().ends_with(".bpf.c"))
        .collect::<Vec<_>>();
    sources.sort();
    if sources.is_empty() {
        return Err(format!("no *.bpf.c files in {}", crate_dir.display()));
    }
    for source in &sources {
        println!("cargo:rerun-if-changed={}", source.display());
        compile(source, &crate_dir, &out_dir)?;
    }
    Ok(())
}

fn compile(source: &Path, crate_dir: &Path, out_dir: &Path) -> Result<(), String> {
    let file_name = source
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| format!("unreadable file name {}", source.display()))?;
    let object = out_dir.join(file_name.replace(".bpf.c", ".bpf.o"));
    let output = Command::new("clang")
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror", "-D__TARGET_ARCH_x86"])
        // Debian's clang does not search the multiarch include dir for asm/types.h.
        .arg("-I/usr/include/x86_64-linux-gnu")
        .arg(format!("-I{}", out_dir.display()))
        .arg(format!("-I{}", crate_dir.display()))
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(&object)
        .output()
        .map_err(|error| {
            format!("cannot run clang ({error}); install it with `make deps` (Debian packages clang, llvm, libbpf-dev)")
        })?;
    if !output.status.success() {
        return Err(format!(
            "clang failed on {}:\n{}",
            source.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set; run through cargo"))
}
