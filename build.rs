// Root build script. Nothing to generate: the C header `include/turbine.h` is written by hand
// and `tests/c_api.rs` checks it against the library's exports and constants. CUDA kernel
// sources (issue "CUDA backend") will be checked here.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
