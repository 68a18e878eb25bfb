//! A map keyed by strings that stays a short vector while it is small: the subscription trie
//! holds one per node and per level, and nearly all of them hold one or two entries (a
//! device's own `dev/<id>/cmd`). A `HashMap` with one entry allocates room for three (about
//! 700 bytes for a trie node's children); this allocates exactly what it holds until
//! [`SPILL`] entries, then becomes a `HashMap` so that a node with thousands of subscribers or
//! children is still found and changed in constant time.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

/// Entries past which a map becomes a `HashMap`.
const SPILL: usize = 8;

pub enum SmallMap<K, V> {
    Few(Vec<(K, V)>),
    // Boxed so that the map, held by every session, is the size of the `Vec`.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<K, V>>),
}

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        SmallMap::Few(Vec::new())
    }
}

impl<K: Borrow<str> + Eq + Hash, V> SmallMap<K, V> {
    pub fn is_empty(&self) -> bool {
        match self {
            SmallMap::Few(v) => v.is_empty(),
            SmallMap::Many(m) => m.is_empty(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            SmallMap::Few(v) => v.len(),
            SmallMap::Many(m) => m.len(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        match self {
            SmallMap::Few(v) => v.iter().find(|(k, _)| k.borrow() == key).map(|(_, v)| v),
            SmallMap::Many(m) => m.get(key),
        }
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        match self {
            SmallMap::Few(v) => v
                .iter_mut()
                .find(|(k, _)| k.borrow() == key)
                .map(|(_, v)| v),
            SmallMap::Many(m) => m.get_mut(key),
        }
    }

    /// The value under `key`, inserted (with `new_key()`) from `value()` if absent.
    pub fn get_or_insert_with(
        &mut self,
        key: &str,
        new_key: impl FnOnce() -> K,
        value: impl FnOnce() -> V,
    ) -> &mut V {
        if self.get(key).is_none() {
            self.insert(new_key(), value());
        }
        self.get_mut(key).expect("present: inserted above")
    }

    /// Sets `key` to `value`; true if `key` is new.
    pub fn insert(&mut self, key: K, value: V) -> bool {
        if let Some(slot) = self.get_mut(key.borrow()) {
            *slot = value;
            return false;
        }
        match self {
            SmallMap::Few(v) if v.len() < SPILL => {
                // Exactly one more slot: a push would reserve four.
                v.reserve_exact(1);
                v.push((key, value));
            }
            SmallMap::Few(v) => {
                let mut map: HashMap<K, V> = std::mem::take(v).into_iter().collect();
                map.insert(key, value);
                *self = SmallMap::Many(Box::new(map));
            }
            SmallMap::Many(m) => {
                m.insert(key, value);
            }
        }
        true
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        match self {
            SmallMap::Few(v) => {
                let i = v.iter().position(|(k, _)| k.borrow() == key)?;
                let (_, value) = v.swap_remove(i);
                if v.is_empty() {
                    *v = Vec::new();
                }
                Some(value)
            }
            SmallMap::Many(m) => {
                let value = m.remove(key);
                if m.is_empty() {
                    *self = SmallMap::default();
                }
                value
            }
        }
    }

    pub fn iter(&self) -> Iter<'_, K, V> {
        match self {
            SmallMap::Few(v) => Iter::Few(v.iter()),
            SmallMap::Many(m) => Iter::Many(m.iter()),
        }
    }
}

pub enum Iter<'a, K, V> {
    Few(std::slice::Iter<'a, (K, V)>),
    Many(std::collections::hash_map::Iter<'a, K, V>),
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Few(i) => i.next().map(|(k, v)| (k, v)),
            Iter::Many(i) => i.next(),
        }
    }
}

impl<'a, K: Borrow<str> + Eq + Hash, V> IntoIterator for &'a SmallMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Iter<'a, K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_a_map_below_and_above_the_spill() {
        let mut map: SmallMap<Box<str>, usize> = SmallMap::default();
        for n in [1, SPILL, SPILL + 1, 100] {
            map = SmallMap::default();
            for i in 0..n {
                map.insert(i.to_string().into(), i);
                map.insert(i.to_string().into(), i * 10); // replaced, not added
            }
            assert_eq!(map.len(), n);
            assert!(matches!(map, SmallMap::Few(_)) == (n <= SPILL), "{n}");
            for i in 0..n {
                assert_eq!(map.get(&i.to_string()), Some(&(i * 10)));
            }
            *map.get_or_insert_with("0", || unreachable!(), || unreachable!()) += 1;
            assert_eq!(map.get("0"), Some(&1));
            assert_eq!(*map.get_or_insert_with("new", || "new".into(), || 7), 7);
            let mut seen: Vec<usize> = map.iter().map(|(_, v)| *v).collect();
            seen.sort();
            assert_eq!(seen.len(), n + 1);
            for i in 0..n {
                assert!(map.remove(&i.to_string()).is_some());
            }
            assert_eq!(map.remove("0"), None);
            assert_eq!(map.remove("new"), Some(7));
            assert!(map.is_empty());
        }
        assert!(
            matches!(map, SmallMap::Few(ref v) if v.capacity() == 0),
            "an emptied map holds nothing"
        );
    }

    #[test]
    fn one_entry_allocates_one_slot() {
        let mut map: SmallMap<Box<str>, u64> = SmallMap::default();
        map.insert("cmd".into(), 1);
        match &map {
            SmallMap::Few(v) => assert_eq!(v.capacity(), 1),
            SmallMap::Many(_) => panic!("one entry spilled"),
        }
    }
}
