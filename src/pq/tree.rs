//! MADDNESS-style hash-tree encoder (Blalock & Guttag, 2021): a balanced binary tree of depth
//! `log2 K` per codebook with **one split dimension per level** (shared by all nodes of that
//! level) and **one threshold per node**. Encoding a subvector costs `depth` comparisons instead
//! of `K·S` multiply-adds. MADDNESS learns it greedily: at each level the dimension whose best
//! per-bucket splits reduce the total squared error most. Here a beam search over the levels
//! keeps the runners-up too ([`learn_in`], never worse than the greedy tree), and the error can
//! be measured in a metric given as a linear map of the subvectors (MADDNESS measures it on the
//! subvectors themselves), e.g. the layer's weight rows, so the splits go where they move the
//! layer's *output* most.

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

/// Running sums of `z` rows per bucket (`t` values each).
struct Sums {
    t: usize,
    sum: Vec<f64>,
    sum2: Vec<f64>,
    n: Vec<usize>,
}

impl Sums {
    fn new(buckets: usize, t: usize) -> Sums {
        Sums {
            t,
            sum: vec![0.0; buckets * t],
            sum2: vec![0.0; buckets * t],
            n: vec![0; buckets],
        }
    }
    fn add(&mut self, b: usize, z: &[f32]) {
        let t = self.t;
        for ((s, q), &v) in self.sum[b * t..(b + 1) * t]
            .iter_mut()
            .zip(&mut self.sum2[b * t..(b + 1) * t])
            .zip(z)
        {
            *s += v as f64;
            *q += v as f64 * v as f64;
        }
        self.n[b] += 1;
    }
    fn sse(&self, b: usize) -> f64 {
        let t = self.t;
        sse(&self.sum[b * t..(b + 1) * t], &self.sum2[b * t..(b + 1) * t], self.n[b])
    }
    /// The squared error of bucket `b` of `all` less the rows `self` holds of it.
    fn sse_rest(&self, all: &Sums, b: usize) -> f64 {
        let (t, nr) = (self.t, all.n[b] - self.n[b]);
        if nr == 0 {
            return 0.0;
        }
        (b * t..(b + 1) * t)
            .map(|i| (all.sum2[i] - self.sum2[i]) - (all.sum[i] - self.sum[i]).powi(2) / nr as f64)
            .sum()
    }
}

/// Each row's bucket and the sums of each bucket's rows of `z` (`t` wide).
struct Buckets<'a> {
    leaf: &'a [u32],
    all: Sums,
}

impl Buckets<'_> {
    fn new<'a>(leaf: &'a [u32], buckets: usize, z: &[f32], t: usize) -> Buckets<'a> {
        let mut all = Sums::new(buckets, t);
        for (r, &b) in leaf.iter().enumerate() {
            all.add(b as usize, &z[r * t..(r + 1) * t]);
        }
        Buckets { leaf, all }
    }
}

/// Each bucket's best threshold on dimension `dim` of `data` (`s` wide), the squared error
/// measured on the rows of `z` (`t` wide): the summed error after the splits and the
/// thresholds (∞ for a bucket no split improves). `order` holds the rows sorted by their value
/// on `dim`: one pass over the rows serves every bucket, a split falling between two
/// consecutive distinct values of the bucket (the first of the best).
fn best_splits(data: &[f32], s: usize, z: &[f32], order: &[u32], bk: &Buckets, dim: usize) -> (f64, Vec<f32>) {
    let (all, leaf, buckets, t) = (&bk.all, bk.leaf, bk.all.n.len(), bk.all.t);
    let mut best: Vec<(f64, f32)> = (0..buckets).map(|b| (all.sse(b), f32::INFINITY)).collect();
    let mut left = Sums::new(buckets, t);
    let mut prev: Vec<Option<f32>> = vec![None; buckets];
    for &r in order {
        let (r, b) = (r as usize, leaf[r as usize] as usize);
        let v = data[r * s + dim];
        if let Some(pv) = prev[b].filter(|&pv| pv != v) {
            // split between the bucket's rows so far and the rest
            let loss = left.sse(b) + left.sse_rest(all, b);
            if loss < best[b].0 {
                best[b] = (loss, pv + (v - pv) / 2.0);
            }
        }
        left.add(b, &z[r * t..(r + 1) * t]);
        prev[b] = Some(v);
    }
    (best.iter().map(|b| b.0).sum(), best.iter().map(|b| b.1).collect())
}

/// The rows of `data` (`s` wide) sorted by their value on `dim`, ties in row order.
fn sorted_on(data: &[f32], s: usize, dim: usize) -> Vec<u32> {
    let mut o: Vec<u32> = (0..(data.len() / s) as u32).collect();
    o.sort_by(|&a, &b| {
        let (a, b) = (a as usize, b as usize);
        data[a * s + dim].total_cmp(&data[b * s + dim]).then(a.cmp(&b))
    });
    o
}

/// Learn a tree of `depth` levels on `n × s` rows, the squared error measured on the rows
/// themselves (MADDNESS's criterion, with [`learn_in`]'s beam search).
pub fn learn(data: &[f32], s: usize, depth: usize) -> Tree {
    learn_in(data, s, depth, data, s)
}

/// Partial trees kept at each level of [`learn_in`]'s search (MADDNESS's greedy tree is a beam
/// of one; a level's best split can leave the next levels worse off than its runner-up).
pub const BEAM: usize = 4;

/// The first levels of a tree during the search, with their error and the bucket of each row.
struct Partial {
    loss: f64,
    dims: Vec<usize>,
    thresholds: Vec<f32>,
    leaf: Vec<u32>,
}

/// Learn a tree of `depth` levels on `n × s` rows, splitting on their values but measuring the
/// squared error of each bucket on the matching rows of `z` (`n × t`): with `z = L x` for
/// `A = LᵀL`, the error `(x − μ)ᵀ A (x − μ)` of the metric `A`. A beam search over the split
/// dimensions: at each level, every kept partial tree is extended by each dimension (with each
/// bucket's best threshold on it) and the [`BEAM`] extensions of lowest error are kept
/// (ties to the earlier partial tree, then the lower dimension), the greedy tree's always
/// among them; the tree of lowest error wins, so it is never worse than the greedy one.
pub fn learn_in(data: &[f32], s: usize, depth: usize, z: &[f32], t: usize) -> Tree {
    let n = data.len() / s;
    debug_assert_eq!(z.len(), n * t);
    let order: Vec<Vec<u32>> = (0..s).map(|dim| sorted_on(data, s, dim)).collect();
    let mut beam = vec![Partial {
        loss: f64::INFINITY,
        dims: Vec::with_capacity(depth),
        thresholds: Vec::with_capacity((1 << depth) - 1),
        leaf: vec![0; n],
    }];
    // the partial tree in the beam that the greedy search would have grown
    let mut greedy = 0;
    for level in 0..depth {
        // every extension (loss, partial tree, dimension, thresholds per bucket)
        let mut ext: Vec<(f64, usize, usize, Vec<f32>)> = Vec::with_capacity(beam.len() * s);
        for (pi, p) in beam.iter().enumerate() {
            let bk = Buckets::new(&p.leaf, 1 << level, z, t);
            for (dim, o) in order.iter().enumerate() {
                let (loss, thr) = best_splits(data, s, z, o, &bk, dim);
                ext.push((loss, pi, dim, thr));
            }
        }
        ext.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let greedy_next = ext.iter().find(|e| e.1 == greedy).expect("s > 0").clone();
        // extensions of equal error are nearly always the same partition reached two ways
        ext.dedup_by(|a, b| a.0 == b.0);
        ext.truncate(BEAM);
        greedy = match ext.iter().position(|e| (e.1, e.2) == (greedy_next.1, greedy_next.2)) {
            Some(i) => i,
            None => {
                ext.truncate(BEAM - 1);
                ext.push(greedy_next);
                ext.len() - 1
            }
        };
        beam = ext
            .into_iter()
            .map(|(loss, pi, dim, thr)| {
                let p = &beam[pi];
                let leaf = (p.leaf.iter().enumerate())
                    .map(|(r, &b)| 2 * b + (data[r * s + dim] > thr[b as usize]) as u32)
                    .collect();
                let mut dims = p.dims.clone();
                dims.push(dim);
                let mut thresholds = p.thresholds.clone();
                thresholds.extend(thr);
                Partial {
                    loss,
                    dims,
                    thresholds,
                    leaf,
                }
            })
            .collect();
    }
    // the lowest error, ties to the earlier (the greedy tree may come last)
    let best = (1..beam.len()).fold(0, |b, i| if beam[i].loss < beam[b].loss { i } else { b });
    let Partial {
        dims, thresholds, leaf, ..
    } = beam.swap_remove(best);
    // Leaf prototypes: mean of the leaf's rows (empty leaves get the global mean).
    let k = 1usize << depth;
    let (mut sum, mut count) = (vec![0f64; (k + 1) * s], vec![0usize; k + 1]);
    for (r, &b) in leaf.iter().enumerate() {
        for slot in [b as usize, k] {
            for j in 0..s {
                sum[slot * s + j] += data[r * s + j] as f64;
            }
            count[slot] += 1;
        }
    }
    let prototypes = (0..k)
        .flat_map(|b| {
            let slot = if count[b] == 0 { k } else { b };
            (0..s)
                .map(|j| (sum[slot * s + j] / count[slot].max(1) as f64) as f32)
                .collect::<Vec<_>>()
        })
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
    use crate::pq::metric::{map_rows, metric_factor};
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
    fn best_splits_are_each_buckets_best_threshold() {
        // values on a coarse grid (many ties), rows in 3 buckets, the error on 2 other values
        let mut rng = Rng::new(5);
        let (n, s, t, buckets) = (300, 3, 2, 3);
        let data: Vec<f32> = (0..n * s).map(|_| (rng.next_f64() * 8.0).floor() as f32).collect();
        let z: Vec<f32> = (0..n * t).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
        let leaf: Vec<u32> = (0..n).map(|_| (rng.next_f64() * buckets as f64) as u32).collect();
        let err = |rows: &[usize]| -> f64 {
            (0..t)
                .map(|j| {
                    let m = rows.iter().map(|&r| z[r * t + j] as f64).sum::<f64>() / rows.len().max(1) as f64;
                    rows.iter().map(|&r| (z[r * t + j] as f64 - m).powi(2)).sum::<f64>()
                })
                .sum()
        };
        for dim in 0..s {
            let order = sorted_on(&data, s, dim);
            let (loss, thr) = best_splits(&data, s, &z, &order, &Buckets::new(&leaf, buckets, &z, t), dim);
            let mut want_loss = 0.0;
            for b in 0..buckets as u32 {
                let rows: Vec<usize> = (0..n).filter(|&r| leaf[r] == b).collect();
                let mut values: Vec<f32> = rows.iter().map(|&r| data[r * s + dim]).collect();
                values.sort_by(f32::total_cmp);
                values.dedup();
                // every threshold between consecutive distinct values, the first of the best
                let mut best = (err(&rows), f32::INFINITY);
                for w in values.windows(2) {
                    let th = w[0] + (w[1] - w[0]) / 2.0;
                    let (l, r): (Vec<usize>, Vec<usize>) = rows.iter().partition(|&&r| data[r * s + dim] <= th);
                    let e = err(&l) + err(&r);
                    if e < best.0 - 1e-9 {
                        best = (e, th);
                    }
                }
                assert_eq!(thr[b as usize], best.1, "dim {dim} bucket {b}");
                want_loss += best.0;
            }
            assert!(
                (loss - want_loss).abs() < 1e-6 * want_loss,
                "dim {dim}: {loss} against {want_loss}"
            );
        }
    }

    /// The greedy tree (MADDNESS's): each level's dimension the best for the tree so far.
    fn greedy_loss(data: &[f32], s: usize, depth: usize) -> f64 {
        let n = data.len() / s;
        let mut leaf = vec![0u32; n];
        let mut loss = 0.0;
        for level in 0..depth {
            let bk = Buckets::new(&leaf, 1 << level, data, s);
            let (l, dim, thr) = (0..s)
                .map(|dim| {
                    let (l, thr) = best_splits(data, s, data, &sorted_on(data, s, dim), &bk, dim);
                    (l, dim, thr)
                })
                .fold(None, |b: Option<(f64, usize, Vec<f32>)>, c| match b {
                    Some(b) if b.0 <= c.0 => Some(b),
                    _ => Some(c),
                })
                .unwrap();
            leaf = (0..n)
                .map(|r| 2 * leaf[r] + (data[r * s + dim] > thr[leaf[r] as usize]) as u32)
                .collect();
            loss = l;
        }
        loss
    }

    #[test]
    fn the_beam_is_never_worse_than_the_greedy_tree() {
        let mut worse_greedy = 0;
        for seed in 0..12 {
            // correlated, skewed values, where a level's best split often misleads the next
            let mut rng = Rng::new(seed);
            let s = 5;
            let data: Vec<f32> = (0..800)
                .flat_map(|_| {
                    let a = rng.next_f64() as f32;
                    let b = (rng.next_f64() as f32).powi(3);
                    let c = rng.next_f64() as f32;
                    [a, a + 0.3 * b, b * 4.0, c * c, a * c]
                })
                .collect();
            let t = learn(&data, s, 4);
            // the tree's error: per leaf and dimension Σv² − (Σv)²/n
            let mut beam_loss = 0.0;
            for l in 0..16 {
                let rows: Vec<&[f32]> = data
                    .chunks(s)
                    .filter(|r| encode(r, &t.dims, &t.thresholds) == l)
                    .collect();
                for j in 0..s {
                    let sum: f64 = rows.iter().map(|r| r[j] as f64).sum();
                    let sq: f64 = rows.iter().map(|r| (r[j] as f64).powi(2)).sum();
                    beam_loss += sq - sum * sum / rows.len().max(1) as f64;
                }
            }
            let g = greedy_loss(&data, s, 4);
            assert!(
                beam_loss <= g * (1.0 + 1e-9),
                "seed {seed}: beam {beam_loss} greedy {g}"
            );
            worse_greedy += usize::from(beam_loss < g * (1.0 - 1e-6));
        }
        assert!(
            worse_greedy > 0,
            "the beam never found a better tree than the greedy one"
        );
    }

    #[test]
    fn output_splits_follow_the_metric() {
        // 2-D rows spread widely along x0 and narrowly along x1; a metric that only sees x1
        // (the weight ignores x0; its jitter weighs x0's spread 2·10⁴ times less) must split on
        // x1, the plain error on x0
        let mut rng = Rng::new(3);
        let data: Vec<f32> = (0..2000)
            .flat_map(|_| [rng.next_f64() as f32 * 10.0, rng.next_f64() as f32])
            .collect();
        assert_eq!(learn(&data, 2, 2).dims, vec![0, 0]);
        let mut a = vec![0.0, 0.0, 0.0, 1.0]; // A = diag(0, 1)
        let l = metric_factor(&mut a, 2).unwrap();
        let t = learn_in(&data, 2, 2, &map_rows(&data, 2, &l), 2);
        assert_eq!(t.dims, vec![1, 1]);
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
