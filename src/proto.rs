//! Generated protobuf types (private) and their conversion to the crate's own types.

#[allow(missing_docs, clippy::all, unreachable_pub)]
pub(crate) mod pb {
    include!(concat!(env!("OUT_DIR"), "/multifeed.rs"));
}
