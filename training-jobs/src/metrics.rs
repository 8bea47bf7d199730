//! The quality measures the training jobs report and gate on, computed here from the outputs of
//! the exported artifact (run through the serving backend), so the numbers in the registry are the
//! served model's, not the training library's: ROC-AUC and recall at a false-positive rate for
//! fraud, hit rate and NDCG at k for recommendation.

/// Area under the ROC curve: the chance a random positive scores above a random negative (ties
/// count half). `None` without both classes.
pub fn roc_auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let ranks = average_ranks(scores);
    let positive_rank_sum: f64 = ranks
        .iter()
        .zip(labels)
        .filter(|(_, l)| **l)
        .map(|(r, _)| r)
        .sum();
    let p = positives as f64;
    Some((positive_rank_sum - p * (p + 1.0) / 2.0) / (p * negatives as f64))
}

/// Ranks from 1, ties given the average of the ranks they span.
fn average_ranks(scores: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut ranks = vec![0.0; scores.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        let rank = (start + end + 1) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

/// The share of positives caught by the lowest threshold whose false-positive rate stays at or
/// under `max_fpr` (flagging score ≥ threshold), with that threshold. `None` without both classes.
pub fn recall_at_fpr(scores: &[f64], labels: &[bool], max_fpr: f64) -> Option<(f64, f64)> {
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let allowed = (max_fpr * negatives as f64).floor() as usize;
    let (mut caught, mut false_alarms) = (0, 0);
    let mut best = (0.0, f64::INFINITY);
    let mut i = 0;
    while i < order.len() {
        // Scores that tie are flagged together.
        let threshold = scores[order[i]];
        while i < order.len() && scores[order[i]] == threshold {
            if labels[order[i]] {
                caught += 1;
            } else {
                false_alarms += 1;
            }
            i += 1;
        }
        if false_alarms > allowed {
            break;
        }
        best = (caught as f64 / positives as f64, threshold);
    }
    Some(best)
}

/// Hit rate and NDCG at `k` from the rank (0 = first) each held-out item reached among its
/// candidates: a hit when the rank is under `k`, NDCG `1 / log2(rank + 2)` for a hit.
pub fn hit_rate_and_ndcg(ranks: &[usize], k: usize) -> (f64, f64) {
    if ranks.is_empty() {
        return (0.0, 0.0);
    }
    let (mut hits, mut gain) = (0usize, 0.0);
    for &rank in ranks {
        if rank < k {
            hits += 1;
            gain += 1.0 / ((rank + 2) as f64).log2();
        }
    }
    let n = ranks.len() as f64;
    (hits as f64 / n, gain / n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_ordered_pairs_and_half_ties() {
        assert_eq!(roc_auc(&[0.1, 0.9], &[false, true]), Some(1.0));
        assert_eq!(roc_auc(&[0.9, 0.1], &[false, true]), Some(0.0));
        assert_eq!(roc_auc(&[0.5, 0.5], &[false, true]), Some(0.5));
        // Pairs (positive, negative): (0.8, 0.3) yes, (0.8, 0.6) yes, (0.4, 0.3) yes, (0.4, 0.6) no.
        let auc = roc_auc(&[0.3, 0.8, 0.6, 0.4], &[false, true, false, true]).unwrap();
        assert!((auc - 0.75).abs() < 1e-12);
        assert_eq!(roc_auc(&[0.3, 0.4], &[true, true]), None);
    }

    #[test]
    fn recall_stops_at_the_allowed_false_alarms() {
        // 10 negatives: 10% allows one false alarm.
        let mut scores = vec![0.9, 0.8, 0.7];
        let mut labels = vec![true, false, true];
        for i in 0..9 {
            scores.push(0.1 + i as f64 * 0.01);
            labels.push(false);
        }
        scores.push(0.05);
        labels.push(true);
        let (recall, threshold) = recall_at_fpr(&scores, &labels, 0.1).unwrap();
        assert!((recall - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(threshold, 0.7);
        let (strict, _) = recall_at_fpr(&scores, &labels, 0.0).unwrap();
        assert!((strict - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn ties_at_the_threshold_are_flagged_together() {
        let (recall, _) = recall_at_fpr(&[0.5, 0.5, 0.1], &[true, false, true], 0.0).unwrap();
        assert_eq!(recall, 0.0);
    }

    #[test]
    fn hit_rate_and_ndcg_at_k() {
        let (hr, ndcg) = hit_rate_and_ndcg(&[0, 1, 10, 3], 10);
        assert_eq!(hr, 0.75);
        let expected = (1.0 + 1.0 / 3f64.log2() + 1.0 / 5f64.log2()) / 4.0;
        assert!((ndcg - expected).abs() < 1e-12);
    }
}
