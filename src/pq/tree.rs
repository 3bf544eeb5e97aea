//! MADDNESS-style hash-tree encoder (Blalock & Guttag, 2021): a balanced binary tree of depth
//! `log2 K` per codebook with **one split dimension per level** (shared by all nodes of that
//! level) and **one threshold per node**. Encoding a subvector costs `depth` comparisons instead
//! of `K·S` multiply-adds. Learned greedily: at each level pick the dimension whose best
//! per-bucket splits reduce the total squared error most.

/// A learned tree for one codebook.
#[derive(Clone, Debug, PartialEq)]
pub struct Tree {
    /// Split dimension (offset within the subspace) per level.
    pub dims: Vec<usize>,
    /// Thresholds in heap order: level `l`, node `i` at index `2^l − 1 + i`; go right if `x > t`.
    pub thresholds: Vec<f32>,
    /// `K × S` leaf prototypes (mean of the calibration rows reaching each leaf).
    pub prototypes: Vec<f32>,
}

/// Leaf index of one subvector.
#[inline]
pub fn encode(x: &[f32], dims: &[usize], thresholds: &[f32]) -> usize {
    let mut idx = 0usize;
    for (l, &d) in dims.iter().enumerate() {
        let node = (1usize << l) - 1 + idx;
        idx = 2 * idx + (x[d] > thresholds[node]) as usize;
    }
    idx
}

/// Sum of squared deviations from the mean, from running sums.
fn sse(sum: &[f64], sum2: &[f64], n: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    sum.iter().zip(sum2).map(|(s, q)| q - s * s / n as f64).sum()
}

/// Best threshold splitting `rows` on dimension `dim`: `(loss after split, threshold)`.
fn best_split(data: &[f32], s: usize, rows: &[usize], dim: usize) -> (f64, f32) {
    let n = rows.len();
    let mut order = rows.to_vec();
    order.sort_by(|&a, &b| data[a * s + dim].total_cmp(&data[b * s + dim]).then(a.cmp(&b)));
    let (mut tot, mut tot2) = (vec![0f64; s], vec![0f64; s]);
    for &r in &order {
        for j in 0..s {
            let v = data[r * s + j] as f64;
            tot[j] += v;
            tot2[j] += v * v;
        }
    }
    let mut best = (sse(&tot, &tot2, n), f32::INFINITY);
    let (mut l, mut l2) = (vec![0f64; s], vec![0f64; s]);
    for (i, &r) in order.iter().enumerate().take(n.saturating_sub(1)) {
        for j in 0..s {
            let v = data[r * s + j] as f64;
            l[j] += v;
            l2[j] += v * v;
        }
        let (a, b) = (data[r * s + dim], data[order[i + 1] * s + dim]);
        if a == b {
            continue; // cannot separate equal values
        }
        let nr = (n - i - 1) as f64;
        let right: f64 = (0..s).map(|j| (tot2[j] - l2[j]) - (tot[j] - l[j]).powi(2) / nr).sum();
        let loss = sse(&l, &l2, i + 1) + right;
        if loss < best.0 {
            best = (loss, a + (b - a) / 2.0);
        }
    }
    best
}

/// Learn a tree of `depth` levels on `n × s` rows.
pub fn learn(data: &[f32], s: usize, depth: usize) -> Tree {
    let n = data.len() / s;
    let mut buckets: Vec<Vec<usize>> = vec![(0..n).collect()];
    let mut dims = Vec::with_capacity(depth);
    let mut thresholds = Vec::with_capacity((1 << depth) - 1);
    for _ in 0..depth {
        let mut best: Option<(f64, usize, Vec<f32>)> = None;
        for dim in 0..s {
            let mut loss = 0.0;
            let mut thr = Vec::with_capacity(buckets.len());
            for b in &buckets {
                let (l, t) = best_split(data, s, b, dim);
                loss += l;
                thr.push(t);
            }
            if best.as_ref().is_none_or(|(bl, _, _)| loss < *bl) {
                best = Some((loss, dim, thr));
            }
        }
        let (_, dim, thr) = best.expect("s > 0");
        let mut next = Vec::with_capacity(buckets.len() * 2);
        for (b, &t) in buckets.iter().zip(&thr) {
            let (left, right): (Vec<usize>, Vec<usize>) = b.iter().partition(|&&r| data[r * s + dim] <= t);
            next.push(left);
            next.push(right);
        }
        dims.push(dim);
        thresholds.extend(thr);
        buckets = next;
    }
    // Leaf prototypes: mean of the leaf's rows (empty leaves get the global mean).
    let mean_of = |rows: &[usize]| -> Vec<f32> {
        let mut m = vec![0f64; s];
        for &r in rows {
            for j in 0..s {
                m[j] += data[r * s + j] as f64;
            }
        }
        m.iter().map(|v| (v / rows.len().max(1) as f64) as f32).collect()
    };
    let global = mean_of(&(0..n).collect::<Vec<_>>());
    let prototypes = buckets
        .iter()
        .flat_map(|b| if b.is_empty() { global.clone() } else { mean_of(b) })
        .collect();
    Tree {
        dims,
        thresholds,
        prototypes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pq::rng::Rng;

    #[test]
    fn encode_matches_brute_force_walk() {
        let mut rng = Rng::new(4);
        let data: Vec<f32> = (0..4000).map(|_| rng.next_f64() as f32).collect();
        let t = learn(&data, 4, 4);
        assert_eq!(t.thresholds.len(), 15);
        for row in data.chunks(4) {
            // brute force: recompute the path level by level from the definition
            let mut lo = 0usize;
            let mut width = 16usize;
            for (l, &d) in t.dims.iter().enumerate() {
                let node = (1 << l) - 1 + lo / width;
                width /= 2;
                if row[d] > t.thresholds[node] {
                    lo += width;
                }
            }
            assert_eq!(encode(row, &t.dims, &t.thresholds), lo);
        }
    }

    #[test]
    fn separates_well_spread_clusters() {
        // 16 clusters on a 4×4 grid in 2-D: a depth-4 tree should put each in its own leaf
        let mut data = Vec::new();
        let mut rng = Rng::new(2);
        for _ in 0..50 {
            for i in 0..4 {
                for j in 0..4 {
                    data.push(i as f32 * 10.0 + rng.next_f64() as f32);
                    data.push(j as f32 * 10.0 + rng.next_f64() as f32);
                }
            }
        }
        let t = learn(&data, 2, 4);
        let mut leaves = std::collections::HashSet::new();
        for i in 0..4 {
            for j in 0..4 {
                leaves.insert(encode(
                    &[i as f32 * 10.0 + 0.5, j as f32 * 10.0 + 0.5],
                    &t.dims,
                    &t.thresholds,
                ));
            }
        }
        assert_eq!(leaves.len(), 16);
    }
}
