//! Reading the protobuf wire format of a KPL aggregate straight from its bytes.
//!
//! The deaggregator walks the message with [`Fields`] instead of decoding it into the
//! [`proto`](super::proto) structs first: no intermediate vector of user records, no field
//! dispatch through a generic buffer, and the user records' data and keys become slices of
//! the aggregate's buffer as they are read. It accepts exactly what the `proto` structs accept
//! (a property test checks it against them): unknown fields are skipped, known fields must
//! have their wire type, tags' strings must be UTF-8.

use std::ops::Range;

/// Why a message is not valid protobuf, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason} at byte {offset} of the protobuf message")]
pub struct ProtobufError {
    offset: usize,
    reason: &'static str,
}

impl ProtobufError {
    /// Offset in the protobuf message (after the KPL magic) where the problem was found.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// What is wrong there.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

/// The wire types of protobuf.
pub(super) const VARINT: u8 = 0;
const FIXED64: u8 = 1;
pub(super) const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// How deep messages and groups may nest: the limit of prost's decoder, counted the same way
/// (a field is skipped, or a message read, only while fewer than this many levels enclose it).
const MAX_DEPTH: u32 = 100;

/// A cursor over the fields of one message, `buf[pos..end]`; offsets are into `buf` (the
/// whole protobuf message), so that slices of it can be taken and errors say where.
pub(super) struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
    depth: u32,
}

impl<'a> Fields<'a> {
    /// The fields of the whole message.
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Self {
            buf,
            pos: 0,
            end: buf.len(),
            depth: 0,
        }
    }

    /// The fields of the embedded message at `range` (as returned by [`Fields::bytes`]).
    pub(super) fn nested(&self, range: Range<usize>) -> Result<Self, ProtobufError> {
        if self.depth >= MAX_DEPTH {
            return Err(self.error(range.start, "messages nested too deeply"));
        }
        Ok(Self {
            buf: self.buf,
            pos: range.start,
            end: range.end,
            depth: self.depth + 1,
        })
    }

    fn error(&self, offset: usize, reason: &'static str) -> ProtobufError {
        ProtobufError { offset, reason }
    }

    /// The next field's number and wire type, or `None` at the end of the message.
    #[inline]
    pub(super) fn next_key(&mut self) -> Result<Option<(u32, u8)>, ProtobufError> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let at = self.pos;
        let key = self.varint()?;
        let key = u32::try_from(key).map_err(|_| self.error(at, "field key above 2^32"))?;
        let wire_type = (key & 7) as u8;
        if wire_type > FIXED32 {
            return Err(self.error(at, "invalid wire type"));
        }
        let field = key >> 3;
        if field == 0 {
            return Err(self.error(at, "field number 0"));
        }
        Ok(Some((field, wire_type)))
    }

    /// A varint.
    #[inline]
    pub(super) fn varint(&mut self) -> Result<u64, ProtobufError> {
        let at = self.pos;
        let bytes = &self.buf[at..self.end];
        if let Some(&first) = bytes.first() {
            if first < 0x80 {
                self.pos += 1;
                return Ok(u64::from(first));
            }
        }
        let mut value = 0u64;
        for (i, &byte) in bytes.iter().take(10).enumerate() {
            if i == 9 && byte > 1 {
                return Err(self.error(at, "varint above 2^64"));
            }
            value |= u64::from(byte & 0x7F) << (7 * i);
            if byte < 0x80 {
                self.pos += i + 1;
                return Ok(value);
            }
        }
        Err(self.error(at, "truncated varint"))
    }

    /// A length-delimited field's bytes, as a range of the message.
    #[inline]
    pub(super) fn bytes(&mut self) -> Result<Range<usize>, ProtobufError> {
        let at = self.pos;
        let len = self.varint()?;
        let start = self.pos;
        match usize::try_from(len)
            .ok()
            .and_then(|len| start.checked_add(len))
        {
            Some(end) if end <= self.end => {
                self.pos = end;
                Ok(start..end)
            }
            _ => Err(self.error(at, "length beyond the end of the message")),
        }
    }

    /// The bytes of `range` as UTF-8 (a `string` field).
    pub(super) fn utf8(&self, range: Range<usize>) -> Result<&'a str, ProtobufError> {
        let start = range.start;
        std::str::from_utf8(&self.buf[range]).map_err(|_| self.error(start, "string not UTF-8"))
    }

    /// An error for a known field that came with another wire type than its own.
    pub(super) fn wrong_wire_type(&self) -> ProtobufError {
        self.error(self.pos, "known field with the wrong wire type")
    }

    /// Skips the value of an unknown field `field` of `wire_type` (its key already read).
    pub(super) fn skip(&mut self, field: u32, wire_type: u8) -> Result<(), ProtobufError> {
        if self.depth >= MAX_DEPTH {
            return Err(self.error(self.pos, "messages or groups nested too deeply"));
        }
        match wire_type {
            VARINT => self.varint().map(drop),
            FIXED64 => self.advance(8),
            LEN => self.bytes().map(drop),
            FIXED32 => self.advance(4),
            START_GROUP => self.skip_group(field),
            _ => Err(self.error(self.pos, "end of a group that was not started")),
        }
    }

    fn advance(&mut self, n: usize) -> Result<(), ProtobufError> {
        if self.end - self.pos < n {
            return Err(self.error(self.pos, "truncated fixed-width value"));
        }
        self.pos += n;
        Ok(())
    }

    /// Skips a (deprecated) group up to its end key, which must name the same field.
    fn skip_group(&mut self, field: u32) -> Result<(), ProtobufError> {
        // The group's fields are one level deeper (its end key is not).
        self.depth += 1;
        let result = loop {
            let at = self.pos;
            match self.next_key()? {
                None => break Err(self.error(at, "group without its end")),
                Some((inner, END_GROUP)) if inner == field => break Ok(()),
                Some((_, END_GROUP)) => {
                    break Err(self.error(at, "end of a group that was not started"))
                }
                Some((inner, wire_type)) => self.skip(inner, wire_type)?,
            }
        };
        self.depth -= 1;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints() {
        for (bytes, value) in [
            (&[0x00][..], 0u64),
            (&[0x7F], 127),
            (&[0x80, 0x01], 128),
            (&[0xAC, 0x02], 300),
            (
                &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
                u64::MAX,
            ),
        ] {
            let mut fields = Fields::new(bytes);
            assert_eq!(fields.varint().unwrap(), value);
            assert!(fields.next_key().unwrap().is_none());
        }
        for bytes in [
            &[0x80][..],
            &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02],
            &[0xFF; 11],
        ] {
            assert!(Fields::new(bytes).varint().is_err());
        }
    }

    #[test]
    fn keys_and_skips() {
        // field 1 varint, field 2 fixed64, field 3 bytes, field 5 fixed32, group 6 holding
        // field 1 varint, then the end.
        let message = [
            0x08, 0x01, 0x11, 1, 2, 3, 4, 5, 6, 7, 8, 0x1A, 0x02, b'h', b'i', 0x2D, 1, 2, 3, 4,
            0x33, 0x08, 0x05, 0x34,
        ];
        let mut fields = Fields::new(&message);
        let mut seen = Vec::new();
        while let Some((field, wire_type)) = fields.next_key().unwrap() {
            seen.push((field, wire_type));
            fields.skip(field, wire_type).unwrap();
        }
        assert_eq!(seen, vec![(1, 0), (2, 1), (3, 2), (5, 5), (6, 3)]);

        for bad in [
            &[0x07][..],         // wire type 7
            &[0x00],             // field 0
            &[0x34],             // end of group never started
            &[0x33, 0x08, 0x05], // group without its end
            &[0x33, 0x3C],       // group ended by another field's end
            &[0x11, 1, 2, 3],    // fixed64 cut short
            &[0x1A, 0x05, b'h'], // bytes cut short
        ] {
            let mut fields = Fields::new(bad);
            let outcome = fields
                .next_key()
                .and_then(|key| key.map_or(Ok(()), |(f, w)| fields.skip(f, w)));
            assert!(outcome.is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deep_groups_are_refused() {
        let mut message = vec![0x0B; 200];
        message.extend([0x0C; 200]);
        let mut fields = Fields::new(&message);
        let (field, wire_type) = fields.next_key().unwrap().unwrap();
        let error = fields.skip(field, wire_type).unwrap_err();
        assert_eq!(error.reason(), "messages or groups nested too deeply");
    }
}
