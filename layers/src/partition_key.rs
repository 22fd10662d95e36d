//! `PartitionKey`: a record's partition key, as text that shares the buffer it came in.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::Utf8Error;

use bytes::Bytes;
use bytestring::ByteString;

/// A record's partition key: UTF-8 text, cheap to clone (a reference count), made without a
/// copy from the `String` the AWS SDK hands over or from a slice of a KPL aggregate's buffer
/// (user records of one aggregate share its key table instead of one allocation per key).
///
/// It reads as a `&str` (`Deref`, `AsRef<str>`, `Borrow<str>`, `Display`), compares and
/// hashes as one, and is made from `&str` or `String` with `.into()`.
///
/// ```
/// use kinesis_tower_layers::PartitionKey;
///
/// let key = PartitionKey::from("customer-1");
/// assert_eq!(key, "customer-1");
/// assert_eq!(key.len(), 10);
/// assert!(key.starts_with("customer"));
/// ```
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionKey(ByteString);

impl PartitionKey {
    /// The key made from `bytes` without a copy, when they are UTF-8.
    ///
    /// # Errors
    /// When `bytes` are not UTF-8.
    pub fn from_utf8(bytes: Bytes) -> Result<Self, Utf8Error> {
        ByteString::try_from(bytes).map(Self)
    }

    /// The key as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for PartitionKey {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for PartitionKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for PartitionKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for PartitionKey {
    fn from(key: &str) -> Self {
        Self(ByteString::from(key))
    }
}

impl From<String> for PartitionKey {
    /// Takes the string's buffer, without a copy.
    fn from(key: String) -> Self {
        Self(ByteString::from(key))
    }
}

impl From<&String> for PartitionKey {
    fn from(key: &String) -> Self {
        Self::from(key.as_str())
    }
}

impl PartialEq<str> for PartitionKey {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for PartitionKey {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for PartitionKey {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl fmt::Debug for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn reads_compares_and_hashes_as_its_text() {
        let data = Bytes::from_static(b"xxkey-1yy");
        let key = PartitionKey::from_utf8(data.slice(2..7)).unwrap();
        assert_eq!(key, "key-1");
        assert_eq!(key, PartitionKey::from(String::from("key-1")));
        assert_eq!(key.to_string(), "key-1");
        assert_eq!(format!("{key:?}"), "\"key-1\"");
        let map: HashMap<PartitionKey, u32> = [(key.clone(), 1)].into_iter().collect();
        assert_eq!(map.get("key-1"), Some(&1));
        assert!(PartitionKey::from_utf8(Bytes::from_static(&[0xff, 0xfe])).is_err());
    }
}
