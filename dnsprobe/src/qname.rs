//! Query names, shared and compared without case.
//!
//! A name is decoded once per packet into a [`QName`]: an `Arc<str>` that keeps the case it
//! was sent with, for display, and the hash of its lower case. The indexes that match names
//! (pending queries by `QName`, lookups by [`CaselessPrefix`]) share that one allocation and
//! compare it case-insensitively (RFC 4343; resolvers may randomise case, 0x20), instead of
//! keeping lower-case copies.

use std::{
    hash::{BuildHasher, Hash, Hasher},
    sync::{Arc, LazyLock},
};

/// A query name as sent, shared, with the hash of its lower case computed once, when it is
/// decoded: it is looked up in several tables for every packet. The hash is seeded per
/// process, so that query senders cannot choose names that collide.
#[derive(Debug, Clone)]
pub struct QName {
    text: Arc<str>,
    hash: u64,
}

static NAME_HASHER: LazyLock<foldhash::fast::RandomState> = LazyLock::new(Default::default);

impl QName {
    pub fn new(text: &str) -> Self {
        Self {
            text: text.into(),
            hash: caseless_hash(text.as_bytes()),
        }
    }

    /// The name whose wire form (labels, no compression pointer) is `wire`, spelled out by
    /// `spell` unless one with these very bytes was decoded lately in this thread: a response,
    /// a resend and a busy client's next queries carry the name of a query just seen, and the
    /// wire bytes decide the text, case and escapes included. Spelling a name out, checking it
    /// is text and hashing it were half the cost of decoding a message. Names too long for the
    /// cache are spelled out every time.
    pub fn from_wire<E>(wire: &[u8], spell: impl FnOnce() -> Result<Self, E>) -> Result<Self, E> {
        if wire.len() > WIRE_NAME_MAX {
            return spell();
        }
        let slot = (WIRE_NAME_HASHER.hash_one(wire) % WIRE_NAME_SLOTS as u64) as usize;
        if let Some(name) = WIRE_NAMES.with_borrow(|slots| {
            slots
                .get(slot)
                .and_then(Option::as_ref)
                .filter(|known| known.wire() == wire)
                .map(|known| known.name.clone())
        }) {
            return Ok(name);
        }
        let name = spell()?;
        WIRE_NAMES.with_borrow_mut(|slots| {
            if slots.is_empty() {
                slots.resize_with(WIRE_NAME_SLOTS, || None);
            }
            let mut known = WireName {
                len: wire.len() as u8,
                wire: [0; WIRE_NAME_MAX],
                name: name.clone(),
            };
            known.wire[..wire.len()].copy_from_slice(wire);
            slots[slot] = Some(known);
        });
        Ok(name)
    }
}

/// The longest wire form [`QName::from_wire`] keeps: search-list expansions of pod names
/// (`name.namespace.svc.cluster.local.` after the name) fit with room to spare.
pub const WIRE_NAME_MAX: usize = 128;
const WIRE_NAME_SLOTS: usize = 256;

/// A name's wire bytes and its decoded form.
struct WireName {
    len: u8,
    wire: [u8; WIRE_NAME_MAX],
    name: QName,
}

impl WireName {
    fn wire(&self) -> &[u8] {
        &self.wire[..usize::from(self.len)]
    }
}

/// Fixed, not seeded: a sender that makes names collide here only sends them down the slow
/// path of spelling them out.
static WIRE_NAME_HASHER: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x5eed);

thread_local! {
    /// Direct-mapped, so a lookup is one compare; filled on first use.
    static WIRE_NAMES: std::cell::RefCell<Vec<Option<WireName>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl From<&str> for QName {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

impl std::ops::Deref for QName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Display for QName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Equal up to ASCII case (so equal names have equal hashes).
impl PartialEq for QName {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
            && (Arc::ptr_eq(&self.text, &other.text) || self.text.eq_ignore_ascii_case(&other.text))
    }
}

impl Eq for QName {}

impl Hash for QName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// The hash of `bytes` in ASCII lower case, with the process's seed, computed without
/// allocating: equal up to ASCII case means equal hashes. Chunked through a stack buffer, so
/// any length works.
fn caseless_hash(bytes: &[u8]) -> u64 {
    let mut state = NAME_HASHER.build_hasher();
    let mut buf = [0u8; 128];
    for chunk in bytes.chunks(buf.len()) {
        let lower = &mut buf[..chunk.len()];
        lower.copy_from_slice(chunk);
        lower.make_ascii_lowercase();
        state.write(lower);
    }
    // Like `str`'s own `Hash`: the terminator keeps ("ab", "c") and ("a", "bc") apart in a
    // key that hashes two names.
    state.write_u8(0xff);
    state.finish()
}

/// The first `len` bytes of a shared name (the name a program asked for, with the search
/// domain its resolver added cut off), hashed and compared without regard to ASCII case. Its
/// hash is the name's own when nothing is cut off, which is the common case: a fully qualified
/// name, or a name asked as it is.
#[derive(Debug, Clone)]
pub struct CaselessPrefix {
    name: QName,
    len: usize,
    hash: u64,
}

impl CaselessPrefix {
    /// `len` is clamped to the name and moved back to a character boundary, so any value is
    /// safe.
    pub fn new(name: QName, len: usize) -> Self {
        let mut len = len.min(name.len());
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        let hash = if len == name.len() {
            name.hash
        } else {
            caseless_hash(&name.as_bytes()[..len])
        };
        Self { name, len, hash }
    }

    pub fn as_str(&self) -> &str {
        &self.name[..self.len]
    }

    /// The prefix in lower case, sharing the name's text when that is what it is already (the
    /// whole name without an upper-case letter, which is nearly always): every lookup record
    /// names its lookup this way.
    pub fn to_lowercase_shared(&self) -> Arc<str> {
        let text = self.as_str();
        if self.len == self.name.len() && !text.bytes().any(|b| b.is_ascii_uppercase()) {
            Arc::clone(&self.name.text)
        } else {
            text.to_ascii_lowercase().into()
        }
    }
}

impl PartialEq for CaselessPrefix {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.as_str().eq_ignore_ascii_case(other.as_str())
    }
}

impl Eq for CaselessPrefix {}

impl Hash for CaselessPrefix {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    fn hash_of(value: &impl Hash) -> u64 {
        foldhash::quality::FixedState::with_seed(7).hash_one(value)
    }

    #[test]
    fn case_does_not_change_equality_or_hash() {
        let a = QName::new("WWW.Example.COM.");
        let b = QName::new("www.example.com.");
        assert_eq!(a, b);
        assert_eq!(hash_of(&a), hash_of(&b));
        assert_eq!(&*a, "WWW.Example.COM.", "the text keeps its case");
        assert_ne!(a, QName::new("www.example.org."));
        assert_ne!(hash_of(&a), hash_of(&QName::new("www.example.org.")));
    }

    #[test]
    fn long_names_hash_across_chunks() {
        let long: String = (0..300)
            .map(|i| if i % 2 == 0 { 'A' } else { 'b' })
            .collect();
        let a = QName::new(&long);
        let b = QName::new(&long.to_ascii_lowercase());
        assert_eq!(a, b);
        assert_eq!(hash_of(&a), hash_of(&b));
        let mut other = long.to_ascii_lowercase();
        other.replace_range(299.., "c");
        assert_ne!(a, QName::new(&other));
        assert_ne!(hash_of(&a), hash_of(&QName::new(&other)));
    }

    #[test]
    fn prefix_compares_only_its_part() {
        let asked = CaselessPrefix::new("Api.ns1.svc.cluster.local.".into(), 4);
        let plain = CaselessPrefix::new("api.".into(), 4);
        assert_eq!(asked.as_str(), "Api.");
        assert_eq!(asked, plain);
        assert_eq!(hash_of(&asked), hash_of(&plain));
        let longer = CaselessPrefix::new("api.ns1.svc.cluster.local.".into(), 8);
        assert_ne!(asked, longer);
        assert_ne!(hash_of(&asked), hash_of(&longer));
        assert_eq!(CaselessPrefix::new("é.".into(), 1).as_str(), "");
        assert_eq!(CaselessPrefix::new("a.".into(), 99).as_str(), "a.");
    }

    #[test]
    fn lower_case_prefix_shares_the_text_only_when_it_is_all_of_it() {
        let whole = QName::new("api.example.com.");
        let shared = CaselessPrefix::new(whole.clone(), 99).to_lowercase_shared();
        assert!(Arc::ptr_eq(&shared, &whole.text), "not shared");
        for (name, len, lower) in [
            ("Api.Example.com.", 99, "api.example.com."),
            ("api.ns1.svc.cluster.local.", 4, "api."),
            ("API.ns1.svc.cluster.local.", 4, "api."),
        ] {
            let name = QName::new(name);
            let got = CaselessPrefix::new(name.clone(), len).to_lowercase_shared();
            assert_eq!(&*got, lower);
            assert!(!Arc::ptr_eq(&got, &name.text), "{name} shared");
        }
    }
}
