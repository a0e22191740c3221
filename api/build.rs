//! Generates the gRPC code from `proto/` with protox (a Rust protobuf compiler), so no `protoc`
//! is needed on the build machine.

fn main() {
    let protos = [
        "proto/weft/observer/v1/observer.proto",
        "proto/weft/state/v1/state.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = match protox::compile(protos, ["proto"]) {
        Ok(descriptors) => descriptors,
        Err(error) => panic!("\n\nthe protobuf definitions do not compile:\n{error:?}\n"),
    };
    if let Err(error) = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)
    {
        panic!("\n\ngenerating gRPC code failed: {error}\n");
    }
}
