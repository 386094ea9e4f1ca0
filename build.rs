// Root build script. Nothing to generate yet: the C header (issue "Static library")
// and CUDA kernel sources (issue "CUDA backend") will be checked here.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
