//! [`TaskName`]: a task's name, cheap to make and to clone.
//!
//! Guarantees:
//! - **Exact.** A name reads back exactly as given (any UTF-8, any
//!   length), and compares and hashes as that `str`.
//! - **No allocation for most names.** Up to [`TaskName::INLINE_CAP`]
//!   bytes are stored inline (naming a task allocates nothing, a clone is
//!   a copy); a longer name is one shared, reference-counted string.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// A task's name: cheap to clone, compares equal to a `&str`.
///
/// Names of up to [`TaskName::INLINE_CAP`] bytes (most: `"peer-1.2.3.4:8444"`,
/// `"rpc-get_blocks"`) are stored inline, so naming a task allocates nothing
/// and a clone is a copy; longer names share one reference-counted string.
#[derive(Clone)]
pub struct TaskName(Repr);

#[derive(Clone)]
enum Repr {
    /// Invariant: `bytes[..len]` is valid UTF-8 (a whole `&str` copied in).
    Inline {
        len: u8,
        bytes: [u8; TaskName::INLINE_CAP],
    },
    Shared(Arc<str>),
}

impl TaskName {
    /// The longest name stored without an allocation, in bytes.
    pub const INLINE_CAP: usize = 22;

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Inline { len, bytes } => {
                let bytes = &bytes[..usize::from(*len)];
                // SAFETY: `Repr::Inline` is only built by `TaskName::new`,
                // which copies every byte of a `&str`, so `bytes` is that
                // string's UTF-8 in full.
                unsafe { std::str::from_utf8_unchecked(bytes) }
            }
            Repr::Shared(s) => s,
        }
    }

    fn new(s: &str) -> Self {
        if s.len() <= Self::INLINE_CAP {
            let mut bytes = [0u8; Self::INLINE_CAP];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            Self(Repr::Inline {
                len: s.len() as u8,
                bytes,
            })
        } else {
            Self(Repr::Shared(Arc::from(s)))
        }
    }
}

impl Deref for TaskName {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for TaskName {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for TaskName {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for TaskName {
    fn from(s: String) -> Self {
        if s.len() <= Self::INLINE_CAP {
            Self::new(&s)
        } else {
            Self(Repr::Shared(Arc::from(s)))
        }
    }
}

impl PartialEq for TaskName {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for TaskName {}

impl std::hash::Hash for TaskName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialEq<str> for TaskName {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for TaskName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Display for TaskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for TaskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::TaskName;
    use std::collections::hash_map::DefaultHasher;
    use std::hash::{Hash, Hasher};

    fn hash(n: &TaskName) -> u64 {
        let mut h = DefaultHasher::new();
        n.hash(&mut h);
        h.finish()
    }

    #[test]
    fn inline_and_shared_names_read_back_exactly() {
        // Catches a slicing error at the inline limit (a name cut short or
        // padded with the buffer's zeros), including multi-byte characters
        // that straddle it.
        let cap = TaskName::INLINE_CAP;
        let cases = [
            String::new(),
            "a".repeat(cap),
            "a".repeat(cap + 1),
            format!("{}é", "a".repeat(cap - 1)),
            "pair-ü-€-🦀".to_owned(),
        ];
        for s in cases {
            let from_str = TaskName::from(s.as_str());
            let from_string = TaskName::from(s.clone());
            assert_eq!(from_str.as_str(), s);
            assert_eq!(from_string.as_str(), s);
            assert_eq!(from_str.clone(), from_string);
            assert_eq!(from_str, s.as_str());
            assert_eq!(format!("{from_str}"), s);
            assert_eq!(format!("{from_str:?}"), format!("{s:?}"));
        }
    }

    #[test]
    fn equal_names_hash_equal() {
        // Catches a Hash or Eq that looks at the representation (the unused
        // tail of the inline buffer, the pointer of a shared string): a name
        // used as a map key must find its equal.
        let short = TaskName::from("peer-1");
        let long = TaskName::from("x".repeat(TaskName::INLINE_CAP + 5));
        assert_eq!(hash(&short), hash(&TaskName::from("peer-1".to_owned())));
        assert_eq!(hash(&long), hash(&long.clone()));
        assert_ne!(short, long);
    }
}
