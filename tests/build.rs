//! Builds the five components for `wasm32-wasip2` so the host always runs what the source
//! says. Uses its own target directory: the outer cargo holds the lock on `target/`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir.parent().unwrap().to_owned();
    let target_dir = workspace.join("target").join("guests");
    for watched in [
        "shared/src",
        "shared/Cargo.toml",
        "request-fn",
        "approve-fn",
        "admin-fn",
        "expire-fn",
        "web-fn",
        "openapi.json",
        "tests/floor",
        ".cargo/config.toml",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(watched).display());
    }
    // Profiling builds keep the guests' names (`CARGO_PROFILE_RELEASE_STRIP=false`, which the
    // nested build inherits); switching back must rebuild them stripped.
    println!("cargo:rerun-if-env-changed=CARGO_PROFILE_RELEASE_STRIP");
    ensure_wasm_target();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&workspace)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            "request-fn",
            "-p",
            "approve-fn",
            "-p",
            "admin-fn",
            "-p",
            "expire-fn",
            "-p",
            "web-fn",
            // The service benchmark's floor (never part of the app).
            "-p",
            "floor-fn",
            "--target-dir",
        ])
        .arg(&target_dir);
    // Flags meant for the host build must not leak into the guests' build.
    for variable in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_LLVM_COV",
        "CARGO_LLVM_COV_TARGET_DIR",
    ] {
        command.env_remove(variable);
    }
    let status = command.status().expect("running cargo to build the components");
    if !status.success() {
        panic!("building the components for wasm32-wasip2 failed: the compiler's errors are above");
    }
    println!("cargo:rustc-env=PORTCULLIS_GUEST_DIR={}", target_dir.join("wasm32-wasip2").join("release").display());
}

/// A fresh machine lacks the `wasm32-wasip2` standard library: add it through rustup, so the
/// README's commands work without a setup step.
fn ensure_wasm_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(rustc).args(["--print", "sysroot"]).output().expect("running rustc");
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if sysroot.join("lib/rustlib/wasm32-wasip2").exists() {
        return;
    }
    println!("cargo:warning=installing the wasm32-wasip2 target with rustup (needed to build the components)");
    let status = Command::new("rustup").args(["target", "add", "wasm32-wasip2"]).status();
    if !status.is_ok_and(|s| s.success()) {
        panic!(
            "the wasm32-wasip2 target is missing and rustup could not add it: run `rustup target add wasm32-wasip2`"
        );
    }
}
