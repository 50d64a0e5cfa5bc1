//! Generated protobuf types (private) and their conversion to the crate's own types.

#[allow(missing_docs, clippy::all, unreachable_pub)]
pub(crate) mod pb {
    include!(concat!(env!("OUT_DIR"), "/multifeed.rs"));
}

/// How many times field `tag` occurs at the top level of an encoded message,
/// without decoding it: lets a decoder refuse a message of a million tiny
/// entries before prost allocates a struct for each.
pub(crate) fn count_field(mut buf: &[u8], tag: u32) -> Result<usize, prost::DecodeError> {
    use prost::encoding::{decode_key, skip_field};
    let mut count = 0usize;
    while !buf.is_empty() {
        let (field, wire_type) = decode_key(&mut buf)?;
        count += usize::from(field == tag);
        skip_field(wire_type, field, &mut buf, Default::default())?;
    }
    Ok(count)
}
