//! The keys and values of one layer, laid out for the attention kernels.
//!
//! Positions are grouped in blocks of [`BLOCK`]. Inside a block, each KV head's keys are
//! position-major (a row of `head_dim` per position) and its values element-major (for each of
//! the head's `head_dim` elements, the block's positions side by side). So:
//! - one head's keys, or values, of a block are one contiguous run (64 KB for SmolLM3 in f16)
//!   that the hardware prefetchers stream, where a position-major cache would give each head a
//!   quarter of every row;
//! - 8 consecutive positions of one value element are one register, the lanes llama.cpp sums
//!   values in (its V cache is transposed for this reason), with no transposition at run time.
//!
//! Blocks are added at the end as positions arrive, so the cache grows without re-laying out
//! what it holds. Saved states hold the blocks as they are.

use super::KvValue;

/// Positions per block.
pub const BLOCK: usize = 256;

/// Positions a cache of `positions` positions stores: whole blocks.
pub fn stored_positions(positions: usize) -> usize {
    positions.div_ceil(BLOCK) * BLOCK
}

/// Keys and values of one layer (see the module documentation for the layout).
#[derive(Debug)]
pub struct KvRows<T> {
    keys: Vec<T>,
    values: Vec<T>,
    /// Positions held.
    len: usize,
    /// KV heads.
    n_kv: usize,
    /// Values per head.
    head_dim: usize,
}

impl<T> Default for KvRows<T> {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            values: Vec::new(),
            len: 0,
            n_kv: 0,
            head_dim: 0,
        }
    }
}

impl<T: KvValue> KvRows<T> {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Values of one position's row (`n_kv × head_dim`).
    fn row(&self) -> usize {
        self.n_kv * self.head_dim
    }

    /// Where the keys of head `g` at position `p` start.
    fn key_at(&self, p: usize, g: usize) -> usize {
        (p / BLOCK * self.n_kv + g) * BLOCK * self.head_dim + p % BLOCK * self.head_dim
    }

    /// Where element `d` of head `g`'s value at position `p` lies.
    fn value_at(&self, p: usize, g: usize, d: usize) -> usize {
        (p / BLOCK * self.row() + g * self.head_dim + d) * BLOCK + p % BLOCK
    }

    /// The key of head `g` at position `p` (`head_dim` values). Panics past the stored blocks.
    #[inline(always)]
    pub fn key(&self, p: usize, g: usize) -> &[T] {
        &self.keys[self.key_at(p, g)..][..self.head_dim]
    }

    /// [`KvRows::key`], or `None` past the stored blocks (for prefetching ahead).
    #[inline(always)]
    pub fn key_if_stored(&self, p: usize, g: usize) -> Option<&[T]> {
        self.keys.get(self.key_at(p, g)..)?.get(..self.head_dim)
    }

    /// Element `d` of head `g`'s values at positions `p..p + n`, side by side (inside one
    /// block). Positions at or past [`KvRows::len`] inside a stored block read zero.
    #[inline(always)]
    pub fn value_lanes(&self, p: usize, g: usize, d: usize, n: usize) -> &[T] {
        debug_assert!(p % BLOCK + n <= BLOCK);
        &self.values[self.value_at(p, g, d)..][..n]
    }

    /// Element `d` of head `g`'s value at position `p`.
    pub fn value(&self, p: usize, g: usize, d: usize) -> T {
        self.values[self.value_at(p, g, d)]
    }

    /// Head `g`'s value at position `p`, widened into `out` (`head_dim` values).
    pub fn widen_value(&self, p: usize, g: usize, out: &mut [f32]) {
        for (d, o) in out[..self.head_dim].iter_mut().enumerate() {
            *o = self.values[self.value_at(p, g, d)].to_f32();
        }
    }

    /// Keeps the first `positions` positions and appends `k`/`v` (f32, one row of
    /// `n_kv × head_dim` per new position), rounded to `T`.
    pub fn append(&mut self, positions: usize, n_kv: usize, head_dim: usize, k: &[f32], v: &[f32]) {
        if (n_kv, head_dim) != (self.n_kv, self.head_dim) {
            *self = Self {
                n_kv,
                head_dim,
                ..Self::default()
            };
        }
        self.truncate(positions);
        let row = self.row();
        let new = k.len() / row.max(1);
        self.grow_to(self.len + new);
        for t in 0..new {
            let p = self.len + t;
            for g in 0..n_kv {
                let at = self.key_at(p, g);
                let src = &k[t * row + g * head_dim..][..head_dim];
                T::narrow(src, &mut self.keys[at..at + head_dim]);
                // Values rounded 8 together, then spread over their element-major places.
                let mut rounded = [T::from_f32(0.0); 8];
                let value = &v[t * row + g * head_dim..][..head_dim];
                for (c, chunk) in value.chunks(rounded.len()).enumerate() {
                    let rounded = &mut rounded[..chunk.len()];
                    T::narrow(chunk, rounded);
                    for (j, &x) in rounded.iter().enumerate() {
                        let at = self.value_at(p, g, 8 * c + j);
                        self.values[at] = x;
                    }
                }
            }
        }
        self.len += new;
    }

    /// Keeps the first `positions` positions (at most those held), zeroing the values of the
    /// rest of the last block: value registers are summed whole, with zero weights past a
    /// head's view, and zero times a stale value must stay zero. Keeping every position does
    /// nothing: past the last position the values are already zero.
    fn truncate(&mut self, positions: usize) {
        let positions = positions.min(self.len);
        if positions == self.len {
            return;
        }
        let blocks = positions.div_ceil(BLOCK);
        let block_values = BLOCK * self.row();
        self.keys.truncate(blocks * block_values);
        self.values.truncate(blocks * block_values);
        self.zero_values_from(positions);
        self.len = positions;
    }

    /// Zeroes the values of positions `positions..` of the block holding `positions`.
    fn zero_values_from(&mut self, positions: usize) {
        if positions.is_multiple_of(BLOCK) {
            return;
        }
        let zero = T::from_f32(0.0);
        for g in 0..self.n_kv {
            for d in 0..self.head_dim {
                let start = self.value_at(positions, g, d);
                let end = start + BLOCK - positions % BLOCK;
                self.values[start..end].fill(zero);
            }
        }
    }

    /// Adds zeroed blocks until `positions` positions fit.
    fn grow_to(&mut self, positions: usize) {
        let needed = self.stored_values(positions);
        let zero = T::from_f32(0.0);
        for store in [&mut self.keys, &mut self.values] {
            if needed > store.len() {
                store.reserve_exact(needed - store.len());
                store.resize(needed, zero);
            }
        }
    }

    /// Values stored for `positions` positions: whole blocks.
    fn stored_values(&self, positions: usize) -> usize {
        stored_positions(positions) * self.row()
    }

    /// The stored keys covering positions `0..len` (at most those held), in this layout:
    /// whole blocks, what a saved state holds.
    pub fn stored_keys(&self, len: usize) -> &[T] {
        &self.keys[..self.stored_values(len.min(self.len))]
    }

    /// The stored values covering positions `0..len`, as [`KvRows::stored_keys`].
    pub fn stored_values_of(&self, len: usize) -> &[T] {
        &self.values[..self.stored_values(len.min(self.len))]
    }

    /// A cache of `len` positions from keys and values stored as [`KvRows::stored_keys`] gives
    /// them (whole blocks of `n_kv × head_dim` rows; longer vectors are cut to those blocks).
    /// What lies past `len` in the last block is zeroed as after a truncation.
    pub fn from_stored(
        n_kv: usize,
        head_dim: usize,
        len: usize,
        keys: Vec<T>,
        values: Vec<T>,
    ) -> Self {
        let mut cache = Self {
            keys,
            values,
            len,
            n_kv,
            head_dim,
        };
        let stored = cache.stored_values(len);
        cache.keys.resize(stored, T::from_f32(0.0));
        cache.values.resize(stored, T::from_f32(0.0));
        cache.zero_values_from(len);
        cache
    }

    /// The keys of positions `0..len` (at most those held), position-major.
    #[cfg(test)]
    pub fn keys_position_major(&self, len: usize) -> Vec<T> {
        self.position_major(len, |p, g, d| self.key(p, g)[d])
    }

    /// The values of positions `0..len` (at most those held), position-major.
    #[cfg(test)]
    pub fn values_position_major(&self, len: usize) -> Vec<T> {
        self.position_major(len, |p, g, d| self.value(p, g, d))
    }

    /// `element(p, g, d)` for positions `0..len` (at most those held), position-major.
    #[cfg(test)]
    fn position_major(&self, len: usize, element: impl Fn(usize, usize, usize) -> T) -> Vec<T> {
        let mut out = Vec::with_capacity(len.min(self.len) * self.row());
        for p in 0..len.min(self.len) {
            for g in 0..self.n_kv {
                out.extend((0..self.head_dim).map(|d| element(p, g, d)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn rows(positions: usize, row: usize, seed: f32) -> Vec<f32> {
        (0..positions * row).map(|i| i as f32 + seed).collect()
    }

    #[test]
    fn positions_read_back_across_blocks_and_after_truncation() {
        let (n_kv, hd) = (3, 8);
        let row = n_kv * hd;
        let (k, v) = (rows(600, row, 0.0), rows(600, row, 0.5));
        let mut kv = KvRows::<f32>::default();
        kv.append(0, n_kv, hd, &k[..300 * row], &v[..300 * row]);
        kv.append(300, n_kv, hd, &k[300 * row..], &v[300 * row..]);
        assert_eq!(kv.len(), 600);
        assert_eq!(kv.keys_position_major(600), k);
        assert_eq!(kv.values_position_major(600), v);
        assert_eq!(kv.key(513, 2), &k[513 * row + 16..513 * row + 24]);
        assert_eq!(kv.value(257, 1, 3), v[257 * row + 8 + 3]);
        let lanes: Vec<f32> = (256..264).map(|p| v[p * row + 5]).collect();
        assert_eq!(kv.value_lanes(256, 0, 5, 8), &lanes[..]);

        // Truncating inside a block zeroes the values after it, and appending rewrites them.
        kv.append(261, n_kv, hd, &[], &[]);
        assert_eq!(kv.len(), 261);
        assert_eq!(kv.value_lanes(256, 0, 5, 8)[..5], lanes[..5]);
        assert!(kv.value_lanes(256, 0, 5, 8)[5..].iter().all(|&x| x == 0.0));
        kv.append(
            261,
            n_kv,
            hd,
            &k[261 * row..262 * row],
            &v[261 * row..262 * row],
        );
        assert_eq!(kv.values_position_major(262), v[..262 * row]);
        // Appending leaves the values past the last position zero.
        assert!(kv.value_lanes(256, 0, 5, 8)[6..].iter().all(|&x| x == 0.0));
        assert!(kv.key_if_stored(511, 0).is_some());
        assert!(kv.key_if_stored(512, 0).is_none());
    }

    /// An f16 cache holds each key and value as `f16::from_f32` rounds it, halfway cases,
    /// subnormals, overflow and NaN included (the rows are rounded 8 at a time).
    #[test]
    fn an_f16_cache_rounds_every_value_as_f16_from_f32() {
        let (n_kv, hd) = (2, 24);
        let row = n_kv * hd;
        let tricky = [
            1.0 + f32::EPSILON * 1024.0, // halfway between two f16s: ties to even
            1.0 + f32::EPSILON * 3072.0,
            65504.0,
            65520.0, // rounds to infinity
            -1e6,
            6e-8, // subnormal in f16
            3e-8,
            -0.0,
            f32::NAN,
            f32::INFINITY,
        ];
        let values = |seed: usize| -> Vec<f32> {
            (0..5 * row)
                .map(|i| match (i * 7 + seed) % 13 {
                    j if j < tricky.len() => tricky[j],
                    _ => (i as f32 * 0.37 + seed as f32).sin() * 3.0,
                })
                .collect()
        };
        let (k, v) = (values(0), values(5));
        let mut kv = KvRows::<f16>::default();
        kv.append(0, n_kv, hd, &k, &v);
        let same = |a: f16, b: f32| a.to_bits() == f16::from_f32(b).to_bits();
        for p in 0..5 {
            for g in 0..n_kv {
                for d in 0..hd {
                    let i = p * row + g * hd + d;
                    assert!(same(kv.key(p, g)[d], k[i]), "key {p} {g} {d}: {}", k[i]);
                    assert!(same(kv.value(p, g, d), v[i]), "value {p} {g} {d}: {}", v[i]);
                }
            }
        }
    }

    #[test]
    fn stored_blocks_restore_the_same_cache() {
        let (n_kv, hd) = (2, 16);
        let row = n_kv * hd;
        let (k, v) = (rows(300, row, 1.0), rows(300, row, -3.0));
        let mut kv = KvRows::<f16>::default();
        kv.append(0, n_kv, hd, &k, &v);
        // A state of the first 270 positions, restored: the same positions, zero after them.
        let (keys, values) = (
            kv.stored_keys(270).to_vec(),
            kv.stored_values_of(270).to_vec(),
        );
        assert_eq!(keys.len(), 2 * BLOCK * row);
        let restored = KvRows::from_stored(n_kv, hd, 270, keys, values);
        assert_eq!(restored.len(), 270);
        assert_eq!(
            restored.keys_position_major(270),
            kv.keys_position_major(270)
        );
        assert_eq!(
            restored.values_position_major(270),
            kv.values_position_major(270)
        );
        assert!(
            restored.value_lanes(264, 1, 7, 8)[6..]
                .iter()
                .all(|&x| x == f16::ZERO)
        );
    }
}
