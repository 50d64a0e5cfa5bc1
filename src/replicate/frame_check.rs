//! IO-less check of a decrypted frame against the wire layout of hypercore-protocol 0.7.2,
//! run before that crate decodes the frame.
//!
//! Why: the crate's decoders (compact-encoding 2.2.0) reserve a vector by the element
//! count the peer declares, before reading a single element (stack defect 9). One
//! 12-byte frame declaring a 2^40-word bitfield asks for 4 TiB, and an allocation failure
//! aborts the process: no unwind, no error. So every declared length and count is held
//! here against the bytes actually left in the frame, walking the elements without
//! allocating per element, and a frame that fails is a [`FrameFault`] that ends only its
//! connection.
//!
//! The layout, as the crate reads it (uint = `<0xfd` | `0xfd u16` | `0xfe u32` | `0xff u64`,
//! little-endian; buffer and string = uint length, then that many bytes; `u8` = one raw
//! byte; `node*` = uint count, then that many nodes):
//!
//! ```text
//! frame    = (empty) | single | open | close | batch
//! single   = channel:uint message               first byte not 0, or under 3 bytes
//! open     = 00 01 channel:uint protocol:string discovery_key:buffer [flags:u8 capability:32]
//! close    = 00 03 channel:uint
//! batch    = 00 00 channel:uint (len:uint message | 00 channel:uint)*
//! message  = type:uint body
//!   0 Synchronize  flags:u8 fork length remote_length
//!   1 Request      flags:u8 id fork [index nodes]&1 [index nodes]&2 [bytes]&4
//!                  [start length]&8 [priority]&32                  (all uints)
//!   2 Cancel       request          4 NoData  request
//!   5 Want         start length     6 Unwant  start length
//!   3 Data         flags:u8 request fork [index value:buffer node*]&1 [index node*]&2
//!                  [bytes node*]&4 [start length node* node* signature:buffer]&8
//!   7 Bitfield     start count:uint count x u32 (4 bytes each)
//!   8 Range        flags:u8 start [length unless flags & 2]
//!   9 Extension    name:string message:buffer
//! node     = index:uint length:uint hash:32
//! ```
//!
//! Bytes after a message (inside its batch entry, or after a single message, an open or a
//! close) belong to nothing this version decodes, and the crate would parse them as
//! further messages that nobody checked. They are cut off: [`CheckedFrame::exact`] is then
//! false and the caller forwards [`Unit::frames`] instead of the frame. Channel id 0 is
//! refused: the wire has no way to write a single message on it that the crate would not
//! read as a control frame, and no encoder allocates it.

/// Smallest encoding of a Merkle tree node: two one-byte uints and a 32-byte hash.
const NODE_MIN_LEN: usize = 1 + 1 + 32;
/// Bytes per bitfield word (a fixed-width `u32`, not a uint).
const BITFIELD_WORD_LEN: usize = 4;
/// Flags byte and capability of an `Open`.
const CAPABILITY_LEN: usize = 1 + 32;

/// Why a frame was refused. Each is the peer's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameFault {
    #[error("{field} ends early")]
    Truncated { field: &'static str },
    #[error("{field} declares {declared} bytes but only {available} remain in the frame")]
    LengthPastEnd {
        field: &'static str,
        declared: u64,
        available: usize,
    },
    #[error(
        "{field} declares {declared} entries of at least {min_len} bytes each but only {available} bytes remain in the frame"
    )]
    CountPastEnd {
        field: &'static str,
        declared: u64,
        min_len: usize,
        available: usize,
    },
    #[error("channel id {id} exceeds limit of {max}")]
    ChannelIdTooLarge { id: u64, max: u64 },
    #[error("channel id 0 is reserved for control messages")]
    ReservedChannel,
    #[error("unknown message type {0}")]
    UnknownMessageType(u64),
    #[error("unknown control message {0:#04x}")]
    UnknownControl(u8),
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("{0}")]
    Malformed(&'static str),
}

/// The one unit a checked frame carries, as slices of that frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit<'a> {
    /// One message on one channel (`message` starts with its type).
    Single { channel: u64, message: &'a [u8] },
    /// An `Open`: its bytes without the `00 01` prefix, and the fields the transport
    /// reads to authenticate the peer.
    Open {
        body: &'a [u8],
        discovery_key: &'a [u8],
        /// The 32-byte capability, without the flags byte before it.
        capability: Option<&'a [u8]>,
    },
    /// A `Close`, without its `00 03` prefix.
    Close(&'a [u8]),
    /// The messages of a batch, each with its channel, in order.
    Batch(Vec<(u64, &'a [u8])>),
}

impl Unit<'_> {
    /// This unit as frames the crate decodes exactly as checked: one frame, or for a
    /// batch one frame per run of messages on one channel, split further by
    /// `max_len` bytes and `max_messages` messages (see [`batches`]).
    pub fn frames(&self, max_len: usize, max_messages: usize) -> Vec<Vec<u8>> {
        match self {
            Unit::Single { channel, message } => {
                // Channel 0 is refused, so the first byte is never 0: not a control frame.
                let mut out = Vec::with_capacity(9 + message.len());
                write_uint(&mut out, *channel);
                out.extend_from_slice(message);
                vec![out]
            }
            Unit::Open { body, .. } => vec![[&[0, 1][..], body].concat()],
            Unit::Close(body) => vec![[&[0, 3][..], body].concat()],
            Unit::Batch(entries) => batches(entries, max_len, max_messages),
        }
    }
}

/// A frame that passed the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedFrame<'a> {
    /// `None` for an empty frame (it decodes to no message).
    pub unit: Option<Unit<'a>>,
    /// True if the frame is exactly what the crate should see: no cut-off bytes and no
    /// channel switches (the crate misreads those, stack defect 1).
    pub exact: bool,
}

/// Checks one decrypted frame; see the module docs for the layout.
pub fn check_frame(frame: &[u8], max_channel_id: u64) -> Result<CheckedFrame<'_>, FrameFault> {
    let channel_id = |id: u64| {
        if id == 0 {
            Err(FrameFault::ReservedChannel)
        } else if id > max_channel_id {
            Err(FrameFault::ChannelIdTooLarge {
                id,
                max: max_channel_id,
            })
        } else {
            Ok(id)
        }
    };
    if frame.is_empty() {
        return Ok(CheckedFrame {
            unit: None,
            exact: true,
        });
    }
    if frame.len() < 3 || frame[0] != 0 {
        let mut c = Cursor(frame);
        let channel = channel_id(c.uint("channel id")?)?;
        let message = c.message()?;
        return Ok(CheckedFrame {
            unit: Some(Unit::Single { channel, message }),
            exact: c.0.is_empty(),
        });
    }
    let body = &frame[2..];
    let mut c = Cursor(body);
    let unit = match frame[1] {
        0x00 => {
            let mut channel = channel_id(c.uint("batch channel id")?)?;
            let mut entries = Vec::new();
            let mut exact = true;
            while let Some(&first) = c.0.first() {
                if first == 0 {
                    // A literal zero byte switches channel; the crate misreads it.
                    c.0 = &c.0[1..];
                    channel = channel_id(c.uint("batch channel id")?)?;
                    exact = false;
                    continue;
                }
                let len = c.uint("batch entry length")?;
                if len == 0 {
                    // Written wide (`fd 00 00`): the crate would decode the next bytes anyway.
                    return Err(FrameFault::Malformed("batch entry of length zero"));
                }
                let mut entry = Cursor(c.take(len, "batch entry")?);
                entries.push((channel, entry.message()?));
                exact &= entry.0.is_empty();
            }
            return Ok(CheckedFrame {
                unit: Some(Unit::Batch(entries)),
                exact,
            });
        }
        0x01 => {
            channel_id(c.uint("Open channel id")?)?;
            c.string("Open protocol")?;
            let discovery_key = c.buffer("Open discovery key")?;
            let capability = match c.0.len() {
                0 => None,
                n if n >= CAPABILITY_LEN => {
                    Some(&c.take(CAPABILITY_LEN as u64, "Open capability")?[1..])
                }
                _ => {
                    return Err(FrameFault::Truncated {
                        field: "Open capability",
                    });
                }
            };
            Unit::Open {
                body: &body[..body.len() - c.0.len()],
                discovery_key,
                capability,
            }
        }
        0x03 => {
            channel_id(c.uint("Close channel id")?)?;
            Unit::Close(&body[..body.len() - c.0.len()])
        }
        other => return Err(FrameFault::UnknownControl(other)),
    };
    Ok(CheckedFrame {
        unit: Some(unit),
        exact: c.0.is_empty(),
    })
}

/// Writes checked batch entries as batches of one channel each, starting a new batch
/// where the channel changes, where `max_len` bytes would be exceeded (a single larger
/// message still goes alone) and after `max_messages` messages.
pub fn batches(entries: &[(u64, &[u8])], max_len: usize, max_messages: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut current: Option<(u64, usize, Vec<u8>)> = None;
    for &(channel, message) in entries {
        let mut len_prefix = Vec::with_capacity(9);
        write_uint(&mut len_prefix, message.len() as u64);
        let entry_len = len_prefix.len() + message.len();
        if let Some((ch, count, batch)) = &current
            && (*ch != channel || *count >= max_messages || batch.len() + entry_len > max_len)
        {
            out.extend(current.take().map(|(_, _, batch)| batch));
        }
        let (_, count, batch) = current.get_or_insert_with(|| {
            let mut header = vec![0, 0];
            write_uint(&mut header, channel);
            (channel, 0, header)
        });
        batch.extend_from_slice(&len_prefix);
        batch.extend_from_slice(message);
        *count += 1;
    }
    out.extend(current.map(|(_, _, batch)| batch));
    out
}

/// Reads fields off the front of a slice; every read is checked against what is left.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn uint(&mut self, field: &'static str) -> Result<u64, FrameFault> {
        read_uint(&mut self.0).ok_or(FrameFault::Truncated { field })
    }

    fn byte(&mut self, field: &'static str) -> Result<u8, FrameFault> {
        let (&first, rest) = self
            .0
            .split_first()
            .ok_or(FrameFault::Truncated { field })?;
        self.0 = rest;
        Ok(first)
    }

    fn take(&mut self, len: u64, field: &'static str) -> Result<&'a [u8], FrameFault> {
        let available = self.0.len();
        match usize::try_from(len) {
            Ok(n) if n <= available => {
                let (taken, rest) = self.0.split_at(n);
                self.0 = rest;
                Ok(taken)
            }
            _ => Err(FrameFault::LengthPastEnd {
                field,
                declared: len,
                available,
            }),
        }
    }

    fn buffer(&mut self, field: &'static str) -> Result<&'a [u8], FrameFault> {
        let len = self.uint(field)?;
        self.take(len, field)
    }

    fn string(&mut self, field: &'static str) -> Result<(), FrameFault> {
        let bytes = self.buffer(field)?;
        std::str::from_utf8(bytes).map_err(|_| FrameFault::InvalidUtf8 { field })?;
        Ok(())
    }

    /// A declared element count, refused before any element is read if the elements
    /// cannot fit in what is left.
    fn count(&mut self, field: &'static str, min_len: usize) -> Result<u64, FrameFault> {
        let declared = self.uint(field)?;
        let available = self.0.len();
        if declared > (available / min_len) as u64 {
            return Err(FrameFault::CountPastEnd {
                field,
                declared,
                min_len,
                available,
            });
        }
        Ok(declared)
    }

    fn nodes(&mut self, field: &'static str) -> Result<(), FrameFault> {
        for _ in 0..self.count(field, NODE_MIN_LEN)? {
            self.uint("node index")?;
            self.uint("node length")?;
            self.take(32, "node hash")?;
        }
        Ok(())
    }

    /// Checks one message (type and body) and returns its bytes.
    fn message(&mut self) -> Result<&'a [u8], FrameFault> {
        let start = self.0;
        match self.uint("message type")? {
            0 => {
                self.byte("Synchronize flags")?;
                self.uint("Synchronize fork")?;
                self.uint("Synchronize length")?;
                self.uint("Synchronize remote length")?;
            }
            1 => {
                let flags = self.byte("Request flags")?;
                self.uint("Request id")?;
                self.uint("Request fork")?;
                if flags & 1 != 0 {
                    self.uint("Request block index")?;
                    self.uint("Request block nodes")?;
                }
                if flags & 2 != 0 {
                    self.uint("Request hash index")?;
                    self.uint("Request hash nodes")?;
                }
                if flags & 4 != 0 {
                    self.uint("Request seek bytes")?;
                }
                if flags & 8 != 0 {
                    self.uint("Request upgrade start")?;
                    self.uint("Request upgrade length")?;
                }
                if flags & 32 != 0 {
                    self.uint("Request priority")?;
                }
            }
            2 => {
                self.uint("Cancel request")?;
            }
            3 => {
                let flags = self.byte("Data flags")?;
                self.uint("Data request")?;
                self.uint("Data fork")?;
                if flags & 1 != 0 {
                    self.uint("Data block index")?;
                    self.buffer("Data block value")?;
                    self.nodes("Data block nodes")?;
                }
                if flags & 2 != 0 {
                    self.uint("Data hash index")?;
                    self.nodes("Data hash nodes")?;
                }
                if flags & 4 != 0 {
                    self.uint("Data seek bytes")?;
                    self.nodes("Data seek nodes")?;
                }
                if flags & 8 != 0 {
                    self.uint("Data upgrade start")?;
                    self.uint("Data upgrade length")?;
                    self.nodes("Data upgrade nodes")?;
                    self.nodes("Data upgrade additional nodes")?;
                    self.buffer("Data upgrade signature")?;
                }
            }
            4 => {
                self.uint("NoData request")?;
            }
            5 | 6 => {
                self.uint("Want/Unwant start")?;
                self.uint("Want/Unwant length")?;
            }
            7 => {
                self.uint("Bitfield start")?;
                let words = self.count("Bitfield words", BITFIELD_WORD_LEN)?;
                // `count` bounded `words` by the bytes left, so this cannot overflow.
                self.take(words * BITFIELD_WORD_LEN as u64, "Bitfield words")?;
            }
            8 => {
                let flags = self.byte("Range flags")?;
                self.uint("Range start")?;
                if flags & 2 == 0 {
                    self.uint("Range length")?;
                }
            }
            9 => {
                self.string("Extension name")?;
                self.buffer("Extension message")?;
            }
            other => return Err(FrameFault::UnknownMessageType(other)),
        }
        Ok(&start[..start.len() - self.0.len()])
    }
}

/// Reads a compact-encoding uint (`<0xfd` | `0xfd u16` | `0xfe u32` | `0xff u64`, LE).
pub(crate) fn read_uint(buf: &mut &[u8]) -> Option<u64> {
    let (&first, rest) = buf.split_first()?;
    let width = match first {
        0xfd => 2,
        0xfe => 4,
        0xff => 8,
        n => {
            *buf = rest;
            return Some(u64::from(n));
        }
    };
    if rest.len() < width {
        return None;
    }
    let mut bytes = [0u8; 8];
    bytes[..width].copy_from_slice(&rest[..width]);
    *buf = &rest[width..];
    Some(u64::from_le_bytes(bytes))
}

/// Writes a compact-encoding uint in its shortest form.
pub(crate) fn write_uint(out: &mut Vec<u8>, n: u64) {
    if n < 0xfd {
        out.push(n as u8);
    } else if n <= u64::from(u16::MAX) {
        out.push(0xfd);
        out.extend_from_slice(&(n as u16).to_le_bytes());
    } else if n <= u64::from(u32::MAX) {
        out.push(0xfe);
        out.extend_from_slice(&(n as u32).to_le_bytes());
    } else {
        out.push(0xff);
        out.extend_from_slice(&n.to_le_bytes());
    }
}

#[cfg(test)]
#[path = "frame_check_tests.rs"]
mod tests;
