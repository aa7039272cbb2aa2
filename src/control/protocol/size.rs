//! Byte sizes in requests: a JSON number of bytes or a string such as
//! `"20G"` (binary units, as `--export null=SIZE` takes them).

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes. Serialises as a plain number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

impl Size {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl From<u64> for Size {
    fn from(b: u64) -> Self {
        Size(b)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SizeVisitor)
    }
}

struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = Size;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a size: a number of bytes or a string such as \"20G\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
        Ok(Size(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
        u64::try_from(v)
            .map(Size)
            .map_err(|_| E::custom(format!("size {v} is negative")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Size, E> {
        Err(E::custom(format!(
            "size {v} is not a whole number of bytes"
        )))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
        crate::config::parse_size(v)
            .map(Size)
            .ok_or_else(|| E::custom(format!("`{v}` is not a size such as 4096, 512M or 20G")))
    }
}

#[cfg(test)]
mod tests {
    use super::Size;

    #[test]
    fn numbers_and_strings() {
        let s: Size = serde_json::from_str("4096").unwrap();
        assert_eq!(s, Size(4096));
        let s: Size = serde_json::from_str("\"20G\"").unwrap();
        assert_eq!(s, Size(20 << 30));
        assert!(serde_json::from_str::<Size>("-1").is_err());
        assert!(serde_json::from_str::<Size>("1.5").is_err());
        assert!(serde_json::from_str::<Size>("\"big\"").is_err());
        assert!(serde_json::from_str::<Size>("true").is_err());
        assert_eq!(serde_json::to_string(&Size(7)).unwrap(), "7");
    }
}
