//! Generated protobuf types (private) and their conversion to the crate's own types.

#[allow(missing_docs, clippy::all, unreachable_pub)]
pub(crate) mod pb {
    include!(concat!(env!("OUT_DIR"), "/multifeed.rs"));
}

/// Calls `f(tag, body)` for each top-level field of an encoded message, without
/// decoding it; `body` is a length-delimited field's bytes, empty for other wire
/// types. `malformed` makes the caller's error for bytes that are not protobuf.
pub(crate) fn for_each_field<E>(
    mut buf: &[u8],
    malformed: impl Fn(String) -> E,
    mut f: impl FnMut(u32, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    use prost::encoding::{WireType, decode_key, decode_varint, skip_field};
    while !buf.is_empty() {
        let (tag, wire_type) = decode_key(&mut buf).map_err(|e| malformed(e.to_string()))?;
        if wire_type == WireType::LengthDelimited {
            let len = decode_varint(&mut buf).map_err(|e| malformed(e.to_string()))?;
            let len = usize::try_from(len)
                .ok()
                .filter(|&len| len <= buf.len())
                .ok_or_else(|| malformed("a field runs past the message".into()))?;
            let (body, rest) = buf.split_at(len);
            buf = rest;
            f(tag, body)?;
        } else {
            skip_field(wire_type, tag, &mut buf, Default::default())
                .map_err(|e| malformed(e.to_string()))?;
            f(tag, &[])?;
        }
    }
    Ok(())
}

/// The length of the bytes field `tag` of an encoded message as prost would decode
/// it (the last occurrence wins; 0 if absent), without decoding the message: a key
/// of the wrong length is refused before anything is allocated for it.
pub(crate) fn last_bytes_len<E>(
    message: &[u8],
    tag: u32,
    malformed: impl Fn(String) -> E,
) -> Result<usize, E> {
    let mut len = 0;
    for_each_field(message, malformed, |field, body| {
        if field == tag {
            len = body.len();
        }
        Ok(())
    })?;
    Ok(len)
}
