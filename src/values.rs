//! Value types for policy files: human durations (`250ms`, `30s`), byte
//! sizes (`64KiB`), ratios (`0.2`), and the field-wise merge of a
//! `defaults` block into each upstream.
//!
//! Each type validates itself while it is deserialized, so a bad value is
//! reported at its own line and column with its field path.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A duration written for humans: `250ms`, `30s`, `5m`, `1h 30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(text.trim())
            .map(HumanDuration)
            .map_err(|_| {
                de::Error::custom(format!(
                    "invalid duration {text:?}: expected a number with a unit, such as 250ms, 30s or 5m"
                ))
            })
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_duration(&self.0, s)
    }
}

/// Serializes a duration as humans write it (`1s 500ms`).
pub fn serialize_duration<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*value))
}

/// Serializes an optional duration as humans write it, or `null`.
pub fn serialize_opt_duration<S: Serializer>(
    value: &Option<Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(d) => serialize_duration(d, s),
        None => s.serialize_none(),
    }
}

/// A size in bytes: a plain number, or a number with `B`, `KiB`, `MiB`,
/// `GiB` (or `KB`, `MB`, `GB`, taken as powers of 1024 too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 65536, 64KiB or 1MiB")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map(ByteSize).ok_or_else(|| {
                    E::custom(format!(
                        "invalid size {v:?}: expected a number of bytes or a unit such as 64KiB or 1MiB"
                    ))
                })
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// Parses a size: a number of bytes, or with a unit (`64KiB`, `4MiB`).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "K" => 1 << 10,
        "MiB" | "MB" | "M" => 1 << 20,
        "GiB" | "GB" | "G" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// A ratio between 0 and 1 inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ratio(pub f64);

impl<'de> Deserialize<'de> for Ratio {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(deserializer)?;
        if (0.0..=1.0).contains(&value) {
            Ok(Ratio(value))
        } else {
            Err(de::Error::custom(format!(
                "{value} is not a ratio: expected a number from 0 to 1, such as 0.2"
            )))
        }
    }
}

/// A percentage between 0 and 100 inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percent(pub f64);

impl Percent {
    /// The percentage as a fraction of one.
    pub fn fraction(self) -> f64 {
        self.0 / 100.0
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(deserializer)?;
        if (0.0..=100.0).contains(&value) {
            Ok(Percent(value))
        } else {
            Err(de::Error::custom(format!(
                "{value} is not a percentage: expected a number from 0 to 100, such as 5 or 0.5"
            )))
        }
    }
}

/// Field-wise merge: `self`'s values win, `fallback` fills the gaps.
pub trait Merge: Sized {
    /// Fills every field `self` leaves unset from `fallback`.
    fn merge(self, fallback: &Self) -> Self;
}

impl<T: Merge + Clone> Merge for Option<T> {
    fn merge(self, fallback: &Self) -> Self {
        match (self, fallback) {
            (Some(value), Some(fallback)) => Some(value.merge(fallback)),
            (Some(value), None) => Some(value),
            (None, fallback) => fallback.clone(),
        }
    }
}

/// Implements [`Merge`] for a struct whose fields are all `Option`s of
/// plain values (`or`) or of nested mergeable blocks (`merge`).
macro_rules! merge_fields {
    ($ty:ty { $($plain:ident),* $(,)? } nested { $($nested:ident),* $(,)? }) => {
        impl $crate::values::Merge for $ty {
            fn merge(self, fallback: &Self) -> Self {
                Self {
                    $($plain: self.$plain.or_else(|| fallback.$plain.clone()),)*
                    $($nested: $crate::values::Merge::merge(self.$nested, &fallback.$nested),)*
                }
            }
        }
    };
}
pub(crate) use merge_fields;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Some(65536));
        assert_eq!(parse_size("64KiB"), Some(64 << 10));
        assert_eq!(parse_size("1 MiB"), Some(1 << 20));
        assert_eq!(parse_size("2GB"), Some(2 << 30));
        assert_eq!(parse_size("64 parsecs"), None);
        assert_eq!(parse_size("KiB"), None);
    }
}
