//! Compiles the KMS protobuf definitions with a pure-Rust protobuf compiler, so building needs no `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/v2.proto", "proto/v1beta1.proto", "proto/admin.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
