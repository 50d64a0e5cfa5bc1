//! What hypercore 0.16 is shown of a core's oplog and bitfield when it opens.
//!
//! Hypercore reads both files whole at open, and both readers are broken
//! (docs/upstream-defects.md):
//!
//! - its bitfield parser (defect 7) panics on any bitfield file over 4,100 bytes
//!   (a feed past 32,768 blocks) and misreads every page after the first, so it is
//!   shown an empty bitfield. The held bits reach it instead as oplog entries
//!   ("blocks `start..start + length` are held"), which it replays through its
//!   correct in-memory bitfield code; it writes the pages back unchanged.
//! - its oplog entry decoder (defect 10) reads only entries that carry tree
//!   nodes, an upgrade and a bitfield update together, or none of them, so replay
//!   stops before the first other entry. A torn entry (bad checksum) or an entry
//!   older than the state before it (left behind by defect 11) also ends replay.
//!
//! - a download killed between hypercore writing a bitfield page and writing
//!   the tree nodes of the blocks it marks (hypercore flushes the bitfield
//!   first, then the nodes one write at a time; defect 14) leaves blocks marked
//!   held whose Merkle leaves, or the nodes their proofs need, are blank. Their
//!   oplog entries are still there but are of the kind defect 10 cannot read, so
//!   nothing would restore the nodes, and every later read, proof or verify of
//!   those blocks fails while sync believes it holds them. Such blocks are shown
//!   as not held, so the next sync fetches them (and the nodes) again.
//!
//! Nothing here is ever written: the files on disk keep hypercore's format.

/// Where oplog entries start, after the two 4 KiB header slots.
pub(super) const OPLOG_ENTRIES_AT: usize = 8192;
const HEADER_SLOT: usize = 4096;
const LEADER: usize = 8;

/// Entry flags as hypercore writes them.
const HAS_USER_DATA: u8 = 1;
const HAS_TREE_NODES: u8 = 2;
const HAS_UPGRADE: u8 = 4;
const HAS_BITFIELD: u8 = 8;
const HAS_ALL_THREE: u8 = HAS_TREE_NODES | HAS_UPGRADE | HAS_BITFIELD;

/// What hypercore reads of a core's oplog and bitfield while it opens.
#[derive(Debug)]
pub(super) struct OpenView {
    /// The oplog as hypercore is to read it.
    pub(super) oplog: Vec<u8>,
    /// Whether the bitfield is shown empty (its bits are restated in `oplog`).
    pub(super) hide_bitfield: bool,
    /// Bytes of stored entries kept for replay: hypercore writes its next entries
    /// as if none were stored (defect 11); they go after these instead.
    pub(super) kept_entries: u64,
}

/// Most blocks whose leaves are looked up at open: the blocks marked by the
/// oplog entries hypercore cannot replay. Hypercore folds its entries into the
/// tree every fourth operation, so a real oplog names far fewer.
const MAX_SUSPECT_BLOCKS: u64 = 1 << 20;

/// The view of a core whose stored oplog is `oplog` and bitfield is `bitfield`.
/// `has_node(index)` says whether the tree file holds the Merkle node of that
/// flat-tree index (not blank); it is asked only about the nodes, and the leaves
/// of the blocks, of oplog entries hypercore will not replay.
pub(super) fn open_view(
    oplog: &[u8],
    bitfield: &[u8],
    mut has_node: impl FnMut(u64) -> bool,
) -> OpenView {
    let current = current_header(oplog);
    let state = current.as_ref().map(|(_, header)| header.tree_state());
    let kept_end = replayable_entries_end(oplog, state);
    let kept_entries = kept_end.saturating_sub(OPLOG_ENTRIES_AT) as u64;
    let unchanged = |hide_bitfield| OpenView {
        oplog: oplog[..kept_end].to_vec(),
        hide_bitfield,
        kept_entries,
    };
    let Some((slot, header)) = current else {
        return match slot_record(oplog, 0).or_else(|| slot_record(oplog, HEADER_SLOT)) {
            // No header: hypercore starts a fresh one, of length 0, holding nothing.
            None => unchanged(true),
            // A header we cannot read: hypercore gets it as it is.
            Some(_) => unchanged(false),
        };
    };
    if header.length == 0 {
        return unchanged(true);
    }
    if header.signature.len() != 64 {
        // Hypercore refuses a signed tree without a signature on its own.
        return unchanged(false);
    }

    let mut view = Vec::with_capacity(kept_end.max(OPLOG_ENTRIES_AT) + 128);
    view.extend_from_slice(&oplog[..OPLOG_ENTRIES_AT.min(oplog.len())]);
    view.resize(OPLOG_ENTRIES_AT, 0);
    // The contiguous length is recounted from the restated bits: a stale hint
    // would otherwise claim blocks the bitfield does not hold.
    let mut payload = header.payload[..header.contiguous_at].to_vec();
    payload.push(0);
    let record = leader_and(&payload, header.header_bit);
    view[slot..slot + HEADER_SLOT].fill(0);
    view[slot..slot + record.len()].copy_from_slice(&record);

    // Blocks marked in entries hypercore will not replay are held only if their
    // leaves reached the tree file, and all of them only if every node those
    // entries carry did: a node arrives with the first block whose proof needs
    // it, so a missing one can break any of them.
    let unreplayed = unreplayed_entries(oplog, kept_end, header.length);
    let nodes_missing = unreplayed.nodes.iter().any(|&index| !has_node(index));
    let mut unsound = std::collections::BTreeSet::new();
    for (start, length) in unreplayed.marks {
        for seq in start..start + length {
            if bit(bitfield, seq) && (nodes_missing || !has_node(2 * seq)) {
                unsound.insert(seq);
            }
        }
    }
    for (start, length) in without(held_runs(bitfield, header.length), &unsound) {
        restate_held(&mut view, &header, start, length);
    }
    view.extend_from_slice(&oplog[OPLOG_ENTRIES_AT.min(kept_end)..kept_end]);
    OpenView {
        oplog: view,
        hide_bitfield: true,
        kept_entries,
    }
}

/// The fields of the current oplog header that the view needs.
struct Header<'a> {
    payload: &'a [u8],
    header_bit: bool,
    fork: u64,
    length: u64,
    signature: &'a [u8],
    /// Offset in `payload` of the contiguous-length hint, its last field.
    contiguous_at: usize,
}

impl Header<'_> {
    fn tree_state(&self) -> TreeState {
        TreeState {
            fork: self.fork,
            length: self.length,
        }
    }
}

/// A signed tree state, ordered by fork then length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct TreeState {
    fork: u64,
    length: u64,
}

/// One checked record (leader plus payload) of an oplog.
struct Record<'a> {
    payload: &'a [u8],
    header_bit: bool,
    partial: bool,
}

/// The record at `at`, if it is complete and its checksum holds.
fn record_at(buf: &[u8], at: usize) -> Option<Record<'_>> {
    let leader = buf.get(at..at.checked_add(LEADER)?)?;
    let checksum = u32::from_le_bytes(leader[..4].try_into().ok()?);
    let combined = u32::from_le_bytes(leader[4..].try_into().ok()?);
    let len = (combined >> 2) as usize;
    let payload = buf.get(at + LEADER..(at + LEADER).checked_add(len)?)?;
    if len == 0 || crc32fast::hash(&buf[at + 4..at + LEADER + len]) != checksum {
        return None;
    }
    Some(Record {
        payload,
        header_bit: combined & 1 == 1,
        partial: combined & 2 == 2,
    })
}

/// The header record in the slot at `at`, as hypercore finds it: only a whole
/// slot counts.
fn slot_record(oplog: &[u8], at: usize) -> Option<Record<'_>> {
    record_at(oplog.get(at..at + HEADER_SLOT)?, 0)
}

/// The slot and fields of the header hypercore uses, chosen as it chooses.
fn current_header(oplog: &[u8]) -> Option<(usize, Header<'_>)> {
    let first = slot_record(oplog, 0);
    let second = slot_record(oplog, HEADER_SLOT);
    let (slot, record) = match (first, second) {
        (Some(a), Some(b)) if a.header_bit != b.header_bit => (HEADER_SLOT, b),
        (Some(a), _) => (0, a),
        (None, Some(b)) => (HEADER_SLOT, b),
        (None, None) => return None,
    };
    Some((slot, parse_header(record)?))
}

/// Reads the header layout hypercore 0.16 writes (`oplog/header.rs`).
fn parse_header(record: Record<'_>) -> Option<Header<'_>> {
    let mut r = Reader::new(record.payload);
    r.take(2 + 32)?; // version, flags, key
    r.take(3 + 1 + 32 + 32)?; // manifest: version, hash, type; signer
    let public_len = r.varint()?;
    r.take(usize::try_from(public_len).ok()?)?;
    let secret_len = r.varint()?;
    r.take(usize::try_from(secret_len).ok()?)?;
    r.strings()?; // user data
    let fork = r.varint()?;
    let length = r.varint()?;
    r.bytes()?; // root hash
    let signature = r.bytes()?;
    r.strings()?; // reorg hints
    let contiguous_at = r.at;
    r.varint()?;
    Some(Header {
        payload: record.payload,
        header_bit: record.header_bit,
        fork,
        length,
        signature,
        contiguous_at,
    })
}

/// End of the stored entries hypercore can replay from the state `from`: before
/// the first torn, partial, undecodable or stale entry.
fn replayable_entries_end(oplog: &[u8], from: Option<TreeState>) -> usize {
    if oplog.len() <= OPLOG_ENTRIES_AT {
        return oplog.len();
    }
    let mut state = from;
    let mut at = OPLOG_ENTRIES_AT;
    while let Some(record) = record_at(oplog, at) {
        if record.partial {
            break;
        }
        let Some(upgrade) = decodable_entry(record.payload) else {
            break;
        };
        if let Some(upgrade) = upgrade {
            if state.is_some_and(|state| upgrade < state) {
                break;
            }
            state = Some(upgrade);
        }
        at += LEADER + record.payload.len();
    }
    at
}

/// The tree state an entry upgrades to, if hypercore 0.16 decodes the entry as
/// written (`Some(None)`: it has no upgrade); `None` if it does not.
fn decodable_entry(payload: &[u8]) -> Option<Option<TreeState>> {
    let mut r = Reader::new(payload);
    let flags = r.u8()?;
    let parts = flags & HAS_ALL_THREE;
    if parts != 0 && parts != HAS_ALL_THREE {
        return None;
    }
    if flags & HAS_USER_DATA != 0 {
        r.strings()?;
    }
    let mut upgrade = None;
    if parts == HAS_ALL_THREE {
        let nodes = r.varint()?;
        for _ in 0..nodes {
            r.varint()?; // index
            r.varint()?; // byte length
            r.take(32)?; // hash
        }
        let fork = r.varint()?;
        r.varint()?; // ancestors
        let length = r.varint()?;
        r.bytes()?; // signature
        upgrade = Some(TreeState { fork, length });
        r.take(1)?; // drop flag
        r.varint()?; // start
        r.varint()?; // length
    }
    // Hypercore reads the next entry where this one's fields end.
    (r.at == payload.len()).then_some(upgrade)
}

/// Whether bit `seq` of a bitfield file is set.
fn bit(bitfield: &[u8], seq: u64) -> bool {
    usize::try_from(seq / 8)
        .ok()
        .and_then(|at| bitfield.get(at))
        .is_some_and(|byte| byte >> (seq % 8) & 1 == 1)
}

/// What the intact oplog entries hypercore does not replay hold: their tree
/// nodes may not have reached the tree file.
#[derive(Debug, Default, PartialEq, Eq)]
struct Unreplayed {
    /// Blocks they mark held (`start`, `length`).
    marks: Vec<(u64, u64)>,
    /// Flat-tree indexes of the nodes they carry.
    nodes: Vec<u64>,
}

/// The [`Unreplayed`] of the entries from `from` on: marks below `limit`, at most
/// [`MAX_SUSPECT_BLOCKS`] blocks and as many nodes in all.
fn unreplayed_entries(oplog: &[u8], from: usize, limit: u64) -> Unreplayed {
    let mut out = Unreplayed::default();
    let mut budget = MAX_SUSPECT_BLOCKS;
    let mut at = from;
    while let Some(record) = record_at(oplog, at) {
        let marks = entry_marks(record.payload, |index| {
            if out.nodes.len() < MAX_SUSPECT_BLOCKS as usize {
                out.nodes.push(index);
            }
        });
        if let Some((start, length)) = marks {
            let length = length.min(limit.saturating_sub(start)).min(budget);
            if length > 0 {
                out.marks.push((start, length));
                budget -= length;
            }
        }
        at += LEADER + record.payload.len();
    }
    out
}

/// The blocks an entry marks held (its bitfield update, unless it drops), read
/// field by field as hypercore writes them, whatever mix of parts it has; the
/// index of each tree node it carries goes to `node`.
fn entry_marks(payload: &[u8], mut node: impl FnMut(u64)) -> Option<(u64, u64)> {
    let mut r = Reader::new(payload);
    let flags = r.u8()?;
    if flags & HAS_USER_DATA != 0 {
        r.strings()?;
    }
    if flags & HAS_TREE_NODES != 0 {
        let nodes = r.varint()?;
        for _ in 0..nodes {
            node(r.varint()?);
            r.varint()?; // byte length
            r.take(32)?; // hash
        }
    }
    if flags & HAS_BITFIELD == 0 {
        return None;
    }
    if flags & HAS_UPGRADE != 0 {
        r.varint()?; // fork
        r.varint()?; // ancestors
        r.varint()?; // length
        r.bytes()?; // signature
    }
    let drop = r.u8()? & 1 == 1;
    let start = r.varint()?;
    let length = r.varint()?;
    (!drop).then_some((start, length))
}

/// `runs` (sorted, disjoint) without the blocks in `gone`.
fn without(runs: Vec<(u64, u64)>, gone: &std::collections::BTreeSet<u64>) -> Vec<(u64, u64)> {
    if gone.is_empty() {
        return runs;
    }
    let mut out = Vec::with_capacity(runs.len() + gone.len());
    for (start, length) in runs {
        let mut from = start;
        for &seq in gone.range(start..start + length) {
            if seq > from {
                out.push((from, seq - from));
            }
            from = seq + 1;
        }
        if from < start + length {
            out.push((from, start + length - from));
        }
    }
    out
}

/// A Merkle leaf as a core's oplog entry carries it: block `seq`'s byte length
/// and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Leaf {
    pub(crate) seq: u64,
    pub(crate) length: u64,
    pub(crate) hash: [u8; 32],
}

/// Every leaf carried by the whole, intact records of `records` (oplog entries,
/// any mix of parts, as hypercore writes them), in order. Stops at the first
/// record that is torn or does not decode.
pub(super) fn leaves_in_entries(records: &[u8], mut each: impl FnMut(Leaf)) {
    let mut at = 0;
    while let Some(record) = record_at(records, at) {
        if !entry_leaves(record.payload, &mut each) {
            return;
        }
        at += LEADER + record.payload.len();
    }
}

/// Passes the leaves among an entry's tree nodes to `each`; false if the entry
/// does not decode.
fn entry_leaves(payload: &[u8], each: &mut impl FnMut(Leaf)) -> bool {
    let mut r = Reader::new(payload);
    let Some(flags) = r.u8() else {
        return false;
    };
    if flags & HAS_USER_DATA != 0 && r.strings().is_none() {
        return false;
    }
    if flags & HAS_TREE_NODES == 0 {
        return true;
    }
    let Some(nodes) = r.varint() else {
        return false;
    };
    // Each node is read before it is used: a bogus count ends at the buffer's end.
    for _ in 0..nodes {
        let (Some(index), Some(length), Some(hash)) = (r.varint(), r.varint(), r.take(32)) else {
            return false;
        };
        if index.is_multiple_of(2) {
            let Ok(hash) = hash.try_into() else {
                return false;
            };
            each(Leaf {
                seq: index / 2,
                length,
                hash,
            });
        }
    }
    true
}

/// Maximal runs `(start, length)` of set bits below `limit` in a bitfield file
/// (bit `i` is bit `i % 8` of byte `i / 8`). Like hypercore, only whole 4-byte
/// words count.
fn held_runs(bitfield: &[u8], limit: u64) -> Vec<(u64, u64)> {
    let words = &bitfield[..bitfield.len() & !3];
    let mut runs = Vec::new();
    let mut start: Option<u64> = None;
    let mut end = 0;
    for (n, &byte) in words.iter().enumerate() {
        let base = n as u64 * 8;
        if base >= limit {
            break;
        }
        end = (base + 8).min(limit);
        match byte {
            0x00 => {
                if let Some(s) = start.take() {
                    runs.push((s, base - s));
                }
            }
            0xff if base + 8 <= limit => {
                start.get_or_insert(base);
            }
            _ => {
                for i in base..end {
                    let set = byte >> (i - base) & 1 == 1;
                    match (set, start) {
                        (true, None) => start = Some(i),
                        (false, Some(s)) => {
                            runs.push((s, i - s));
                            start = None;
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    if let Some(s) = start {
        runs.push((s, end - s));
    }
    runs
}

/// Appends an entry that marks blocks `start..start + length` held, with an
/// upgrade to the header's own tree so that replaying it changes nothing else.
fn restate_held(view: &mut Vec<u8>, header: &Header<'_>, start: u64, length: u64) {
    let mut payload = Vec::with_capacity(100);
    payload.push(HAS_ALL_THREE);
    put_varint(&mut payload, 0); // no tree nodes
    put_varint(&mut payload, header.fork);
    put_varint(&mut payload, header.length); // ancestors: nothing truncated
    put_varint(&mut payload, header.length);
    put_varint(&mut payload, header.signature.len() as u64);
    payload.extend_from_slice(header.signature);
    payload.push(0); // set, not dropped
    put_varint(&mut payload, start);
    put_varint(&mut payload, length);
    view.extend_from_slice(&leader_and(&payload, header.header_bit));
}

/// `payload` behind a leader: checksum, then length, partial and header bits.
fn leader_and(payload: &[u8], header_bit: bool) -> Vec<u8> {
    let combined = ((payload.len() as u32) << 2) | u32::from(header_bit);
    let mut out = Vec::with_capacity(LEADER + payload.len());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&combined.to_le_bytes());
    out.extend_from_slice(payload);
    let checksum = crc32fast::hash(&out[4..]);
    out[..4].copy_from_slice(&checksum.to_le_bytes());
    out
}

/// Compact-encoding unsigned varint.
fn put_varint(out: &mut Vec<u8>, value: u64) {
    if value < 0xfd {
        out.push(value as u8);
    } else if value <= 0xffff {
        out.push(0xfd);
        out.extend_from_slice(&(value as u16).to_le_bytes());
    } else if value <= 0xffff_ffff {
        out.push(0xfe);
        out.extend_from_slice(&(value as u32).to_le_bytes());
    } else {
        out.push(0xff);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

/// A cursor over compact-encoded fields; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, at: 0 }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let out = self.buf.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(out)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn varint(&mut self) -> Option<u64> {
        Some(match self.u8()? {
            0xfd => u16::from_le_bytes(self.take(2)?.try_into().ok()?).into(),
            0xfe => u32::from_le_bytes(self.take(4)?.try_into().ok()?).into(),
            0xff => u64::from_le_bytes(self.take(8)?.try_into().ok()?),
            small => small.into(),
        })
    }

    /// A length-prefixed byte string.
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        self.take(len)
    }

    /// A counted list of length-prefixed strings (skipped).
    fn strings(&mut self) -> Option<()> {
        let count = self.varint()?;
        for _ in 0..count {
            self.bytes()?;
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(set: &[u64], len_bytes: usize) -> Vec<u8> {
        let mut out = vec![0u8; len_bytes];
        for &i in set {
            out[(i / 8) as usize] |= 1 << (i % 8);
        }
        out
    }

    /// `held_runs` agrees with a bit-by-bit model on seeded random bitfields.
    #[test]
    fn held_runs_match_a_model() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..500 {
            let len_bytes = (next() % 64) as usize + 1;
            let mut field = vec![0u8; len_bytes];
            for byte in field.iter_mut() {
                *byte = match next() % 4 {
                    0 => 0,
                    1 => 0xff,
                    _ => next() as u8,
                };
            }
            let limit = next() % (len_bytes as u64 * 8 + 16);
            let usable = (len_bytes & !3) as u64 * 8;
            let mut model = Vec::new();
            let mut start = None;
            for i in 0..limit.min(usable) {
                let set = field[(i / 8) as usize] >> (i % 8) & 1 == 1;
                match (set, start) {
                    (true, None) => start = Some(i),
                    (false, Some(s)) => {
                        model.push((s, i - s));
                        start = None;
                    }
                    _ => {}
                }
            }
            if let Some(s) = start {
                model.push((s, limit.min(usable) - s));
            }
            assert_eq!(held_runs(&field, limit), model, "{field:?} below {limit}");
        }
        assert_eq!(held_runs(&bits(&[0, 1, 2, 40], 8), 64), [(0, 3), (40, 1)]);
    }

    /// The blocks an entry marks are read whatever mix of parts it carries, and
    /// blocks taken out of held runs split them.
    #[test]
    fn entries_marks_and_runs_without_blocks() {
        let mut entry = vec![HAS_TREE_NODES | HAS_BITFIELD];
        put_varint(&mut entry, 1); // one node
        put_varint(&mut entry, 4);
        put_varint(&mut entry, 9);
        entry.extend_from_slice(&[7; 32]);
        entry.push(0);
        put_varint(&mut entry, 2);
        put_varint(&mut entry, 1);
        assert_eq!(entry_marks(&entry, |_| {}), Some((2, 1)));
        let mut oplog = vec![0; OPLOG_ENTRIES_AT];
        oplog.extend_from_slice(&leader_and(&entry, false));
        oplog.extend_from_slice(&leader_and(&[0], false)); // marks nothing
        let found = unreplayed_entries(&oplog, OPLOG_ENTRIES_AT, 100);
        assert_eq!(found.marks, [(2, 1)]);
        assert_eq!(found.nodes, [4]);
        assert!(
            unreplayed_entries(&oplog, OPLOG_ENTRIES_AT, 2)
                .marks
                .is_empty()
        );
        let dropped = {
            let mut e = entry.clone();
            let at = e.len() - 3;
            e[at] = 1;
            e
        };
        assert_eq!(entry_marks(&dropped, |_| {}), None);

        let gone = [0, 5, 6, 20].into_iter().collect();
        assert_eq!(
            without(vec![(0, 10), (20, 1), (30, 2)], &gone),
            [(1, 4), (7, 3), (30, 2)]
        );
    }

    #[test]
    fn varints_read_back() {
        for value in [0, 1, 0xfc, 0xfd, 0xffff, 0x1_0000, 0xffff_ffff, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            let mut r = Reader::new(&out);
            assert_eq!(r.varint(), Some(value));
            assert_eq!(r.at, out.len());
        }
    }

    /// A record whose checksum fails, or that runs past the buffer, is not read.
    #[test]
    fn torn_records_are_not_read() {
        let record = leader_and(b"\x00", false);
        assert!(record_at(&record, 0).is_some());
        assert!(record_at(&record[..record.len() - 1], 0).is_none());
        let mut bad = record.clone();
        bad[LEADER] ^= 1;
        assert!(record_at(&bad, 0).is_none());
    }
}
