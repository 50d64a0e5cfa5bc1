// Generates the protobuf types from proto/ with protox, so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/multifeed.proto");
    let descriptors = protox::compile(["proto/multifeed.proto"], ["proto"])?;
    // Maps as BTreeMap: the same message always encodes to the same bytes.
    prost_build::Config::new()
        .btree_map(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
