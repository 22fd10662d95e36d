//! Kinesis sequence numbers: decimal strings of up to 128 digits, compared numerically.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// The most digits a Kinesis sequence number may have.
pub(crate) const MAX_DIGITS: usize = 128;

/// A Kinesis sequence number.
///
/// Kinesis sequence numbers are decimal strings of up to 128 digits, larger than any machine
/// integer. This type stores them losslessly, inline (two digits per byte, no heap allocation,
/// cheap to copy), and orders them numerically: `"9" < "10"`, and leading zeros do not matter.
///
/// ```
/// use kinesis_tower_layers::SequenceNumber;
///
/// let a: SequenceNumber = "49590338271490256608559692538361571095921575989136588898".parse()?;
/// let b: SequenceNumber = "9".parse()?;
/// assert!(b < a);
/// assert_eq!(a.to_string(), "49590338271490256608559692538361571095921575989136588898");
/// assert!("12x".parse::<SequenceNumber>().is_err());
/// # Ok::<(), kinesis_tower_layers::InvalidSequenceNumber>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SequenceNumber {
    /// Number of significant digits (no leading zeros; zero is one digit).
    len: u8,
    /// Packed BCD, most significant digit first, two digits per byte, unused nibbles zero.
    packed: [u8; MAX_DIGITS / 2],
}

/// A string that is not a valid sequence number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sequence number {input:?}: {reason}; expected 1 to 128 decimal digits")]
pub struct InvalidSequenceNumber {
    /// The rejected input (truncated to 160 characters).
    pub input: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

impl InvalidSequenceNumber {
    fn new(input: &str, reason: &'static str) -> Self {
        let input = input.chars().take(160).collect();
        Self { input, reason }
    }
}

impl SequenceNumber {
    /// The most digits a Kinesis sequence number may have: 128.
    pub const MAX_DIGITS: usize = MAX_DIGITS;

    /// Parses a decimal sequence number; leading zeros are accepted and dropped.
    pub fn parse(input: &str) -> Result<Self, InvalidSequenceNumber> {
        let bytes = input.as_bytes();
        if bytes.is_empty() {
            return Err(InvalidSequenceNumber::new(input, "it is empty"));
        }
        let not_a_digit = || {
            InvalidSequenceNumber::new(input, "it contains a character that is not a decimal digit")
        };
        let zeros = bytes.iter().take_while(|&&b| b == b'0').count();
        // Zero itself keeps one digit.
        let digits = &bytes[zeros.min(bytes.len() - 1)..];
        if digits.len() > MAX_DIGITS {
            if !digits.iter().all(u8::is_ascii_digit) {
                return Err(not_a_digit());
            }
            return Err(InvalidSequenceNumber::new(
                input,
                "it has more than 128 digits",
            ));
        }
        // One pass: two digits per byte, checked as they are packed, eight digits at a time.
        let mut packed = [0u8; MAX_DIGITS / 2];
        let mut invalid = false;
        let octets = digits.chunks_exact(8);
        let rest = octets.remainder();
        for (slots, octet) in packed.chunks_exact_mut(4).zip(octets) {
            let (four, valid) = pack_eight(octet.try_into().expect("chunks of eight"));
            invalid |= !valid;
            slots.copy_from_slice(&four);
        }
        // The last digits (fewer than eight) two at a time (a byte below '0' wraps around to
        // a large value).
        let done = digits.len() - rest.len();
        let pairs = rest.chunks_exact(2);
        let last = pairs.remainder();
        for (slot, pair) in packed[done / 2..].iter_mut().zip(pairs) {
            let (high, low) = (pair[0].wrapping_sub(b'0'), pair[1].wrapping_sub(b'0'));
            invalid |= high > 9 || low > 9;
            *slot = (high << 4) | (low & 0x0f);
        }
        if let Some(&digit) = last.first() {
            let high = digit.wrapping_sub(b'0');
            invalid |= high > 9;
            packed[digits.len() / 2] = high << 4;
        }
        if invalid {
            return Err(not_a_digit());
        }
        Ok(Self {
            len: digits.len() as u8,
            packed,
        })
    }

    /// The number of significant digits.
    pub fn digits(&self) -> usize {
        self.len as usize
    }

    fn digit(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i % 2 == 0 {
            byte >> 4
        } else {
            byte & 0x0f
        }
    }

    /// The number as a decimal string without leading zeros, padded on the left with zeros to
    /// `width` digits (at least its own length). Zero-padded strings of one width sort like the
    /// numbers, which is what stores use to compare sequence numbers in SQL or scripts.
    pub fn to_padded_string(&self, width: usize) -> String {
        let mut out = String::with_capacity(width.max(self.digits()));
        for _ in self.digits()..width {
            out.push('0');
        }
        for i in 0..self.digits() {
            out.push((b'0' + self.digit(i)) as char);
        }
        out
    }
}

/// Eight ASCII characters packed into four bytes of two decimal digits each (the first
/// character in the high nibble of the first byte), and whether all eight were digits.
fn pack_eight(chars: [u8; 8]) -> ([u8; 4], bool) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    // The first character in the lowest byte.
    let x = u64::from_le_bytes(chars);
    // A digit is 0x30..=0x39: its high nibble is 3, and stays 3 when 6 is added. The second
    // test counts only when the first passed, and then every byte is at most 0x3f: adding 6
    // carries into no other byte.
    let high_nibbles = 0xf0 * ONES;
    let valid = x & high_nibbles == 0x30 * ONES
        && x.wrapping_add(0x06 * ONES) & high_nibbles == 0x30 * ONES;
    let digits = x & (0x0f * ONES);
    // Each 16-bit lane: the first digit of the pair in the high nibble of its low byte.
    let pairs = ((digits & 0x00ff_00ff_00ff_00ff) << 4) | ((digits >> 8) & 0x00ff_00ff_00ff_00ff);
    // The low byte of each lane, gathered into the low four bytes.
    let pairs = (pairs | (pairs >> 8)) & 0x0000_ffff_0000_ffff;
    let pairs = (pairs | (pairs >> 16)) & 0x0000_0000_ffff_ffff;
    ((pairs as u32).to_le_bytes(), valid)
}

impl Ord for SequenceNumber {
    fn cmp(&self, other: &Self) -> Ordering {
        // Both are normalised (no leading zeros) and unused nibbles are zero, so the number of
        // digits decides first and the packed bytes compare like the digits; of equal lengths,
        // only the bytes that hold digits can differ: compared eight at a time (sixteen digits),
        // as big-endian words.
        self.len.cmp(&other.len).then_with(|| {
            let words = (self.len as usize).div_ceil(16);
            let word = |packed: &[u8; MAX_DIGITS / 2], i: usize| {
                u64::from_be_bytes(packed[8 * i..8 * i + 8].try_into().expect("eight bytes"))
            };
            (0..words)
                .map(|i| word(&self.packed, i).cmp(&word(&other.packed, i)))
                .find(|o| o.is_ne())
                .unwrap_or(Ordering::Equal)
        })
    }
}

impl PartialOrd for SequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Any `u64` is a valid sequence number (at most 20 digits).
///
/// ```
/// use kinesis_tower_layers::SequenceNumber;
/// assert_eq!(SequenceNumber::from(42), SequenceNumber::parse("42").unwrap());
/// ```
impl From<u64> for SequenceNumber {
    fn from(n: u64) -> Self {
        Self::parse(&n.to_string()).expect("a u64 has 1 to 20 decimal digits")
    }
}

impl FromStr for SequenceNumber {
    type Err = InvalidSequenceNumber;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for SequenceNumber {
    type Error = InvalidSequenceNumber;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl TryFrom<String> for SequenceNumber {
    type Error = InvalidSequenceNumber;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; MAX_DIGITS];
        for (i, slot) in buf.iter_mut().enumerate().take(self.digits()) {
            *slot = b'0' + self.digit(i);
        }
        // Only ASCII digits were written.
        let s = std::str::from_utf8(&buf[..self.digits()]).map_err(|_| fmt::Error)?;
        f.pad(s)
    }
}

impl fmt::Debug for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SequenceNumber({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn num(s: &str) -> SequenceNumber {
        s.parse().unwrap()
    }

    /// Numeric comparison of two digit strings without leading zeros, as a reference.
    fn reference_cmp(a: &str, b: &str) -> Ordering {
        let a = a.trim_start_matches('0');
        let b = b.trim_start_matches('0');
        a.len().cmp(&b.len()).then_with(|| a.cmp(b))
    }

    #[test]
    fn orders_numerically_not_lexically() {
        assert!(num("9") < num("10"));
        assert!(num("0009") < num("10"));
        assert_eq!(num("000123"), num("123"));
        assert_eq!(num("0").to_string(), "0");
        assert_eq!(num("0000").to_string(), "0");
        assert!(num("0") < num("1"));
    }

    #[test]
    fn keeps_128_digits_losslessly() {
        let max = "9".repeat(128);
        assert_eq!(num(&max).to_string(), max);
        let odd = format!("1{}", "0".repeat(126));
        assert_eq!(num(&odd).to_string(), odd);
        assert!(num(&odd) < num(&max));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", " 1", "1 ", "-1", "+1", "1.0", "0x10", "١٢", "12a"] {
            let err = SequenceNumber::parse(bad).unwrap_err();
            assert!(err.to_string().contains("invalid sequence number"), "{err}");
        }
        let too_long = "1".repeat(129);
        assert_eq!(
            SequenceNumber::parse(&too_long).unwrap_err().reason,
            "it has more than 128 digits"
        );
        // Leading zeros do not count towards the limit.
        assert!(SequenceNumber::parse(&format!("000{}", "1".repeat(128))).is_ok());
    }

    #[test]
    fn padded_strings_sort_like_numbers() {
        let a = num("99");
        let b = num("100");
        assert!(a.to_padded_string(128) < b.to_padded_string(128));
        assert_eq!(a.to_padded_string(4), "0099");
        assert_eq!(b.to_padded_string(1), "100");
    }

    proptest! {
        #[test]
        fn ordering_equals_numeric_ordering(a in "[0-9]{1,128}", b in "[0-9]{1,128}") {
            let (x, y) = (num(&a), num(&b));
            prop_assert_eq!(x.cmp(&y), reference_cmp(&a, &b));
            prop_assert_eq!(x == y, reference_cmp(&a, &b) == Ordering::Equal);
        }

        /// Numbers of one length that differ in one digit, anywhere.
        #[test]
        fn one_digit_apart_order_by_that_digit(
            a in "[1-9][0-9]{0,127}",
            at in any::<prop::sample::Index>(),
            digit in 0u8..=9,
        ) {
            let at = at.index(a.len());
            let mut b = a.clone().into_bytes();
            b[at] = if at == 0 { b'1' + digit % 9 } else { b'0' + digit };
            let b = String::from_utf8(b).unwrap();
            prop_assert_eq!(num(&a).cmp(&num(&b)), a.cmp(&b));
        }

        #[test]
        fn display_round_trips(a in "[1-9][0-9]{0,127}") {
            prop_assert_eq!(num(&a).to_string(), a.clone());
            prop_assert_eq!(num(&format!("00{a}")).to_string(), a);
        }

        #[test]
        fn garbage_is_rejected_not_panicking(s in "\\PC{0,200}") {
            let valid = !s.is_empty()
                && s.bytes().all(|b| b.is_ascii_digit())
                && s.trim_start_matches('0').len() <= MAX_DIGITS;
            prop_assert_eq!(SequenceNumber::parse(&s).is_ok(), valid);
        }

        /// Digits mixed with the characters just below and above them ('/' and ':').
        #[test]
        fn near_digits_are_rejected(s in "[/-:]{1,130}") {
            let digits = s.trim_start_matches('0');
            let valid = s.bytes().all(|b| b.is_ascii_digit()) && digits.len() <= 128;
            prop_assert_eq!(SequenceNumber::parse(&s).is_ok(), valid);
            if valid {
                prop_assert_eq!(SequenceNumber::parse(&s).unwrap().to_string(), if digits.is_empty() { "0" } else { digits });
            }
        }

        /// A digit string with one character replaced, at any place of the eight-digit groups
        /// and of the digits after them: the characters just above '9' (whose high nibble is
        /// also 3), just below '0', and any other.
        #[test]
        fn one_wrong_character_anywhere_is_rejected(
            digits in "[1-9][0-9]{0,127}",
            at in any::<prop::sample::Index>(),
            wrong in prop_oneof![
                prop::sample::select(vec![':', ';', '<', '=', '>', '?', '/', ' ', '\u{0}']),
                any::<char>().prop_filter("not a digit", |c| !c.is_ascii_digit()),
            ],
        ) {
            let at = at.index(digits.len());
            let mut s = digits.clone();
            s.replace_range(at..at + 1, wrong.encode_utf8(&mut [0; 4]));
            let err = SequenceNumber::parse(&s).unwrap_err();
            prop_assert!(err.reason.contains("not a decimal digit"), "{}", err);
        }

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let s = String::from_utf8_lossy(&bytes);
            let _ = SequenceNumber::parse(&s);
        }
    }
}
