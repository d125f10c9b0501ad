//! Builds the three components for `wasm32-wasip2` so the host always runs what the source
//! says. Uses its own target directory: the outer cargo holds the lock on `target/`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir.parent().unwrap().to_owned();
    let target_dir = workspace.join("target").join("guests");
    for watched in ["shared/src", "shared/Cargo.toml", "request-fn", "approve-fn", "expire-fn", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", workspace.join(watched).display());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&workspace)
        .args(["build", "--release", "--target", "wasm32-wasip2", "-p", "request-fn", "-p", "approve-fn", "-p", "expire-fn", "--target-dir"])
        .arg(&target_dir);
    // Flags meant for the host build must not leak into the guests' build.
    for variable in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTC_WORKSPACE_WRAPPER", "CARGO_LLVM_COV", "CARGO_LLVM_COV_TARGET_DIR"] {
        command.env_remove(variable);
    }
    let status = command.status().expect("running cargo to build the components");
    if !status.success() {
        panic!("building the components failed (is the target installed? `rustup target add wasm32-wasip2`)");
    }
    println!("cargo:rustc-env=PORTCULLIS_GUEST_DIR={}", target_dir.join("wasm32-wasip2").join("release").display());
}
