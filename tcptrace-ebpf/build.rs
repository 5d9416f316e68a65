//! Rebuild the kernel program when bpf-linker changes, and fail early with
//! a message that says how to get it.
use which::which;

fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!(
            "cargo:warning=bpf-linker not found ({err}); run `cargo xtask build`, which installs it"
        ),
    }
}
