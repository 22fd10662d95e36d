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
        // One pass: two digits per byte, checked as they are packed (a byte below '0'
        // wraps around to a large value).
        let mut packed = [0u8; MAX_DIGITS / 2];
        let mut invalid = false;
        let pairs = digits.chunks_exact(2);
        let last = pairs.remainder();
        for (slot, pair) in packed.iter_mut().zip(pairs) {
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

impl Ord for SequenceNumber {
    fn cmp(&self, other: &Self) -> Ordering {
        // Both are normalised (no leading zeros) and unused nibbles are zero, so the number of
        // digits decides first and the packed bytes compare like the digits.
        self.len
            .cmp(&other.len)
            .then_with(|| self.packed.cmp(&other.packed))
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

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let s = String::from_utf8_lossy(&bytes);
            let _ = SequenceNumber::parse(&s);
        }
    }
}
