//! Compiles the protobuf definitions with `protox`, a pure-Rust compiler,
//! so building Breakwater never needs a system `protoc`. The control
//! plane's descriptor set is kept too, for gRPC server reflection, and the
//! examples' (for tests that decode their messages by name).

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let example = [
        "proto/breakwater/echo/v1/echo.proto",
        "proto/breakwater/demo/v1/ocr.proto",
    ];
    let api = [
        "proto/breakwater/v1/checkpoints.proto",
        "proto/breakwater/v1/dead_letters.proto",
        "proto/breakwater/v1/sagas.proto",
        "proto/breakwater/v1/threads.proto",
    ];
    for proto in example.iter().chain(&api) {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let examples = protox::compile(example, ["proto"])?;
    std::fs::write(out.join("example_descriptor.bin"), examples.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".")
        .compile_fds(examples)?;

    let descriptors = protox::compile(api, ["proto"])?;
    std::fs::write(
        out.join("breakwater_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    // The API's codec answers a malformed request INVALID_ARGUMENT, where
    // the stock one answers INTERNAL.
    tonic_prost_build::configure()
        .bytes(".")
        // A checkpoint's channel versions in order, as stored and shown.
        .btree_map(".breakwater.v1.ThreadCheckpoint.channel_versions")
        .btree_map(".breakwater.v1.PutThreadCheckpointRequest.channel_versions")
        .codec_path("crate::codec::ApiCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
